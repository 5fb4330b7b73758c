"""ONNX Runtime implementations of the graph's custom nodes, so the exact graph handed to TensorRT runs on
CPU. Each node runs the PyTorch reference the TensorRT plugin is tested against; onnxruntime-extensions
hosts them (its Python operators live in the `ai.onnx.contrib` domain, so `for_onnxruntime` renames the
`nld` domain of a copy of the graph; op types, inputs and attributes stay as TensorRT sees them)."""

from __future__ import annotations

import onnx
import torch

from .onnx_graph import ACCEPT_OP, ATTENTION_OP, PLUGIN_DOMAIN, SELECT_OP, WRITE_OP

ORT_DOMAIN = "ai.onnx.contrib"
_registered = False


def register() -> str:
    """Register the Python implementations once; returns the custom-op library path for SessionOptions."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _registered:
        from nld_trt.plugins.block_attention.reference import reference_attention, reference_write_kv
        from nld_trt.plugins.spec_accept.reference import reference_dlm_select, reference_spec_accept

        T = PyCustomOpDef

        @onnx_op(
            op_type=WRITE_OP,
            inputs=[T.dt_float, T.dt_float, T.dt_float, T.dt_float, T.dt_int32, T.dt_int32, T.dt_int32],
            outputs=[T.dt_float, T.dt_float],
            attrs={"k_quant": T.dt_float, "v_quant": T.dt_float, "quantize": T.dt_int64,
                   "plugin_namespace": T.dt_string},
        )
        def write_kv(k, v, k_cache, v_cache, page_table, committed, chunk_lens, **attrs):
            # ONNX Runtime hands a Python operator copies of its inputs and copies its outputs back: the cache
            # is updated functionally here (TensorRT aliases the outputs to the inputs and writes in place)
            kc, vc = torch.from_numpy(k_cache), torch.from_numpy(v_cache)
            quant = (float(attrs["k_quant"]), float(attrs["v_quant"])) if int(attrs["quantize"]) else (None, None)
            with torch.inference_mode():
                reference_write_kv(torch.from_numpy(k), torch.from_numpy(v), kc, vc, torch.from_numpy(page_table),
                                   torch.from_numpy(committed), torch.from_numpy(chunk_lens), *quant)
            return k_cache, v_cache

        @onnx_op(
            op_type=ATTENTION_OP,
            inputs=[T.dt_float, T.dt_float, T.dt_float, T.dt_int32, T.dt_int32, T.dt_int32, T.dt_int32],
            outputs=[T.dt_float],
            attrs={"scale": T.dt_float, "k_scale": T.dt_float, "v_scale": T.dt_float, "plugin_namespace": T.dt_string},
        )
        def block_attention(q, k_cache, v_cache, page_table, committed, chunk_lens, block, **attrs):
            with torch.inference_mode():
                out = reference_attention(
                    torch.from_numpy(q), torch.from_numpy(k_cache), torch.from_numpy(v_cache),
                    torch.from_numpy(page_table), torch.from_numpy(committed), torch.from_numpy(chunk_lens),
                    torch.from_numpy(block), float(attrs["scale"]), float(attrs["k_scale"]), float(attrs["v_scale"]),
                )
            return out.numpy()

        @onnx_op(op_type=ACCEPT_OP, inputs=[T.dt_int32, T.dt_float], outputs=[T.dt_int32, T.dt_int32],
                 attrs={"plugin_namespace": T.dt_string})
        def spec_accept(draft, logits, **attrs):
            accepted, next_token = reference_spec_accept(torch.from_numpy(draft), torch.from_numpy(logits))
            return accepted.int().numpy(), next_token.int().numpy()

        @onnx_op(op_type=SELECT_OP, inputs=[T.dt_float, T.dt_int32, T.dt_int32],
                 outputs=[T.dt_int32, T.dt_float, T.dt_int32],
                 attrs={"threshold": T.dt_float, "plugin_namespace": T.dt_string})
        def dlm_select(logits, masked, fill_all, **attrs):
            tokens, conf, fill = reference_dlm_select(torch.from_numpy(logits), torch.from_numpy(masked),
                                                      float(attrs["threshold"]), torch.from_numpy(fill_all))
            return tokens.int().numpy(), conf.float().numpy(), fill.int().numpy()

        _registered = True
    return get_library_path()


def for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph whose custom nodes sit in onnxruntime-extensions' domain."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == PLUGIN_DOMAIN:
            node.domain = ORT_DOMAIN
    for opset in copy.opset_import:
        if opset.domain == PLUGIN_DOMAIN:
            opset.domain = ORT_DOMAIN
    return copy
