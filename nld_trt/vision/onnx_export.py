"""The vision encoder (tower + projector) as its own ONNX graph, for TensorRT, checked under ONNX Runtime.

As TensorRT-LLM does for its multimodal encoders, the encoder is a separate engine beside the language
model's: one image per call, any size (the input's height and width are dynamic; both must be multiples of
the 28-pixel cell, which the image processor guarantees), returning one text-width row per cell in raster
order: the rows that replace the image's `<|image_pad|>` positions at prefill.

  input  pixel_values [1, 3, H, W] float32 (normalised, nld_trt/vision/processor.py)
  output image_rows   [H / 28 * W / 28, text hidden] in the graph's dtype

The graph is traced from nld_trt/vision/tower.py (torch.onnx's TorchScript exporter, with the image sizes
as dynamic axes: the 2D rotary positions and the patch merger follow the input's shape), so there is one
definition of the computation. `verify` runs the float32 graph under ONNX Runtime on several image sizes
and compares it with the PyTorch encoder.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import NLDError
from .tower import VisionEncoder

VISION_GRAPH = "vision.onnx"
OPSET = 18
VERIFY_CELLS = ((1, 1), (2, 3), (4, 2), (3, 5))  # (rows, cols) of the verification images
TOLERANCE = 1e-4  # max |graph - PyTorch| relative to max |PyTorch| (float32)


class _OneImage(nn.Module):
    """pixel_values [1, 3, H, W] -> the image's rows [cells, hidden]: the traced function."""

    def __init__(self, encoder: VisionEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder([pixel_values[0]])[0]


def export_vision_graph(encoder: VisionEncoder, directory: Path, dtype: torch.dtype, name: str = VISION_GRAPH) -> Path:
    """Write the encoder's graph in `dtype` (weights as external data) and check it."""
    import onnx

    model = copy.deepcopy(encoder).to("cpu", dtype).eval()
    cell = encoder.config.cell
    example = torch.zeros(1, encoder.config.vision.num_channels, 2 * cell, 3 * cell)
    path = Path(directory) / name
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(_OneImage(model), (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["pixel_values"], output_names=["image_rows"],
                          dynamic_axes={"pixel_values": {2: "height", 3: "width"}, "image_rows": {0: "cells"}})
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def verify_vision_graph(graph: Path, encoder: VisionEncoder, progress=lambda s: None) -> dict:
    """Run the (float32) graph under ONNX Runtime on images of several sizes; each must match the PyTorch
    encoder to TOLERANCE of its largest value, or the build fails (nothing written)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    cell = encoder.config.cell
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    sizes = []
    for rows, cols in VERIFY_CELLS:
        pixels = torch.randn(1, 3, rows * cell, cols * cell, generator=g)
        with torch.inference_mode():
            ref = encoder([pixels[0].to(encoder.device, encoder.dtype)])[0].float().cpu().numpy()
        start = time.perf_counter()
        got = session.run(["image_rows"], {"pixel_values": pixels.numpy()})[0]
        if got.shape != ref.shape:
            raise NLDError(f"the vision graph returned {list(got.shape)} rows for a {rows} x {cols}-cell image, "
                           f"expected {list(ref.shape)}: nothing was written")
        err = float(np.abs(got.astype(np.float32) - ref).max() / max(float(np.abs(ref).max()), 1e-12))
        worst = max(worst, err)
        sizes.append({"pixels": [rows * cell, cols * cell], "relative_error": err,
                      "ms": round(1e3 * (time.perf_counter() - start), 2)})
        progress(f"verify vision graph {rows * cell} x {cols * cell}: max relative error {err:.2e}")
    if worst > TOLERANCE:
        raise NLDError(f"ONNX Runtime and PyTorch disagree on the vision encoder (relative error {worst:.2e} > "
                       f"{TOLERANCE}): the exported graph is wrong; nothing was written")
    return {"images": sizes, "max_relative_error": worst}
