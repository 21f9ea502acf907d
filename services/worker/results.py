"""Builders of the result events a worker sends for a task: its RUNNING update, its partial updates, its terminal
result (succeeded, failed, cancelled, expired) with timings. No I/O (``cancelled`` and ``expired`` mark the current
span failed, nothing more): the runner sends what these build."""

from __future__ import annotations

import hashlib
import time

from aimesh import events, tracing
from aimesh.v1 import result_pb2, task_pb2

from .inference import STREAM_OUTPUT_NAME

# The seed the worker gives a streaming model when the client gave none (derived from the task id: a rerun emits
# the same tokens with the same sequence numbers). Request parameter name, and the model's largest seed.
SEED_PARAMETER = "seed"
MAX_SEED = 2**63 - 1


def derived_seed(task_id: str) -> int:
    """A stable seed for a task that has none: the same task id always gives the same one."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big") & MAX_SEED


def text_output(text: str) -> result_pb2.TaskOutput:
    """A streaming model's output: its whole text (or one partial update's piece) as one BYTES tensor."""
    output = result_pb2.TaskOutput()
    output.tensors.add(name=STREAM_OUTPUT_NAME, datatype="BYTES", shape=[1], string_data=[text])
    return output


class ResultBuilder:
    """Result events of worker ``worker_id``."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    def result(self, task: task_pb2.AITaskEvent, status: result_pb2.TaskStatus.ValueType) -> result_pb2.AIResultEvent:
        return result_pb2.AIResultEvent(
            schema_version=events.SCHEMA_VERSION,
            task_id=task.task_id,
            status=status,
            model_name=task.model_name,
            worker_id=self.worker_id,
            tenant=task.tenant,
        )

    def running(self, task: task_pb2.AITaskEvent) -> result_pb2.AIResultEvent:
        running = self.result(task, result_pb2.TASK_STATUS_RUNNING)
        running.produced_at.CopyFrom(events.now_timestamp())
        running.sequence = events.RUNNING_SEQUENCE
        return running

    def partial(self, task: task_pb2.AITaskEvent, sequence: int, text: str) -> result_pb2.AIResultEvent:
        partial = self.result(task, result_pb2.TASK_STATUS_RUNNING)
        partial.produced_at.CopyFrom(events.now_timestamp())
        partial.sequence = sequence
        partial.partial = True
        partial.output.CopyFrom(text_output(text))
        return partial

    def failed(
        self, task: task_pb2.AITaskEvent, code: result_pb2.ErrorCode.ValueType, message: str
    ) -> result_pb2.AIResultEvent:
        """A FAILED result, not yet finished (see `finish`)."""
        result = self.result(task, result_pb2.TASK_STATUS_FAILED)
        result.error.CopyFrom(result_pb2.TaskError(code=code, message=message))
        return result

    def undecodable(self, task_id: str, message: str) -> result_pb2.AIResultEvent:
        """The FAILED result of a record whose task id is readable but whose task is not."""
        return result_pb2.AIResultEvent(
            schema_version=events.SCHEMA_VERSION,
            task_id=task_id,
            status=result_pb2.TASK_STATUS_FAILED,
            worker_id=self.worker_id,
            produced_at=events.now_timestamp(),
            error=result_pb2.TaskError(code=result_pb2.ERROR_CODE_BAD_TASK, message=message),
            sequence=events.FIRST_PARTIAL_SEQUENCE,
        )

    def cancelled(self, task: task_pb2.AITaskEvent, started: float, why: str) -> result_pb2.AIResultEvent:
        result = self.result(task, result_pb2.TASK_STATUS_CANCELLED)
        result.error.CopyFrom(result_pb2.TaskError(message=why))
        tracing.fail(f"cancelled: {why}")
        return self.finish(result, task, started, time.time())

    def expired(self, task: task_pb2.AITaskEvent, started: float, why: str) -> result_pb2.AIResultEvent:
        result = self.result(task, result_pb2.TASK_STATUS_EXPIRED)
        result.error.CopyFrom(result_pb2.TaskError(code=result_pb2.ERROR_CODE_DEADLINE_EXCEEDED, message=why))
        tracing.fail(f"expired: {why}")
        return self.finish(result, task, started, time.time())

    @staticmethod
    def finish(
        result: result_pb2.AIResultEvent, task: task_pb2.AITaskEvent, started: float, ended: float
    ) -> result_pb2.AIResultEvent:
        """Stamp ``result`` with its production time and timings (epoch seconds ``started`` and ``ended``)."""
        submitted = events.timestamp_s(task.submitted_at) or started
        result.produced_at.CopyFrom(events.now_timestamp())
        result.timings.queue_wait.FromNanoseconds(int(max(0.0, started - submitted) * 1e9))
        result.timings.inference.FromNanoseconds(int((ended - started) * 1e9))
        result.timings.total.FromNanoseconds(int(max(0.0, time.time() - submitted) * 1e9))
        return result
