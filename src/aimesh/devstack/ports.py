"""Free loopback ports for stacks that must not collide with a running one (tests, parallel runs)."""

from __future__ import annotations

import socket
from collections.abc import Collection


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago on 127.0.0.1."""
    # Every socket stays bound until all ports are picked, so the kernel cannot hand one out twice.
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_block(size: int, *, avoid: Collection[int] = (), attempts: int = 100) -> int:
    """The first of ``size`` consecutive ports that were free a moment ago on 127.0.0.1, none of them in
    ``avoid`` (ports already handed out, say), for a setting that numbers processes from a base port."""
    for _ in range(attempts):
        sockets = [socket.socket()]
        try:
            sockets[0].bind(("127.0.0.1", 0))
            first = int(sockets[0].getsockname()[1])
            block = range(first, first + size)
            if block[-1] > 65535 or any(port in avoid for port in block):
                continue
            for port in block[1:]:
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", port))
            return first
        except OSError:
            continue  # a port of the block is taken: try another block
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports found in {attempts} attempts")
