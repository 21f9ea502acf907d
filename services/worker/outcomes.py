"""What a finished task publishes (its ``Outcome``): its result record and, for a failure, a dead-letter record, both
fitted to the record size limit before they enter the ledger (``record_limits``). Each outcome knows its smaller
form, for when Kafka refuses one of its records all the same: a refused result becomes the minimal FAILED one, a
refused dead-letter record the minimal one, then none. No outcome is retried forever."""

from __future__ import annotations

import logging
from typing import Literal

from aimesh import events, tracing
from aimesh.kafka import Headers, Record
from aimesh.metrics import (
    REFUSAL_PREFLIGHT,
    REFUSED_DEAD_LETTER,
    REFUSED_RESULT,
    WorkerMetrics,
    error_code_label,
    status_label,
)
from aimesh.v1 import result_pb2

from .ledger import Outcome, OutRecord, Refusal
from .record_limits import MAX_ERROR_HEADER_BYTES, RecordLimits, cut_utf8

log = logging.getLogger(__name__)

# How far a task's outcome was cut down: fitted to the record size limit; minimal (Kafka refused a fitted record: a
# FAILED result without output, a dead-letter record without value); without its dead-letter record (Kafka refused
# even the minimal one, or the dead-letter topic takes no record).
Stage = Literal["fitted", "minimal", "no_dead_letter"]


def dead_letter_reason(result: result_pb2.AIResultEvent) -> str:
    """Why a FAILED task goes to the dead-letter topic too (a label such as ``model_not_found``); empty for results
    that are not failures of processing (succeeded, expired)."""
    if result.status != result_pb2.TASK_STATUS_FAILED:
        return ""
    return error_code_label(result.error.code)


class Outcomes:
    """Builds the outcomes of worker ``worker_id``'s tasks; counts each in ``metrics`` once it is committed."""

    def __init__(self, limits: RecordLimits, metrics: WorkerMetrics, *, results_topic: str, worker_id: str) -> None:
        self._limits = limits
        self._metrics = metrics
        self._results_topic = results_topic
        self._worker_id = worker_id

    def fit(self, result: result_pb2.AIResultEvent) -> result_pb2.AIResultEvent | None:
        """``result``, or what replaces it when its record would not fit the record size limit (see record_limits)."""
        fitted = self._limits.fit_result(result)
        if fitted is not result:
            log.error("task %s: %s", result.task_id, fitted.error.message if fitted else "its task id fits no record")
            tracing.fail("result too large")
            self._metrics.refused_records.labels(REFUSED_RESULT, REFUSAL_PREFLIGHT).inc()
        return fitted

    def outcome(
        self,
        record: Record,
        task_id: str,
        result: result_pb2.AIResultEvent | None,
        *,
        attempts: int,
        undecodable: str = "",
        error: str = "",
        stage: Stage = "fitted",
    ) -> Outcome:
        """What a finished task publishes: its result and, for a failure (or an ``undecodable`` record: the reason),
        a dead-letter record, fitted to the record size limit (``stage``: how far it was cut down already); its
        ``smaller`` is the next stage, for when Kafka refuses one of its records all the same."""
        error = error or (result.error.message if result is not None else "")
        dead_letter = undecodable or (dead_letter_reason(result) if result is not None else "")
        records = [] if result is None else [self._result_record(result)]
        if dead_letter and stage != "no_dead_letter":
            records.append(
                self._dead_letter_record(
                    record,
                    reason=dead_letter,
                    error=error,
                    attempts=attempts,
                    task_id=task_id,
                    minimal=stage != "fitted",
                )
            )
            if stage == "fitted":
                tracing.event("dead_letter", {"aimesh.dead_letter.reason": dead_letter})
        counted = None if undecodable or result is None else (result.model_name, status_label(result.status))
        dead_lettered = dead_letter if stage != "no_dead_letter" else ""

        def committed() -> None:
            if counted is not None:
                self._metrics.results.labels(*counted).inc()
            if dead_lettered:
                self._metrics.dead_lettered.labels(dead_lettered).inc()

        def smaller(refusal: Refusal) -> Outcome | None:
            """A refused result becomes the minimal FAILED one (unless it is that already, or its topic refuses every
            record: nothing smaller helps then); a refused dead-letter record becomes the minimal one, then none."""
            next_stage: Stage
            if records[refusal.index].topic == self._results_topic:
                if stage != "fitted" or refusal.scope == "topic" or result is None:
                    return None
                replaced, next_stage = self._refused_result(result, refusal), "minimal"
            else:
                drop = stage != "fitted" or refusal.scope == "topic"
                replaced, next_stage = result, "no_dead_letter" if drop else "minimal"
            return self.outcome(
                record, task_id, replaced, attempts=attempts, undecodable=undecodable, error=error, stage=next_stage
            )

        return Outcome(tuple(records), committed, smaller)

    def _refused_result(self, result: result_pb2.AIResultEvent, refusal: Refusal) -> result_pb2.AIResultEvent | None:
        code = (
            result_pb2.ERROR_CODE_RESULT_TOO_LARGE if refusal.scope == "size" else result_pb2.ERROR_CODE_RESULT_REFUSED
        )
        message = f"Kafka refused the result record ({refusal.code}: {refusal.reason}): its output was dropped"
        return self._limits.minimal_result(result, code, message)

    def _result_record(self, result: result_pb2.AIResultEvent) -> OutRecord:
        headers = events.result_headers()
        with tracing.send_span(self._results_topic, result.task_id, headers):
            pass  # the record is sent inside the next transaction; the span marks its creation
        return OutRecord(self._results_topic, result.task_id.encode(), result.SerializeToString(), headers)

    def _dead_letter_record(
        self, record: Record, *, reason: str, error: str, attempts: int, task_id: str, minimal: bool = False
    ) -> OutRecord:
        """The task record with the reason in headers, cut to fit the record size limit; ``minimal``: without its
        value or the original headers (Kafka refused the fitted one)."""
        headers: Headers = [
            (events.DLQ_REASON_HEADER, reason.encode()),
            (events.DLQ_ERROR_HEADER, cut_utf8(error, MAX_ERROR_HEADER_BYTES).encode()),
            (events.DLQ_TOPIC_HEADER, record.topic.encode()),
            (events.DLQ_PARTITION_HEADER, str(record.partition).encode()),
            (events.DLQ_OFFSET_HEADER, str(record.offset).encode()),
            (events.DLQ_ATTEMPTS_HEADER, str(attempts).encode()),
            (events.DLQ_WORKER_HEADER, self._worker_id.encode()),
        ]
        if task_id:
            headers.append((events.DLQ_TASK_ID_HEADER, task_id.encode()))
        if minimal:
            return self._limits.minimal_dead_letter(record.key, len(record.value or b""), headers)
        # The original headers ride along (trace context included), after ours.
        fitted = self._limits.fit_dead_letter(record.key, record.value, headers, record.headers)
        if fitted.value is not record.value:
            self._metrics.refused_records.labels(REFUSED_DEAD_LETTER, REFUSAL_PREFLIGHT).inc()
        return fitted
