"""Triton Python-backend entry point of an nld-trt model repository (both `nld` and `nld_sync`).

The implementation lives in the installed package, so the repository holds no code to keep in sync:
the environment the backend stub runs in (see `nld-trt serve`) must have nld-trt installed.
"""

from nld_trt.serving.triton_model import TritonPythonModel  # noqa: F401
