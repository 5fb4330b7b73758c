"""Triton Python-backend entry point of an nld-trt repository's `nld_tokenizer` model (the checkpoint's tokenizer).

The implementation lives in the installed package (nld_trt/serving/tokenize.py); see model.py beside this file.
"""

from nld_trt.serving.tokenizer_model import TritonPythonModel  # noqa: F401
