"""Triton Python backend model ``sentiment``: VADER labels and scores (see ``polarity.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .polarity import PolarityScorer


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self._scorer = PolarityScorer()

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        items = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        try:
            texts = [item.decode("utf-8") for item in items]
        except UnicodeDecodeError as e:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
            )
        results = [self._scorer.score(text) for text in texts]
        labels = np.array([[label.encode("utf-8")] for label, _ in results], dtype=np.object_)
        scores = np.stack([s for _, s in results]) if results else np.zeros((0, 4), dtype=np.float32)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("LABEL", labels), pb_utils.Tensor("SCORES", scores)]
        )
