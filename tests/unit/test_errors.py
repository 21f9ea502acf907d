"""Every exception aimesh defines derives from the one root, ``aimesh.errors.AimeshError``: a caller can tell
aimesh's errors from everything else, and ask any of them whether a retry can help (``retryable``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import tomllib
from pathlib import Path

import pytest

from aimesh.auth import AuthConfigError
from aimesh.errors import AimeshError

# The packages pyproject.toml installs: src/aimesh and the services (aimesh.ingest, aimesh.worker, ...).
PACKAGES = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"][
    "packages"
]
MODULES = sorted(
    f"{package}.{module.name}"
    for package in PACKAGES
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__)
    if not module.ispkg and not module.name.endswith(("_pb2", "_pb2_grpc"))
)


def _exceptions_defined_in(module_name: str) -> list[type[BaseException]]:
    module = importlib.import_module(module_name)
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module_name
    ]


def test_every_package_is_searched() -> None:
    for package in ("aimesh.kafka", "aimesh.devstack", "aimesh.ingest", "aimesh.worker", "aimesh.notifier"):
        assert any(name == package or name.startswith(f"{package}.") for name in MODULES)
    assert "aimesh.gateway.problems" in MODULES


@pytest.mark.parametrize("module_name", MODULES)
def test_every_exception_derives_from_the_root(module_name: str) -> None:
    strays = [cls.__qualname__ for cls in _exceptions_defined_in(module_name) if not issubclass(cls, AimeshError)]
    assert strays == []


def test_an_error_that_was_a_builtin_one_still_is() -> None:
    # Callers (argparse, settings validation) catch it as the ValueError it always was.
    assert issubclass(AuthConfigError, ValueError)
