"""``aimesh-stack``: run the whole mesh locally.

aimesh-stack up      start Kafka, Triton, topics, ingest, workers, notifier, gateway; return when healthy
aimesh-stack down    stop what ``up`` started
aimesh-stack demo    up (unless already up), run the demo tasks, stream results, then stop
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .demo import run_demo
from .stack import Stack, StackSettings, read_state, replica_name, stop_from_state, write_state


def say(message: str) -> None:
    print(f"aimesh: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aimesh-stack", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "demo"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = StackSettings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)

    if args.command == "down":
        if not stop_from_state(settings.run_dir, say):
            say("no running stack recorded")
        return 0

    if read_state(settings.run_dir) is not None:
        if args.command == "up":
            say("a stack is already recorded as running; run `make down` first")
            return 1
        say("a stack is already running; running the demo against it")
        state = read_state(settings.run_dir)
        assert state is not None
        if state.gateway_url:
            say(f"the web page of this stack: {state.gateway_url}")
        return 1 if asyncio.run(run_demo(state.ingest_address, state.notifier_address)) else 0

    stack = Stack(settings)
    try:
        stack.start(say=say)
    except BaseException:
        say("start failed; stopping what was started")
        stack.stop()
        raise
    if args.command == "up":
        state = stack.state()
        write_state(settings.run_dir, state)
        for service, addresses in (("ingest", state.ingest_addresses), ("notifier", state.notifier_addresses)):
            for index, address in enumerate(addresses):
                say(f"{replica_name(service, index)} {address}")
        if len(state.ingest_addresses) > 1 or len(state.notifier_addresses) > 1:
            ingest, notifier = ",".join(state.ingest_addresses), ",".join(state.notifier_addresses)
            say(f"the client spreads calls over all: AIMESH_INGEST_ADDRESS={ingest} AIMESH_NOTIFIER_ADDRESS={notifier}")
        say("`make down` stops it")
        if settings.gateway_port:
            say(f"web page and HTTP API: {stack.gateway_url} (API under {stack.gateway_url}/v1)")
        return 0
    if settings.gateway_port:
        say(f"the web page runs at {stack.gateway_url} while the demo does; `make up` keeps it running")
    try:
        failed = asyncio.run(run_demo(stack.ingest_address, stack.notifier_address))
    finally:
        say("stopping the mesh")
        stack.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
