"""Register every nld:: TensorRT plugin: `import nld_trt.plugins.trt as p; p.register_all()` before
building an engine that uses them (the engine embeds their PTX). Needs TensorRT >= 10.9 (a clear error says so)."""

from __future__ import annotations

from .block_attention import trt as block_attention_trt
from .spec_accept import trt as spec_accept_trt

PLUGINS = (block_attention_trt.WRITE_PLUGIN, block_attention_trt.PLUGIN, spec_accept_trt.ACCEPT_PLUGIN,
           spec_accept_trt.SELECT_PLUGIN)


def register_all() -> tuple[str, ...]:
    """Register the plugins with TensorRT; returns their names."""
    block_attention_trt.register()
    spec_accept_trt.register()
    return PLUGINS
