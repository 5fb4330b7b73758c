"""The Triton Python-backend model behind `nld_tokenizer` (serving/tokenize.py says what it answers).

Runs inside the backend stub only. It reads the tokenizer files of the repository's artifacts, checked
against the manifest first, and imports no PyTorch: a small process beside `nld` and `nld_sync`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import NLDError
from ..tokenizer import NLDTokenizer
from .manifest import verify_manifest
from .tokenize import FILES, INPUTS, handle

SHAPES = {"token_ids": lambda v: np.array([v], dtype=np.int32).reshape(1, -1),
          "token_strs": lambda v: np.array([[s.encode("utf-8") for s in v]], dtype=np.object_).reshape(1, -1),
          "text_output": lambda v: np.array([[v.encode("utf-8")]], dtype=np.object_),
          "tokenizer_info": lambda v: np.array([[v.encode("utf-8")]], dtype=np.object_)}


def _error(message: str) -> Any:
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # older backends: no error codes
        return pb_utils.TritonError(message)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        try:
            config = json.loads(args["model_config"])
            params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
            manifest = (Path(args["model_repository"]) / params["manifest"]).resolve()
            artifacts, _ = verify_manifest(manifest, only=FILES)
            self.tokenizer = NLDTokenizer(artifacts)
        except NLDError as e:  # raised afresh: the stub would append every frame below to Triton's load error
            raise type(e)(str(e)) from None
        self.max_prompt_bytes = int(params.get("max_prompt_bytes") or 65536)
        self.max_ids = int(params.get("max_seq_len") or 2048)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                inputs = {}
                for spec in INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                    inputs[spec.name] = None if tensor is None else tensor.as_numpy()
                wanted = set(request.requested_output_names() or ()) or None  # none named: every output
                out = handle(self.tokenizer, inputs, request.parameters(), self.max_prompt_bytes, self.max_ids, wanted)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, SHAPES[name](value)) for name, value in out.items()
                    if wanted is None or name in wanted]))
            except NLDError as e:
                responses.append(pb_utils.InferenceResponse(error=_error(str(e))))
            except Exception as e:  # noqa: BLE001 - a malformed request must not take the model down
                responses.append(pb_utils.InferenceResponse(error=_error(f"could not read the request "
                                                                         f"({type(e).__name__}: {e})")))
        return responses
