"""A real single-node Apache Kafka broker (KRaft, combined broker and controller) for tests and the dev stack.

The broker runs from Maven Central jars (``deploy/kafka/pom.xml``), no Docker and no tarball: `ensure_kafka_jars`
fetches the classpath once into a cache folder, `KafkaBroker` formats storage and runs ``kafka.Kafka`` on it.
Storage is formatted only once per data folder, so a broker stopped or killed and started again keeps its records.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import shutil
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from types import TracebackType
from typing import Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

# The dev stack runs from a checkout: the POM and log4j config live in the repository, not in the package.
_DEPLOY_DIR = Path(__file__).resolve().parents[3] / "deploy" / "kafka"
DEFAULT_POM = _DEPLOY_DIR / "pom.xml"
DEFAULT_LOG4J_CONFIG = _DEPLOY_DIR / "log4j2.properties"

_NODE_ID = 1
_TAIL_BYTES = 4000


class KafkaBrokerError(RuntimeError):
    """The development broker, or fetching or preparing what it runs on, failed."""


def ensure_kafka_jars(cache_dir: Path, *, pom: Path = DEFAULT_POM, timeout_s: float = 600.0) -> Path:
    """Return a folder holding the broker's classpath jars, fetching them with Maven only on the first call.

    The folder is keyed by the pinned Kafka version and a digest of the POM, so editing the POM fetches afresh.
    A marker file written after Maven succeeds makes later calls a few file checks; an interrupted fetch leaves
    no marker and is redone. Concurrent callers (several test processes) serialise on a lock file.

    Raises:
        KafkaBrokerError: Maven is missing, failed (the message ends with its output) or ran past ``timeout_s``.
    """
    pom_bytes = pom.read_bytes()
    digest = hashlib.sha256(pom_bytes).hexdigest()[:12]
    version_dir = cache_dir / f"kafka-{_pinned_kafka_version(pom_bytes)}-{digest}"
    lib_dir = version_dir / "lib"
    marker = version_dir / ".complete"
    if marker.exists():
        return lib_dir
    version_dir.mkdir(parents=True, exist_ok=True)
    with (version_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return lib_dir
        # A fetch killed half-way leaves truncated jars that copy-dependencies would keep.
        shutil.rmtree(lib_dir, ignore_errors=True)
        command = [
            "mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={lib_dir}",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            )
        except FileNotFoundError as e:
            raise KafkaBrokerError("mvn is not on PATH; it fetches the Kafka broker jars") from e
        except subprocess.TimeoutExpired as e:
            raise KafkaBrokerError(
                f"mvn ran past {timeout_s:.0f} s fetching the Kafka jars:\n{_tail_text(e.stdout)}"
            ) from e
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"mvn exited with {result.returncode} fetching the Kafka jars:\n{_tail_text(result.stdout)}"
            )
        marker.write_text(" ".join(command) + "\n")
    return lib_dir


class KafkaBroker:
    """One Kafka 4.x node acting as broker and controller, listening on 127.0.0.1.

    ``data_dir`` holds ``server.properties`` and the log segments; it survives `stop` and `kill`, so starting
    again on the same folder brings the same topics and records back. ``log_dir`` gets ``server.log``
    (log4j) and ``kafka.out`` (the JVM's stdout and stderr, where start-up failures land).
    """

    #: How long the ``with`` form waits for the broker to answer metadata requests.
    ready_timeout_s: float = 60.0

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int,
        controller_port: int,
        lib_dir: Path,
        log_dir: Path,
        heap_mb: int = 512,
        log4j_config: Path = DEFAULT_LOG4J_CONFIG,
    ) -> None:
        self._data_dir = data_dir.resolve()
        self._port = port
        self._controller_port = controller_port
        self._lib_dir = lib_dir.resolve()
        self._log_dir = log_dir.resolve()
        self._heap_mb = heap_mb
        self._log4j_config = log4j_config.resolve()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` value for clients of this broker."""
        return f"127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running broker JVM; None before `start` and after `stop` or `kill`."""
        return self._process.pid if self._process is not None else None

    @property
    def _segments_dir(self) -> Path:
        return self._data_dir / "kraft-logs"

    def start(self) -> None:
        """Write the configuration, format storage on first use, and launch the JVM without waiting for it.

        Raises:
            KafkaBrokerError: already started, or formatting storage failed.
        """
        if self._process is not None and self._process.poll() is None:
            raise KafkaBrokerError(f"broker already running as pid {self._process.pid}")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        config = self._data_dir / "server.properties"
        config.write_text(self._server_properties())
        if not (self._segments_dir / "meta.properties").exists():
            self._format_storage(config)
        with (self._log_dir / "kafka.out").open("ab") as out:
            self._process = subprocess.Popen(
                [*self._java_command(), "kafka.Kafka", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own session keeps a Ctrl+C meant for the test runner from reaching the broker mid-test.
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the broker is registered, unfenced and answering metadata requests.

        Raises:
            KafkaBrokerError: not started, the JVM exited, or ``timeout_s`` passed (the message ends with the log tail).
        """
        if self._process is None:
            raise KafkaBrokerError("wait_ready() called before start()")
        admin = AdminClient(
            {
                "bootstrap.servers": self.bootstrap,
                "reconnect.backoff.ms": 50,
                "reconnect.backoff.max.ms": 200,
                # Refused connections are expected until the broker listens; librdkafka would print each one to
                # stderr. A broker that never comes up is reported below with its own log instead.
                "log_level": 0,
            }
        )
        deadline = time.monotonic() + timeout_s
        while True:
            returncode = self._process.poll()
            if returncode is not None:
                raise KafkaBrokerError(f"broker exited with {returncode} during start-up\n{self._log_tail()}")
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise KafkaBrokerError(f"broker not ready after {timeout_s:.0f} s\n{self._log_tail()}")
            try:
                metadata = admin.list_topics(timeout=min(1.0, remaining_s))
            except KafkaException:
                metadata = None  # Not listening yet.
            # A fenced broker answers metadata requests but lists no brokers and cannot host partitions.
            if metadata is not None and _NODE_ID in metadata.brokers:
                return
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut the broker down cleanly (SIGTERM), or SIGKILL it after ``timeout_s``; waits for the exit.

        Idempotent, and a no-op on a broker never started.
        """
        process = self._process
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would, and reap it.

        Acknowledged records survive: the broker does not fsync per record, but what it wrote sits in the OS page
        cache, which outlives the process (only a machine crash could lose it).
        """
        process = self._process
        if process is None:
            return
        process.send_signal(signal.SIGKILL)
        process.wait()
        self._process = None

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _server_properties(self) -> str:
        controller = f"127.0.0.1:{self._controller_port}"
        listeners = f"PLAINTEXT://{self.bootstrap},CONTROLLER://{controller}"
        settings = {
            "process.roles": "broker,controller",
            "node.id": _NODE_ID,
            "controller.quorum.bootstrap.servers": controller,
            "listeners": listeners,
            "advertised.listeners": listeners,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": self._segments_dir,
            "num.partitions": 1,
            "auto.create.topics.enable": "false",
            # One node: every internal topic must fit on one replica.
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            # The workers' group uses the consumer rebalance protocol (KIP-848), whose timing the broker sets. The
            # defaults (45 s session, 5 s heartbeat) make a crashed worker's partitions wait 45 s for a new owner and
            # a joining worker wait several heartbeats for its share; these match the classic settings aimesh used.
            "group.consumer.min.session.timeout.ms": 6000,
            "group.consumer.session.timeout.ms": 10000,
            "group.consumer.min.heartbeat.interval.ms": 500,
            "group.consumer.heartbeat.interval.ms": 1000,
            # The defaults (50 each) make the first consumer group and the first transactional producer wait for 50
            # partitions to be created and loaded, and every restart reload them; one is plenty on one node.
            "offsets.topic.num.partitions": 1,
            "transaction.state.log.num.partitions": 1,
            # A controlled shutdown moves partition leadership to other replicas first; one node has none, so its
            # partitions go leaderless while it still runs, and the transaction coordinator then skips the COMMIT
            # markers it is writing for transactions whose commit it has already acknowledged ("Couldn't find leader
            # endpoint ... likely deleted"). Those records hang until the producer's next marker, and are lost if
            # that one is an abort (seen in the broker-outage fault test). Without it, an unfinished commit is
            # finished on restart from the transaction log.
            "controlled.shutdown.enable": "false",
            # After a kill the restarted node's registration is refused (DUPLICATE_BROKER_REGISTRATION) until its
            # previous session expires, so the session timeout is the restart delay in fault tests (default 9 s).
            # It stays well above the heartbeat so a busy machine does not fence the only broker.
            "broker.heartbeat.interval.ms": 500,
            "broker.session.timeout.ms": 4000,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _java_command(self) -> list[str]:
        return [
            "java",
            # The whole heap from the start, touched at once, as Kafka's operations guide runs brokers (-Xms equal
            # to -Xmx): a heap that grows in steps reads as a leak in the soak's memory samples (docs/soak.md).
            f"-Xms{self._heap_mb}m",
            f"-Xmx{self._heap_mb}m",
            "-XX:+AlwaysPreTouch",
            # The client compiler only: a dev or test broker lives minutes, and on a 2-core machine C2's compiler
            # thread took a third of a core for all of a benchmark round (measured after 15,000 tasks), more
            # than the broker's C1-compiled code loses in speed.
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._log4j_config}",
            f"-Dkafka.logs.dir={self._log_dir}",
            "-cp",
            f"{self._lib_dir}/*",
        ]

    def _format_storage(self, config: Path) -> None:
        command = [
            *self._java_command(),
            "kafka.tools.StorageTool", "format", "--standalone", "-t", _random_cluster_id(), "-c", str(config),
        ]  # fmt: skip
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"formatting {self._segments_dir} failed ({result.returncode}):\n{_tail_text(result.stdout)}"
            )

    def _log_tail(self) -> str:
        parts = []
        for path in (self._log_dir / "kafka.out", self._log_dir / "server.log"):
            if path.exists():
                parts.append(f"--- tail of {path} ---\n{_tail_text(_read_tail(path))}")
        return "\n".join(parts) or f"(no log files in {self._log_dir})"


def create_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 30.0) -> None:
    """Create ``topics`` (name to partition count, replication factor 1) and wait until every partition has a leader.

    A topic that already exists with the requested partition count is accepted as it is.

    Raises:
        KafkaBrokerError: creation failed, a topic exists with another partition count, or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=count, replication_factor=1) for name, count in topics.items()],
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


def _pinned_kafka_version(pom_bytes: bytes) -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ET.fromstring(pom_bytes).findtext("m:properties/m:kafka.version", namespaces=ns)
    if not version:
        raise KafkaBrokerError("the Kafka POM has no <kafka.version> property")
    return version.strip()


def _random_cluster_id() -> str:
    # Same shape as Kafka's Uuid.randomUuid(): 16 random bytes, URL-safe base64 without padding; Kafka also
    # rejects ids starting with "-" because its command-line tools would read them as options.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _read_tail(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        return f.read()


def _tail_text(output: bytes | None) -> str:
    return (output or b"")[-_TAIL_BYTES:].decode(errors="replace")
