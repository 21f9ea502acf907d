"""What a running stack records for ``aimesh-stack down`` in another process: its pids and addresses
(``StackState``), in ``stack.json`` in its run folder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class StackState:
    """What ``down`` needs to stop a stack that another process started."""

    pids: dict[str, int] = field(default_factory=dict)
    kafka_bootstrap: str = ""
    triton_url: str = ""
    ingest_address: str = ""  # the first replica's
    notifier_address: str = ""
    ingest_addresses: list[str] = field(default_factory=list)  # every replica's, the first one's first
    notifier_addresses: list[str] = field(default_factory=list)
    gateway_url: str = ""  # empty: the stack runs no gateway
    object_store_url: str = ""  # empty: the stack runs no object store
    metrics_urls: dict[str, str] = field(default_factory=dict)


STATE_FILE = "stack.json"


def write_state(run_dir: Path, state: StackState) -> None:
    (run_dir / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))


def read_state(run_dir: Path) -> StackState | None:
    try:
        return StackState(**json.loads((run_dir / STATE_FILE).read_text()))
    except FileNotFoundError:
        return None
