"""Write the gateway's OpenAPI document: ``python -m aimesh.gateway.openapi`` (rewrites docs/openapi.json) or
``python -m aimesh.gateway.openapi -`` (to stdout). A unit test fails while the checked-in file differs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from aimesh.settings import GatewaySettings

from .app import create_app, openapi_document

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def document() -> dict[str, Any]:
    """The document of an application with default settings (the routes do not depend on settings)."""
    return openapi_document(create_app(GatewaySettings(), static_dir=None))


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> None:
    if argv[1:] == ["-"]:
        sys.stdout.write(render())
    else:
        CHECKED_IN.write_text(render())
        print(f"wrote {CHECKED_IN}")


if __name__ == "__main__":
    main(sys.argv)
