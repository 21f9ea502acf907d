"""Reading docker-compose.yml the way the services would see it; shared by the compose and observability tests."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic_settings import BaseSettings


def environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's ``environment`` in either Compose form; None for a name passed through from the host."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) for item in env]
        return {pair[0]: pair[1] if len(pair) == 2 else None for pair in pairs}
    return {key: None if value is None else str(value) for key, value in env.items()}


def effective_settings(cls: type[BaseSettings], service: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings the service would run with: its compose environment over the defaults, nothing else."""
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    for key in list(os.environ):
        if key.upper().startswith(prefix):
            monkeypatch.delenv(key)
    for key, value in environment(service).items():
        if value is not None:
            monkeypatch.setenv(key, value)
    return cls()
