"""Fixtures the client library's tests share: its fakes of ingest and the notifier, served on the test's event
loop (``fakes``, with an ``AsyncClient`` on them) or on a thread of their own for blocking code and the command
(``threaded_fakes``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from client_fakes import FAST, Fakes, ThreadedFakes

from aimesh.client import AsyncClient


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    f = Fakes()
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def client(fakes: Fakes) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(fakes.ingest_address, fakes.notifier_address, retry=FAST, timeout_s=10) as c:
        yield c


@pytest.fixture
def threaded_fakes() -> Iterator[ThreadedFakes]:
    with ThreadedFakes() as f:
        yield f
