"""Generate the Python protobuf and gRPC code (with mypy stubs) from protos/ into src/aimesh/v1.

Run from anywhere: ``python scripts/gen_protos.py``. The output is a build product, not committed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "src"
PACKAGE_DIR = OUT / "aimesh" / "v1"


def main() -> int:
    sources = sorted(str(p) for p in (PROTOS / "aimesh" / "v1").glob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    # protoc finds the mypy-protobuf plugins (protoc-gen-mypy*) on PATH, beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    PACKAGE_DIR.mkdir(parents=True, exist_ok=True)
    for stale in PACKAGE_DIR.glob("*_pb2*"):
        stale.unlink()
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={OUT}",
            f"--grpc_python_out={OUT}",
            f"--mypy_out={OUT}",
            f"--mypy_grpc_out={OUT}",
            *sources,
        ]
    )
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return code
    (PACKAGE_DIR / "__init__.py").write_text('"""Generated from protos/aimesh/v1 by scripts/gen_protos.py."""\n')
    print(f"generated {len(sources)} proto files into {PACKAGE_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
