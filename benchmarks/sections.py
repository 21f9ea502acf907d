"""The sections of docs/benchmarks.md, in the order the document lists them. ``make bench`` rewrites the measured
ones and keeps the rest (written by hand) in their places; each benchmark module takes its title from here."""

from __future__ import annotations

THROUGHPUT = "Batched throughput: mesh against direct Triton"
BLOG = "The blog design as a baseline"
CELERY = "Celery with Redis as a baseline"
INGEST = "Ingest: SubmitTask rate"
INGEST_REPLICAS = "Ingest replicas: SubmitTask rate of one and of two"
LATENCY = "End-to-end latency, Kafka's floor and the cost of tracing"
LATENCY_SETTINGS = "Latency: where the mesh's own time goes, and what was tried"
TTFT = "Time to first token"
HEAD_OF_LINE = "Fast tasks behind slow ones"
CLUSTER = "Three brokers against one"
ROLLING_RESTART = "Rolling restart of the three-broker cluster"
GATEWAY = "HTTP gateway: Server-Sent Events against WatchTask"
STATE_STORE_CHOICE = "Notifier state store: RocksDB against LMDB"
NOTIFIER_STATE = "Notifier state: memory, GetTask and restart with many retained tasks"
NOTIFIER_STATE_BEFORE = "Notifier state before the on-disk store"
NOTIFIER_REPLICAS = "Notifier replicas: the rate of results taken in, one notifier against three"
PAYLOADS = "Large payloads by reference: 1 MiB tasks against direct Triton"
HISTORY = "History: the measurements behind the design's choices"

ORDER = [
    THROUGHPUT,
    BLOG,
    CELERY,
    INGEST,
    INGEST_REPLICAS,
    LATENCY,
    LATENCY_SETTINGS,  # written by hand: what was tried to cut the mesh's latency
    TTFT,
    HEAD_OF_LINE,
    CLUSTER,
    ROLLING_RESTART,  # written by hand from a fault test: kept beside the cluster benchmark
    GATEWAY,
    STATE_STORE_CHOICE,
    NOTIFIER_STATE,
    NOTIFIER_STATE_BEFORE,  # the same benchmark run on the notifier before its on-disk store: kept by hand
    NOTIFIER_REPLICAS,
    PAYLOADS,
    HISTORY,  # written by hand: the measurements behind the design's choices (docs/design.md)
]
