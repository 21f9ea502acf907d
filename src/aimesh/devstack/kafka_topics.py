"""Topics on the dev stack's Kafka, created and waited for until every partition has a leader."""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.cimpl import NewTopic

from aimesh import kafka as kafka_adapter

from .kafka_broker import KafkaBrokerError


def create_topics(
    bootstrap: str,
    topics: dict[str, int],
    timeout_s: float = 30.0,
    *,
    replication_factor: int = 1,
    min_insync_replicas: int | None = None,
) -> None:
    """Create ``topics`` (name to partition count) with ``replication_factor`` replicas and, if given, their
    ``min.insync.replicas``; wait until every partition has a leader.

    A topic that already exists with the requested partition count is accepted as it is.

    Raises:
        KafkaBrokerError: creation failed, a topic exists with another partition count, or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    admin = kafka_adapter.admin({"bootstrap.servers": bootstrap})
    config = {} if min_insync_replicas is None else {"min.insync.replicas": str(min_insync_replicas)}
    futures = admin.create_topics(
        [
            NewTopic(name, num_partitions=count, replication_factor=replication_factor, config=config)
            for name, count in topics.items()
        ],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    for name, future in futures.items():
        # exception() rather than result(): a raised and caught error would tie this frame, and so the client
        # and its broker connections, into a reference cycle that outlives the call.
        try:
            error = future.exception(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError as e:
            raise KafkaBrokerError(f"no answer creating topic {name!r} within {timeout_s:.0f} s") from e
        if error is None or (
            isinstance(error, KafkaException) and error.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS
        ):
            continue
        raise KafkaBrokerError(f"creating topic {name!r} failed: {error}") from error
    pending = dict(topics)
    while pending:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise KafkaBrokerError(f"topics {sorted(pending)} not usable after {timeout_s:.0f} s")
        try:
            metadata = admin.list_topics(timeout=remaining_s)
        except KafkaException as e:
            raise KafkaBrokerError(f"broker at {bootstrap} did not answer: {e.args[0]}") from e
        for name, count in list(pending.items()):
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                continue
            if len(topic.partitions) != count:
                raise KafkaBrokerError(f"topic {name!r} exists with {len(topic.partitions)} partitions, not {count}")
            if all(p.leader >= 0 and p.error is None for p in topic.partitions.values()):
                del pending[name]
        if pending:
            time.sleep(0.05)
