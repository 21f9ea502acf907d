"""Whether a call's tasks may be taken now: the workers' backlog (``Admission``) and the tenant's concurrency
and rate quotas. A call turned away ends RESOURCE_EXHAUSTED with when to retry and why."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2

from aimesh import auth, events
from aimesh.grpc_edge import abort_with, error_info
from aimesh.metrics import (
    REJECT_BACKLOG_TOO_LONG,
    REJECT_TENANT_CONCURRENCY_LIMITED,
    REJECT_TENANT_RATE_LIMITED,
    IngestMetrics,
)
from aimesh.v1 import ingest_pb2

from .admission import Admission
from .idempotency import IdempotencyKeys
from .quotas import InFlightTasks, RateQuotas, Reservation

# A tenant over its concurrency quota is told to retry after this long: when its tasks finish is not known.
CONCURRENCY_RETRY_S = 2.0

Context = grpc.aio.ServicerContext[Any, Any]


class LoadChecks:
    """The checks a call passes before anything is published; each is optional (None: nothing is turned away
    for it). ``topic_of`` names the topic a request's task goes to."""

    def __init__(
        self,
        *,
        metrics: IngestMetrics,
        idempotency: IdempotencyKeys,
        topic_of: Callable[[ingest_pb2.SubmitTaskRequest], str],
        admission: Admission | None,
        rate_quotas: RateQuotas | None,
        in_flight: InFlightTasks | None,
    ) -> None:
        self._metrics = metrics
        self._idempotency = idempotency
        self._topic_of = topic_of
        self._admission = admission
        self._rate_quotas = rate_quotas
        self._in_flight = in_flight if in_flight is not None and in_flight.enabled else None

    async def admit_or_abort(
        self, context: Context, requests: Sequence[ingest_pb2.SubmitTaskRequest]
    ) -> Reservation | None:
        """Abort with RESOURCE_EXHAUSTED when the backlog or the tenant's quotas turn the call away; else return
        the concurrency slots held for its tasks (None when no concurrency quota applies). All or nothing: every
        task of a batch counts. Tasks whose idempotency key was accepted before publish nothing and are not
        counted.

        Runs without awaiting between the checks and the taking of tokens and slots, so concurrent calls on the
        event loop cannot both pass one check.
        """
        tenant = auth.current_tenant()
        fresh = [
            r for r in requests if not (r.idempotency_key and self._idempotency.lookup(f"{tenant}/{r.idempotency_key}"))
        ]
        if not fresh:
            return None
        await self._check_backlog(context, fresh, len(requests))
        await self._check_concurrency(context, tenant, len(fresh), len(requests))
        await self._take_rate(context, tenant, len(fresh), len(requests))
        if self._in_flight is not None and self._in_flight.limit(tenant) > 0:
            reservation = self._in_flight.reserve(tenant, len(fresh))
            if reservation is None:  # pragma: no cover - checked above with no await in between
                raise RuntimeError("concurrency slots vanished between check and reservation")
            return reservation
        return None

    async def _check_backlog(self, context: Context, fresh: Sequence[ingest_pb2.SubmitTaskRequest], count: int) -> None:
        if self._admission is None:
            return
        now = time.time()
        for request in fresh:
            to_deadline = events.timestamp_s(request.deadline) - now if request.HasField("deadline") else None
            rejection = self._admission.check(self._topic_of(request), seconds_to_deadline=to_deadline)
            if rejection is not None:
                self._metrics.tasks_rejected.labels(REJECT_BACKLOG_TOO_LONG).inc(count)
                await abort_with(
                    context,
                    code_pb2.RESOURCE_EXHAUSTED,
                    f"{rejection.message}; nothing was accepted",
                    [
                        _retry_info(rejection.retry_after_s),
                        error_info(
                            "BACKLOG_TOO_LONG",
                            topic=rejection.topic,
                            backlog=str(rejection.backlog),
                            estimated_wait_s=f"{rejection.wait_s:.1f}",
                        ),
                    ],
                )

    async def _check_concurrency(self, context: Context, tenant: str, fresh: int, count: int) -> None:
        if self._in_flight is None:
            return
        limit = self._in_flight.limit(tenant)
        held = self._in_flight.count(tenant)
        if limit > 0 and held + fresh > limit:
            self._metrics.tasks_rejected.labels(REJECT_TENANT_CONCURRENCY_LIMITED).inc(count)
            await abort_with(
                context,
                code_pb2.RESOURCE_EXHAUSTED,
                f"tenant {tenant} has {held} tasks unfinished; its limit is {limit} and this call adds "
                f"{fresh}; nothing was accepted",
                [
                    _retry_info(CONCURRENCY_RETRY_S),
                    error_info("TENANT_CONCURRENCY_LIMITED", tenant=tenant, limit=str(limit), in_flight=str(held)),
                    _quota_failure(tenant, f"at most {limit} tasks accepted and not yet finished"),
                ],
            )

    async def _take_rate(self, context: Context, tenant: str, fresh: int, count: int) -> None:
        if self._rate_quotas is None:
            return
        wait_s = self._rate_quotas.take(tenant, fresh)
        if wait_s > 0:
            quota = self._rate_quotas.limit(tenant)
            self._metrics.tasks_rejected.labels(REJECT_TENANT_RATE_LIMITED).inc(count)
            await abort_with(
                context,
                code_pb2.RESOURCE_EXHAUSTED,
                f"tenant {tenant} is over its rate of {quota.rate_per_s:g} tasks/s (burst {quota.burst}); "
                "nothing was accepted",
                [
                    _retry_info(wait_s),
                    error_info(
                        "TENANT_RATE_LIMITED",
                        tenant=tenant,
                        rate_per_s=f"{quota.rate_per_s:g}",
                        burst=str(quota.burst),
                    ),
                    _quota_failure(tenant, f"at most {quota.rate_per_s:g} tasks/s, bursts of {quota.burst}"),
                ],
            )


def _retry_info(delay_s: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1_000_000, int(delay_s * 1e9)))  # a positive delay, at least 1 ms
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _quota_failure(tenant: str, description: str) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject=f"tenant:{tenant}", description=description)]
    )
