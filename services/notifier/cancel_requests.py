"""CancelTask's work once the task is known to be this replica's: find the task (waiting briefly for one not
read yet), and publish its cancellation request for the workers."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.rpc import code_pb2

from aimesh import events, tracing
from aimesh.errors import BrokerUnavailable
from aimesh.grpc_edge import abort_with, error_info
from aimesh.kafka import Headers
from aimesh.metrics import (
    CANCEL_ALREADY_ENDED,
    CANCEL_NOT_FOUND,
    CANCEL_REQUESTED,
    CANCEL_UNAVAILABLE,
    NotifierMetrics,
)
from aimesh.v1 import notifier_pb2, task_pb2

from .refusals import abort_not_found
from .store import TaskStore, Update

log = logging.getLogger(__name__)

# How long CancelTask waits for a task the notifier has not read yet (a cancel right after the submit).
CANCEL_WAIT_S = 2.0


class Publisher(Protocol):
    """What CancelTask needs of a producer (``aimesh.kafka_producer.AsyncProducer``): publish one record and return once
    the broker acknowledged it, or raise BrokerUnavailable."""

    async def produce(self, topic: str, *, key: str, value: bytes, headers: Headers | None = None) -> object: ...


@dataclass(frozen=True)
class Cancellations:
    """Where CancelTask publishes cancellation requests, and how long it waits for the broker's acknowledgement."""

    producer: Publisher
    topic: str
    publish_timeout_s: float = 5.0


class CancelRequests:
    """Answers CancelTask for tasks in ``store``, publishing through ``cancels`` (None: this notifier publishes
    no cancellations, and says so)."""

    def __init__(
        self, store: TaskStore, metrics: NotifierMetrics, cancels: Cancellations | None, wait_s: float
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._cancels = cancels
        self._wait_s = wait_s

    async def cancel(
        self, context: grpc.aio.ServicerContext[Any, Any], task_id: str, tenant: str
    ) -> notifier_pb2.CancelTaskResponse:
        state = await self._wait_known(task_id, tenant)
        if state is None:
            self._metrics.cancel_requests.labels(CANCEL_NOT_FOUND).inc()
            await abort_not_found(context, task_id)
        if events.is_terminal(state.status):
            self._metrics.cancel_requests.labels(CANCEL_ALREADY_ENDED).inc()
            return notifier_pb2.CancelTaskResponse(outcome=notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED, state=state)
        if self._cancels is None:
            await abort_with(
                context, code_pb2.UNIMPLEMENTED, "this notifier publishes no cancellations", [error_info("NO_CANCEL")]
            )
        await self._publish(context, self._cancels, task_id, tenant)
        self._metrics.cancel_requests.labels(CANCEL_REQUESTED).inc()
        log.info("cancellation of task %s requested", task_id)
        current = self._store.get(task_id, tenant) or state
        return notifier_pb2.CancelTaskResponse(outcome=notifier_pb2.CANCEL_OUTCOME_REQUESTED, state=current)

    async def _publish(
        self, context: grpc.aio.ServicerContext[Any, Any], cancels: Cancellations, task_id: str, tenant: str
    ) -> None:
        """Publish the task's cancellation request, or end the call UNAVAILABLE if the broker does not take it."""
        event = task_pb2.AICancelEvent(
            schema_version=events.SCHEMA_VERSION, task_id=task_id, tenant=tenant, requested_at=events.now_timestamp()
        )
        headers = events.cancel_headers()
        try:
            with tracing.send_span(cancels.topic, task_id, headers):
                delivery = cancels.producer.produce(
                    cancels.topic, key=task_id, value=event.SerializeToString(), headers=headers
                )
                # The producer's own delivery timeout is publish_timeout_s: this only guards against a hang.
                await asyncio.wait_for(delivery, cancels.publish_timeout_s + 1.0)
        except (BrokerUnavailable, TimeoutError) as e:
            self._metrics.cancel_requests.labels(CANCEL_UNAVAILABLE).inc()
            log.warning("broker did not acknowledge the cancellation of %s: %s", task_id, e)
            await abort_with(
                context,
                code_pb2.UNAVAILABLE,
                "the cancellation was not recorded: Kafka did not acknowledge it in time; retry",
                [error_info("BROKER_UNAVAILABLE")],
            )

    async def _wait_known(self, task_id: str, tenant: str) -> notifier_pb2.TaskState | None:
        """The task's state once it is known to be ``tenant``'s, waiting up to ``wait_s`` for a task not read
        yet; None for a task unknown by then or another tenant's. Another tenant's task takes the whole wait
        too, so that the time of the answer does not tell it from an unknown one."""
        state = self._store.get(task_id, tenant)
        if state is not None:
            return state
        loop = asyncio.get_running_loop()
        until = loop.time() + self._wait_s
        queue = self._store.watch(task_id, tenant)
        try:
            first = await asyncio.wait_for(queue.get(), self._wait_s)
        except TimeoutError:
            return None
        finally:
            self._store.unwatch(task_id, queue)
        if isinstance(first, Update):
            return self._store.get(task_id, tenant)
        await asyncio.sleep(max(0.0, until - loop.time()))
        return None
