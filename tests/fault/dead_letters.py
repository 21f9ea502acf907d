"""Reading the dead-letter topic by its record contract (header names in ``aimesh.events``)."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from confluent_kafka import Message
from integration.mesh_client import headers_of

from aimesh import events


def dead_letter_task_id(record: Message) -> str:
    """The task id a dead-letter record names: its task-id header, else its key (the original record's key,
    which ingest sets to the task id)."""
    headers = headers_of(record)
    if events.DLQ_TASK_ID_HEADER in headers:
        return headers[events.DLQ_TASK_ID_HEADER].decode()
    return (record.key() or b"").decode(errors="replace")


def dead_letters_of(records: Iterable[Message], task_ids: Collection[str]) -> list[dict[str, str]]:
    """The dead-letter records of ``task_ids``, each as its headers (decoded) plus its task id."""
    wanted = set(task_ids)
    return [
        {"task_id": dead_letter_task_id(r), **{k: v.decode(errors="replace") for k, v in headers_of(r).items()}}
        for r in records
        if dead_letter_task_id(r) in wanted
    ]
