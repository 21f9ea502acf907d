"""Process plumbing shared by the services: logging and signal handling, each done once in ``main``."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TextIO, TypeVar

from pythonjsonlogger.json import JsonFormatter

from aimesh import tracing
from aimesh.errors import AimeshError
from aimesh.settings import KafkaSettings

S = TypeVar("S", bound=KafkaSettings)

# The exit status of a service one of whose components died: non-zero, so an orchestrator restarts it.
EXIT_COMPONENT_DIED = 1

# The task a log line is about. Each asyncio task runs in its own copy of the context, so setting it while
# handling one task never leaks into another.
task_id_var: ContextVar[str | None] = ContextVar("aimesh_task_id", default=None)


class _ContextFilter(logging.Filter):
    """Adds the service name, the current task id and the current trace and span ids to every record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self._service
        record.task_id = task_id_var.get()
        ids = tracing.trace_ids()
        record.trace_id, record.span_id = ids if ids else (None, None)
        return True


class _TextFormatter(logging.Formatter):
    """The terminal form: one readable line, with the task id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        task_id = getattr(record, "task_id", None)
        return f"{line} [task {task_id}]" if task_id else line


def configure_logging(service: str, level: str, log_format: str = "auto", stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr): JSON objects, one per line (``json``), or readable text (``text``); ``auto``
    picks text on a terminal and JSON otherwise. Lines never carry task payloads (inputs may be private)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.addFilter(_ContextFilter(service))
    as_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    if as_json:
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{service}{name}{message}{task_id}{trace_id}{span_id}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(_TextFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def run_service(service: str, settings: S, serve: Callable[[S, asyncio.Event], Awaitable[object]]) -> None:
    """A service's ``main``: logging and tracing from its settings, ``serve`` until SIGTERM or SIGINT, then
    export the spans still buffered."""
    configure_logging(service, settings.log_level, settings.log_format)
    tracing.configure(f"aimesh-{service}")
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a stuck service is.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    async def run() -> None:
        await serve(settings, stop_event_on_signals())

    try:
        asyncio.run(run())
    except ComponentDied as e:
        logging.getLogger(__name__).critical("%s: exiting with status %d", e, EXIT_COMPONENT_DIED)
        sys.exit(EXIT_COMPONENT_DIED)
    finally:
        tracing.shutdown()


class ComponentDied(AimeshError):
    """A long-lived part of a service (a Kafka reader thread, a poll loop) ended while the service ran."""

    def __init__(self, component: str, cause: BaseException) -> None:
        super().__init__(f"{component} died: {cause!r}")
        self.component = component
        self.__cause__ = cause


class Lifeline:
    """Where a service's long-lived components report that they died, from any thread.

    The service waits with ``wait_for`` instead of waiting on its stop event alone: the first death raises
    ``ComponentDied`` there, the service turns its health NOT_SERVING and stops what it started, and
    ``run_service`` exits with a non-zero status so that an orchestrator restarts it. Create it in the
    event loop; ``report`` matches ``background.OnDeath``.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._died = asyncio.Event()
        self.death: ComponentDied | None = None

    def report(self, component: str, error: BaseException) -> None:
        """Record that ``component`` died of ``error``; safe to call from any thread, and after the loop ended."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service has ended already
            self._loop.call_soon_threadsafe(self._record, component, error)

    async def wait_for(self, *events: asyncio.Event) -> None:
        """Return once any of ``events`` is set; raise ``ComponentDied`` if a component died first (or had)."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._died, *events)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self.death is not None:
            raise self.death

    def _record(self, component: str, error: BaseException) -> None:
        if self.death is None:
            self.death = ComponentDied(component, error)
            logging.getLogger(__name__).error("%s", self.death)
            self._died.set()


def stop_event_on_signals() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT. A second signal exits at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logging.getLogger(__name__).warning("second %s: exiting now", signal.Signals(signum).name)
            sys.exit(128 + signum)
        logging.getLogger(__name__).info("%s received: stopping gracefully", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop
