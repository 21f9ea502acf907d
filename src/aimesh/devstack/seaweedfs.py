"""A real S3-compatible object store for the local stack and the tests: SeaweedFS's ``weed server -s3`` (Apache-2.0),
built from the Go module proxy by ``make tools`` into ``.cache/bin/weed`` (deploy/seaweedfs).

One process runs SeaweedFS's master, volume server, filer and S3 gateway, all bound to 127.0.0.1: the S3 API on the
stack's ``object_store_port``, the others on free ports picked once, so a restart finds its data where it left it.
No identities are configured, so the S3 gateway accepts any credentials; the services get dummy ones
(``DEV_CREDENTIALS``) through the standard ``AWS_*`` variables, as they would get real ones in production.

``ObjectStoreParts`` is the part of ``Stack`` that runs it: started beside Kafka, ready (bucket created) before the
services start, stopped last, and stopped and started again by the fault tests (``stop_object_store``,
``start_object_store``).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from aimesh.errors import AimeshError
from aimesh.objects import ObjectStore, ObjectStoreError

from .process import Launched, log_tail
from .stack_settings import StackSettings

# The S3 gateway checks no signature while no identity is configured; boto3 still needs some credentials to sign.
DEV_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "aimesh-dev", "AWS_SECRET_ACCESS_KEY": "aimesh-dev-secret"}
DEFAULT_BUCKET = "aimesh"
# The master, volume server and filer, each with an HTTP and a gRPC port, and the S3 gateway's gRPC port.
INTERNAL_PORTS = 7
# Written and read back to tell that the store serves (outside the inputs/ and outputs/ of aimesh.objects).
_PROBE_KEY = "readiness-probe"


class ObjectStoreServerError(AimeshError, RuntimeError):
    """The development object store is not built, did not become ready, or is not running."""


def weed_binary(cache_dir: Path) -> Path:
    """The ``weed`` binary ``make tools`` builds into ``<cache_dir>/bin``, else one on PATH."""
    built = cache_dir / "bin" / "weed"
    if built.is_file():
        return built
    found = shutil.which("weed")
    if found is None:
        raise ObjectStoreServerError(f"SeaweedFS's weed binary is missing ({built}): run `make tools` to build it")
    return Path(found)


def object_store_env(s3_port: int, bucket: str = DEFAULT_BUCKET) -> dict[str, str]:
    """What a service needs to use the local store on ``s3_port``: its endpoint and bucket, and credentials."""
    return {
        "AIMESH_OBJECT_STORE_URL": f"http://127.0.0.1:{s3_port}",
        "AIMESH_OBJECT_STORE_BUCKET": bucket,
        **DEV_CREDENTIALS,
        # No credentials lookup on a cloud metadata endpoint that is not there.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class WeedServer(Launched):
    """``weed server -s3`` on 127.0.0.1 with its data in ``data_dir``; ``wait_ready`` returns once the S3 API
    answers and ``bucket`` exists."""

    def __init__(
        self,
        *,
        binary: Path,
        data_dir: Path,
        s3_port: int,
        internal_ports: Sequence[int],
        log_dir: Path,
        bucket: str = DEFAULT_BUCKET,
        ready_timeout_s: float = 60.0,
    ) -> None:
        if len(internal_ports) != INTERNAL_PORTS:
            raise ValueError(f"weed server needs {INTERNAL_PORTS} internal ports, not {len(internal_ports)}")
        self._binary = binary
        self._data_dir = data_dir
        self.s3_port = s3_port
        self._ports = list(internal_ports)
        self.log_path = log_dir / "objectstore.log"
        self.bucket = bucket
        self.ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running server; None before ``start`` and after ``stop`` or ``kill``."""
        return self._process.pid if self._process is not None else None

    def store(
        self, *, connect_timeout_s: float = 2.0, read_timeout_s: float = 30.0, max_attempts: int = 3
    ) -> ObjectStore:
        """A client of this server's bucket with the dev credentials."""
        return ObjectStore(
            self.endpoint_url,
            bucket=self.bucket,
            credentials=DEV_CREDENTIALS,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_attempts=max_attempts,
        )

    def command(self) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc = self._ports
        return [
            str(self._binary),
            "server",
            f"-dir={self._data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            # One master: no Raft quorum to wait for, which after a restart with saved state takes half a minute.
            "-master.peers=none",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={s3_grpc}",
            # No 10 s pause between the volume server's last heartbeat and its exit: no other master needs warning.
            "-volume.preStopSeconds=0",
            # The Iceberg and Lance catalogs the S3 gateway also serves would take fixed ports (8181, 9101).
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def start(self) -> None:
        """Launch the server without waiting for it. Raises ObjectStoreServerError if it runs or is not built."""
        if self._process is not None and self._process.poll() is None:
            raise ObjectStoreServerError(f"weed server already running as pid {self._process.pid}")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                cwd=self._data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl+C meant for the caller does not reach it
            )

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the S3 API answers, the bucket exists (created here if it is missing) and an object can be
        written and read back: the first write grows the bucket's volumes, a few seconds kept out of the first
        caller's time, and after a restart a read waits for the master to learn its volumes again."""
        process = self._process
        if process is None:
            raise ObjectStoreServerError("wait_ready() called before start()")
        store = self.store(connect_timeout_s=1.0, read_timeout_s=5.0, max_attempts=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if process.poll() is not None:
                    raise ObjectStoreServerError(
                        f"weed server exited with {process.returncode} during start-up:\n{log_tail(self.log_path)}"
                    )
                try:
                    _round_trip(store)
                    return
                except ObjectStoreError as e:
                    if time.monotonic() > deadline:
                        raise ObjectStoreServerError(
                            f"weed server not ready after {timeout_s:.0f} s ({e}):\n{log_tail(self.log_path)}"
                        ) from e
                time.sleep(0.25)
        finally:
            store.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; waits for the exit. Idempotent.

        The wait is short on purpose: weed stops its volume server before its filer, whose last metadata-log flush
        then waits 15 s for a volume that is gone and is dropped anyway. Objects and their metadata are written
        through at each request, so a kill loses nothing a restart needs."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would, and reap it."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def _round_trip(store: ObjectStore) -> None:
    store.ensure_bucket()
    probe = store.put(_PROBE_KEY, b"ready")
    store.get(probe)
    store.delete(_PROBE_KEY)


class ObjectStoreParts:
    """The object store of a ``Stack`` (a mixin): ``object_store`` is None before ``start`` and in a stack whose
    ``object_store_port`` is 0."""

    settings: StackSettings
    log_dir: Path
    object_store: WeedServer | None
    _object_store_ports: list[int]

    @property
    def object_store_url(self) -> str:
        """The S3 endpoint of the stack's object store; empty for a stack without one."""
        return f"http://127.0.0.1:{self.settings.object_store_port}" if self.settings.object_store_port else ""

    def object_store_client(self) -> ObjectStore:
        """A client of the stack's bucket, with the credentials the services get (tests)."""
        return self._require_object_store().store()

    def _launch_object_store(self, say: Callable[[str], None]) -> None:
        """Start the object store (without waiting), unless the stack runs none."""
        s = self.settings
        if not s.object_store_port:
            return
        binary = weed_binary(s.cache_dir)
        say(f"starting the object store (SeaweedFS) on {self.object_store_url}")
        self.object_store = WeedServer(
            binary=binary,
            data_dir=s.run_dir / "objectstore",
            s3_port=s.object_store_port,
            internal_ports=self._object_store_ports,
            log_dir=self.log_dir,
        )
        self.object_store.start()

    def _object_store_ready(self) -> None:
        if self.object_store is not None:
            self.object_store.wait_ready(self.settings.ready_timeout_s)

    def stop_object_store(self, *, kill: bool = False) -> None:
        """Stop the object store: gracefully, or with ``kill`` as a crash (SIGKILL). Its data stays. A no-op in a
        stack without one."""
        if self.object_store is not None:
            if kill:
                self.object_store.kill()
            else:
                self.object_store.stop()

    def start_object_store(self, *, wait: bool = True) -> None:
        """Start the object store again on the same ports and data; with ``wait``, return once S3 answers."""
        store = self._require_object_store()
        store.start()
        if wait:
            store.wait_ready(self.settings.ready_timeout_s)

    def _require_object_store(self) -> WeedServer:
        if self.object_store is None:
            raise ObjectStoreServerError("this stack runs no object store (not started, or object_store_port 0)")
        return self.object_store
