"""The Kafka adapter's shared reading jobs (assign a topic from a time or its end, a group's committed offsets and
lag), at a fake consumer that answers the librdkafka calls they make from a fixed log; and that every client is built
there."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

from confluent_kafka import OFFSET_END, OFFSET_INVALID, KafkaError, TopicPartition
from confluent_kafka.admin import ClusterMetadata, PartitionMetadata, TopicMetadata

from aimesh import kafka
from aimesh.kafka import GROUP_MEMBER_PROPERTIES, PartitionLag

ROOT = Path(__file__).resolve().parents[2]
Key = tuple[str, int]


class FakeConsumer:
    """Partitions whose records have the given timestamps (ms), from offset ``low`` on, and a group's commits."""

    def __init__(
        self,
        log: dict[Key, list[int]],
        *,
        low: int = 0,
        commits: dict[Key, tuple[int, str]] | None = None,
        broken_topics: frozenset[str] = frozenset(),
    ) -> None:
        self._log = log
        self._low = low
        self._commits = commits or {}
        self._broken = broken_topics
        self.assigned: list[TopicPartition] | None = None
        self.asked_committed: list[Key] = []
        self.watermarks_asked: list[Key] = []

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> ClusterMetadata:
        cluster = ClusterMetadata()
        for name in {t for t, _ in self._log} | self._broken:
            if topic not in (None, name):
                continue
            found = TopicMetadata()
            found.topic = name
            found.partitions = {p: PartitionMetadata() for t, p in self._log if t == name}
            found.error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED) if name in self._broken else None
            cluster.topics[name] = found
        if topic is not None and topic not in cluster.topics:  # librdkafka answers an unknown topic with an error
            missing = TopicMetadata()
            missing.topic, missing.error = topic, KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
            cluster.topics[topic] = missing
        return cluster

    def offsets_for_times(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        found = []
        for tp in partitions:
            stamps = self._log[(tp.topic, tp.partition)]
            first = next((i for i, ms in enumerate(stamps) if ms >= tp.offset), None)
            found.append(TopicPartition(tp.topic, tp.partition, -1 if first is None else self._low + first))
        return found

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        self.asked_committed += [(tp.topic, tp.partition) for tp in partitions]
        answer = []
        for tp in partitions:
            offset, metadata = self._commits.get((tp.topic, tp.partition), (OFFSET_INVALID, ""))
            answer.append(TopicPartition(tp.topic, tp.partition, offset, metadata=metadata))
        return answer

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        assert not cached, "a paused partition's cached watermarks are stale"
        self.watermarks_asked.append((tp.topic, tp.partition))
        return self._low, self._low + len(self._log[(tp.topic, tp.partition)])


def starts(consumer: FakeConsumer) -> dict[Key, int]:
    assert consumer.assigned is not None
    return {(tp.topic, tp.partition): tp.offset for tp in consumer.assigned}


def test_a_topic_is_read_from_the_first_record_at_or_after_a_time_or_its_end_where_none_is() -> None:
    consumer = FakeConsumer({("t", 0): [100, 200, 300], ("t", 1): [150], ("t", 2): [], ("other", 0): [1]}, low=10)
    assigned = kafka.assign_topic(consumer, "t", since_ms=200, timeout_s=1)  # type: ignore[arg-type]
    assert assigned == 3
    assert starts(consumer) == {("t", 0): 11, ("t", 1): OFFSET_END, ("t", 2): OFFSET_END}


def test_a_topic_is_read_from_its_start_or_its_end() -> None:
    log = {("t", 0): [100, 200], ("t", 1): [300]}
    from_start, from_end = FakeConsumer(log, low=5), FakeConsumer(log, low=5)
    kafka.assign_topic(from_start, "t", since_ms=0, timeout_s=1)  # type: ignore[arg-type]
    kafka.assign_topic(from_end, "t", since_ms=None, timeout_s=1)  # type: ignore[arg-type]
    assert starts(from_start) == {("t", 0): 5, ("t", 1): 5}
    assert starts(from_end) == {("t", 0): OFFSET_END, ("t", 1): OFFSET_END}


def test_a_topic_that_is_missing_or_refused_is_not_assigned() -> None:
    consumer = FakeConsumer({("t", 0): [100]}, broken_topics=frozenset({"secret"}))
    for topic in ("missing", "secret"):
        assert kafka.assign_topic(consumer, topic, since_ms=None, timeout_s=1) == 0  # type: ignore[arg-type]
        assert kafka.topic_partitions(consumer, topic, 1) == []  # type: ignore[arg-type]
    assert consumer.assigned is None


def test_offsets_at_a_time_name_the_end_where_nothing_is_that_recent() -> None:
    consumer = FakeConsumer({("a", 0): [10, 20], ("b", 3): [10]})
    found = kafka.offsets_at(consumer, [("a", 0), ("b", 3)], 15, 1)  # type: ignore[arg-type]
    assert found == {("a", 0): 1, ("b", 3): OFFSET_END}
    assert kafka.offsets_at(consumer, [], 15, 1) == {}  # type: ignore[arg-type]


def test_a_groups_lag_counts_from_its_commit_or_the_log_start_where_it_committed_none() -> None:
    log = {("t", 0): [0] * 10, ("t", 1): [0] * 4, ("t", 2): [0] * 7}
    consumer = FakeConsumer(log, low=100, commits={("t", 0): (104, "meta"), ("t", 2): (107, "")})
    lags = kafka.group_lag(consumer, [("t", 0), ("t", 1), ("t", 2)], 1)  # type: ignore[arg-type]
    assert lags == {
        ("t", 0): PartitionLag(committed=104, metadata="meta", low=100, high=110),
        ("t", 1): PartitionLag(committed=-1, metadata="", low=100, high=104),
        ("t", 2): PartitionLag(committed=107, metadata="", low=100, high=107),
    }
    assert [lag.records for lag in lags.values()] == [6, 4, 0]
    assert [lag.position for lag in lags.values()] == [104, 100, 107]


def test_a_groups_lag_asks_only_for_the_commits_it_does_not_know() -> None:
    consumer = FakeConsumer({("t", 0): [0] * 10, ("t", 1): [0] * 10}, commits={("t", 1): (3, "")})
    lags = kafka.group_lag(consumer, [("t", 0), ("t", 1)], 1, known={("t", 0): 8})  # type: ignore[arg-type]
    assert consumer.asked_committed == [("t", 1)]
    assert {key: lag.records for key, lag in lags.items()} == {("t", 0): 2, ("t", 1): 7}


def test_a_groups_lag_stops_asking_once_told_to_stop() -> None:
    consumer = FakeConsumer({("t", 0): [0], ("t", 1): [0]})
    stop = threading.Event()
    stop.set()
    assert kafka.group_lag(consumer, [("t", 0), ("t", 1)], 1, stop=stop) == {}  # type: ignore[arg-type]
    assert consumer.watermarks_asked == []


def test_a_groups_committed_offsets_come_with_their_metadata_where_it_committed_one() -> None:
    consumer = FakeConsumer(
        {("t", 0): [], ("t", 1): [], ("t", 2): []}, commits={("t", 0): (4, "a:1"), ("t", 2): (0, "")}
    )
    found = kafka.committed(consumer, [("t", 0), ("t", 1), ("t", 2)], 1)  # type: ignore[arg-type]
    assert found == {("t", 0): (4, "a:1"), ("t", 2): (0, "")}
    assert kafka.committed(consumer, [], 1) == {}  # type: ignore[arg-type]
    assert consumer.asked_committed == [("t", 0), ("t", 1), ("t", 2)]  # one request, none for no partitions


def test_a_helper_clients_id_extends_its_parts_own() -> None:
    assert (
        kafka.client_id_for({"client.id": "aimesh-worker-3"}, "lag", default="aimesh-worker") == "aimesh-worker-3-lag"
    )
    assert kafka.client_id_for({}, "duplicates", default="aimesh-worker") == "aimesh-worker-duplicates"


def test_a_reader_never_joins_its_group_nor_commits() -> None:
    member = kafka.consumer_config("b:9092", group_id="g", client_id="c", group_protocol="classic")
    reader = kafka.reader_config(member, group_id="other")
    assert not set(GROUP_MEMBER_PROPERTIES) & reader.keys()
    assert reader["group.id"] == "other" and reader["client.id"] == "c"
    assert reader["enable.auto.commit"] is False and reader["enable.auto.offset.store"] is False
    assert kafka.reader_config({"group.id": "g"})["group.id"] == "g"


def _client_constructions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = ("Consumer", "Producer", "AdminClient")
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) in names or getattr(node.func, "attr", None) in names)
    ]


def test_every_kafka_client_is_built_by_the_adapter() -> None:
    # The services' clients and the local stack's alike (the benchmarks build bare ones on purpose).
    adapter = ROOT / "src/aimesh/kafka.py"
    sources = [*(ROOT / "src").rglob("*.py"), *(ROOT / "services").rglob("*.py")]
    elsewhere = [site for path in sources if path != adapter for site in _client_constructions(path)]
    assert elsewhere == []
    assert _client_constructions(adapter)  # the check sees a construction where there is one
