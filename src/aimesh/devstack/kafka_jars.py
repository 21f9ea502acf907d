"""The broker's classpath: Maven Central jars named by ``deploy/kafka/pom.xml``, fetched once into a cache."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from .kafka_broker import DEPLOY_DIR, KafkaBrokerError, tail_text

DEFAULT_POM = DEPLOY_DIR / "pom.xml"


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
                f"mvn ran past {timeout_s:.0f} s fetching the Kafka jars:\n{tail_text(e.stdout)}"
            ) from e
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"mvn exited with {result.returncode} fetching the Kafka jars:\n{tail_text(result.stdout)}"
            )
        marker.write_text(" ".join(command) + "\n")
    return lib_dir


def _pinned_kafka_version(pom_bytes: bytes) -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ET.fromstring(pom_bytes).findtext("m:properties/m:kafka.version", namespaces=ns)
    if not version:
        raise KafkaBrokerError("the Kafka POM has no <kafka.version> property")
    return version.strip()
