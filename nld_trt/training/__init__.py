"""Training the embedded default models: synthetic GSM-style data (`data`), synthetic pictures with
exact-answer questions for the tiny VLM (`pictures`), and NLD's joint objective (`objective`). The recipe that
ties them together is `scripts/train_tiny_nld.py` (`--vlm` for the VLM)."""
