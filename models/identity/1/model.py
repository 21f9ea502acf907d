"""Triton Python backend model ``identity``: each input it received, unchanged, as output ``OUT_<input name>``."""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # Every input is optional: the config's list is what a request may send.
        self._inputs = [i["name"] for i in json.loads(args["model_config"])["input"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        outputs = []
        for name in self._inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                outputs.append(pb_utils.Tensor(f"OUT_{name}", tensor.as_numpy()))
        return pb_utils.InferenceResponse(output_tensors=outputs)
