"""Shared test configuration: the generated protobuf package must exist (``make setup`` makes it)."""

import importlib.util

if importlib.util.find_spec("aimesh.v1.task_pb2") is None:  # pragma: no cover - a setup problem
    raise RuntimeError("generated protobuf code is missing: run `make setup` (or `make proto`)")
