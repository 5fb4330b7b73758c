"""Quantization recipes (JSON), one per `--qformat`; read by `nld_trt.quant.recipes`.

This folder holds data only. It is installed as `nld_trt.recipes` when pyproject maps it there; in a source
checkout the loader reads it in place.
"""
