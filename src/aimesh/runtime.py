"""Process plumbing shared by the services: logging and signal handling, each done once in ``main``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys


def configure_logging(service: str, level: str) -> None:
    """One log line per event on stderr, tagged with the service name."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )


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
