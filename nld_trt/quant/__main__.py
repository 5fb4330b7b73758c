"""`python -m nld_trt.quant ...` runs `nld-trt quantize` before (or without) its registration on the CLI."""

from .cli import main

main()
