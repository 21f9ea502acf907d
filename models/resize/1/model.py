"""Triton Python backend model ``resize``: an image enlarged, as pixels and as PNG (see ``resize.py``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .resize import DEFAULT_SCALE, encode_png, resize, scale_parameter


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        try:
            scale = scale_parameter(json.loads(request.parameters() or "{}").get("scale", DEFAULT_SCALE))
            resized = resize(pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy(), scale)
        except ValueError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        png = np.array([encode_png(resized)], dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("IMAGE", resized), pb_utils.Tensor("PNG", png)]
        )
