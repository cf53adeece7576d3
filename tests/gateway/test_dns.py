"""A host name whose DNS hangs holds up its own lookups only (gateway.dns)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.dns import PER_NAME
from tests.support.daemon import running_daemon, write_config

STUCK = "stuck.example"


@pytest.fixture
def stuck_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``STUCK`` never resolves (until the test ends); ``localhost`` does."""
    real = socket.getaddrinfo
    released = threading.Event()

    def getaddrinfo(
        host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        # trio first tries every name as a number, in the calling thread: no wait there.
        if host in (STUCK, STUCK.encode()) and not flags & socket.AI_NUMERICHOST:
            released.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "stuck")
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    released.set()


async def test_a_stuck_name_holds_up_neither_other_names_nor_threads(
    stuck_dns: None, tmp_path: Path
) -> None:
    # trio's lookups share its 40-thread default limiter with every to_thread call, and one
    # given up at its deadline keeps its thread: 48 tries of a stuck name (a topic retrying)
    # left no thread for `localhost`, nor for the SQLite store's shutdown.
    queue = "queue: q\ntopics:\n  t: {backend: 'http://127.0.0.1:9/', paused: true}\n"
    async with running_daemon(write_config(tmp_path, {"q": queue})):

        async def give_up_on_stuck() -> None:
            with trio.move_on_after(0.1):
                await trio.socket.getaddrinfo(STUCK, 80)

        async with trio.open_nursery() as nursery:
            for _ in range(48):
                nursery.start_soon(give_up_on_stuck)
        with trio.fail_after(2):
            await trio.to_thread.run_sync(lambda: None)
            assert await trio.socket.getaddrinfo("localhost", 80)
        # The stuck name itself waits for one of its own PER_NAME threads.
        with trio.move_on_after(0.3) as waited:
            await trio.socket.getaddrinfo(STUCK, 80)
        assert waited.cancelled_caught and PER_NAME < 48
