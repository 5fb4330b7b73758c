"""The vision encoder of an engine build: its vision.onnx under ONNX Runtime, or its vision.plan under TensorRT.

An engine build of a vision-language model (`nld-trt build`) holds the tower + projector as its own graph
(nld_trt/vision/onnx_export.py: one image per call, any size, pixel_values [1, 3, H, W] -> image_rows
[cells, text hidden]) beside the text graph, which takes those rows through its `image_rows` input. These
classes stand where the PyTorch `VisionEncoder` stands for a checkpoint, with the same face for
`ImageEncoder` (its cache by content digest, its batching, the prompt binding): `config`, `device`, `dtype`
(of the pixels they take), `rows_dtype` (of the rows they return) and a call from a list of [3, H, W] pixel
tensors to a list of [cells, hidden] rows.
The graphs take one image per run, so a batch runs image by image. The TensorRT one is thin (deserialize, set
the image's shape, bind, execute) and imports TensorRT lazily; it has run only against the stand-in of
tests/test_trt_stand_in.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NLDError
from .config import VLMConfig

PIXELS, ROWS = "pixel_values", "image_rows"  # the vision graph's input and output


class OnnxVisionEncoder:
    """vision.onnx (a float32 graph) under ONNX Runtime on CPU."""

    def __init__(self, graph: str | Path, config: VLMConfig, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        got = self.session.get_inputs()[0].type
        if got != "tensor(float)":
            raise NLDError(f"{graph} takes pixels as {got}: ONNX Runtime on CPU runs a float32 build's vision graph "
                           "(nld-trt build --dtype float32)")
        self.config = config
        self.device = torch.device("cpu")
        self.dtype = self.rows_dtype = torch.float32

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.from_numpy(self.session.run([ROWS], {PIXELS: img[None].float().numpy()})[0]) for img in images]


class TensorRTVisionEncoder:
    """vision.plan under TensorRT (one profile over image sizes, built beside the text plan). `device` is cuda
    for any real plan; the stand-in TensorRT of the tests runs on cpu."""

    def __init__(self, plan: str | Path, config: VLMConfig, device: str = "cuda") -> None:
        from ..executors.trt_executor import LoadedPlan, torch_dtype

        self._device = torch.device(device)
        self.plan = LoadedPlan.load(plan, self._device)
        self.engine = self.plan.engine
        names = set(self.plan.names)
        if names != {PIXELS, ROWS}:
            raise NLDError(f"{plan} is not a plan of the vision encoder's graph (its tensors are {sorted(names)}, not "
                           f"{PIXELS} and {ROWS})")
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.bounds = [tuple(s) for s in self.engine.get_tensor_profile_shape(PIXELS, 0)]
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise NLDError(f"TensorRT could not create an execution context for {plan} (out of GPU memory?)")
        self.config = config
        self.dtype, self.rows_dtype = self.dtypes[PIXELS], self.dtypes[ROWS]

    @property
    def device(self) -> torch.device:
        return self._device

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._one(img) for img in images]

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        pixels = image[None].to(self._device, self.dtypes[PIXELS]).contiguous()
        lo, _, hi = self.bounds
        if not self.context.set_input_shape(PIXELS, tuple(pixels.shape)):
            raise NLDError(f"the vision plan takes images from {lo[2]} x {lo[3]} to {hi[2]} x {hi[3]} pixels, not "
                           f"{pixels.shape[2]} x {pixels.shape[3]}: rebuild it for the processor's longest edge")
        cell = self.config.cell
        shape = ((pixels.shape[2] // cell) * (pixels.shape[3] // cell), self.config.text.hidden_size)
        inferred = tuple(self.context.get_tensor_shape(ROWS))
        if len(inferred) != 2 or any(0 <= d != x for d, x in zip(inferred, shape)):
            raise NLDError(f"the vision plan returns {ROWS} of shape {inferred} for a {pixels.shape[2]} x "
                           f"{pixels.shape[3]} image, not {shape}: it is not this model's vision encoder; rebuild it")
        rows = torch.empty(shape, dtype=self.dtypes[ROWS], device=self._device)
        self.context.set_tensor_address(PIXELS, pixels.data_ptr())
        self.context.set_tensor_address(ROWS, rows.data_ptr())
        stream = torch.cuda.current_stream(self._device).cuda_stream if self._device.type == "cuda" else 0
        if not self.context.execute_async_v3(stream):
            raise NLDError("TensorRT execution of the vision plan failed (see its log)")
        return rows
