"""Training the embedded default model: synthetic GSM-style data (`data`) and NLD's joint objective
(`objective`). The recipe that ties them together is `scripts/train_tiny_nld.py`."""
