"""A worker's options: what it consumes and publishes, and its limits, from its settings and its id."""

from __future__ import annotations

from dataclasses import dataclass

from aimesh.objects import ObjectStore
from aimesh.settings import WorkerSettings


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker consumes and publishes, and its limits: its settings (``WorkerSettings``) and its id."""

    worker_id: str
    tasks_topic: str
    results_topic: str
    dead_letter_topic: str
    max_in_flight: int
    max_batch_size: int
    max_request_bytes: int
    max_record_bytes: int
    inference_timeout_s: float
    health_interval_s: float
    grace_s: float
    idempotency_window_s: float
    cancel_window_s: float
    batch_tasks_topic: str = ""  # none: no batch priority class
    cancel_topic: str = ""  # none: no cancellations read
    object_store: ObjectStore | None = None  # none: tensors held by reference fail, large outputs stay inline
    # Raw outputs larger than this go to the object store.
    inline_limit_bytes: int = WorkerSettings.model_fields["inline_limit_bytes"].default

    @classmethod
    def of(cls, settings: WorkerSettings, worker_id: str) -> WorkerOptions:
        return cls(
            worker_id=worker_id,
            tasks_topic=settings.tasks_topic,
            results_topic=settings.results_topic,
            dead_letter_topic=settings.dead_letter_topic,
            max_in_flight=settings.max_in_flight,
            max_batch_size=settings.max_batch_size,
            max_request_bytes=settings.max_request_bytes,
            max_record_bytes=settings.max_record_bytes,
            inference_timeout_s=settings.inference_timeout_s,
            health_interval_s=settings.triton_health_interval_s,
            grace_s=settings.shutdown_grace_s,
            idempotency_window_s=settings.idempotency_window_s,
            cancel_window_s=settings.cancel_window_s,
            batch_tasks_topic=settings.batch_tasks_topic,
            cancel_topic=settings.cancel_topic,
            object_store=ObjectStore.of(settings),
            inline_limit_bytes=settings.inline_limit_bytes,
        )
