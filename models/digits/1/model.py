"""Triton Python backend model ``digits``: handwritten digit classification (see ``classifier.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .classifier import DigitClassifier


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self._classifier = DigitClassifier()

    def execute(self, requests: list[Any]) -> list[Any]:
        # One classification for the whole dynamic batch, then each request's rows back to it.
        images = [pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy() for r in requests]
        labels, probabilities = self._classifier.classify(np.concatenate(images))
        responses = []
        start = 0
        for batch in images:
            end = start + len(batch)
            outputs = [
                pb_utils.Tensor("LABEL", labels[start:end].reshape(-1, 1)),
                pb_utils.Tensor("PROBABILITIES", probabilities[start:end]),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            start = end
        return responses
