"""A real Apache Kafka (KRaft) for tests and the dev stack: one node, or a cluster of several on one machine.

The broker runs from Maven Central jars (``deploy/kafka/pom.xml``), no Docker and no tarball: `ensure_kafka_jars`
fetches the classpath once into a cache folder, `KafkaBroker` formats storage and runs ``kafka.Kafka`` on it.
Storage is formatted only once per data folder, so a broker stopped or killed and started again keeps its records.

`KafkaCluster` runs one such node (the quick start's single broker, unchanged) or several. Every node of a cluster
is both a broker and a controller (combined mode), and the controllers are a static quorum of all the nodes
(``controller.quorum.voters``): three JVMs rather than the six of a production layout with dedicated controllers
(Strimzi's ``kafka-persistent`` example), on a machine of two cores. What that changes: a node lost is a broker and a
voter lost, so with two of three nodes down there is no controller either, and a write waits (then times out)
instead of failing at once with NOT_ENOUGH_REPLICAS as it would where controllers run apart and fence the dead
brokers. With three nodes every topic, the internal ones included, has three replicas, two of which must hold a
record before it is acknowledged (``acks=all``), as users run Kafka.

Each part lives in a module of its own (``kafka_jars``, ``kafka_broker``, ``kafka_cluster``, ``kafka_topics``);
this one gathers them.
"""

from __future__ import annotations

from .kafka_broker import DEFAULT_LOG4J_CONFIG, KafkaBroker, KafkaBrokerError, replication_for
from .kafka_cluster import KafkaCluster, coordinator_partition
from .kafka_jars import DEFAULT_POM, ensure_kafka_jars
from .kafka_topics import create_topics

__all__ = [
    "DEFAULT_LOG4J_CONFIG",
    "DEFAULT_POM",
    "KafkaBroker",
    "KafkaBrokerError",
    "KafkaCluster",
    "coordinator_partition",
    "create_topics",
    "ensure_kafka_jars",
    "replication_for",
]
