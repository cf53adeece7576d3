"""Readiness: one edge-triggered epoll waking the task that waits on each socket."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from fastcgi.readiness import Readiness


@asynccontextmanager
async def running() -> AsyncIterator[Readiness]:
    readiness = Readiness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(readiness.run)
        yield readiness
        nursery.cancel_scope.cancel()


def pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


async def test_a_wait_ends_when_data_arrives() -> None:
    ours, theirs = pair()
    with ours, theirs:
        async with running() as readiness:
            readiness.register(ours)
            woke = trio.Event()

            async def wait() -> None:
                await readiness.wait_readable(ours.fileno())
                woke.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                assert not woke.is_set()
                theirs.send(b"ping")
                with trio.fail_after(2):
                    await woke.wait()
            assert ours.recv(100) == b"ping"


async def test_data_that_arrived_while_nobody_waited_is_not_missed() -> None:
    # Edge-triggered: the event comes once, while the connection's task is busy elsewhere.
    ours, theirs = pair()
    with ours, theirs:
        async with running() as readiness:
            readiness.register(ours)
            await trio.testing.wait_all_tasks_blocked()
            theirs.send(b"early")
            await trio.testing.wait_all_tasks_blocked()  # run() has taken the event
            with trio.fail_after(2):
                await readiness.wait_readable(ours.fileno())
            assert ours.recv(100) == b"early"
            # Drained: the next wait lasts until the next arrival, or EOF.
            theirs.close()
            with trio.fail_after(2):
                await readiness.wait_readable(ours.fileno())
            assert ours.recv(100) == b""


async def test_a_cancelled_wait_leaves_nothing_behind() -> None:
    ours, theirs = pair()
    with ours, theirs:
        async with running() as readiness:
            readiness.register(ours)
            with trio.move_on_after(0.05) as scope:
                await readiness.wait_readable(ours.fileno())
            assert scope.cancelled_caught
            theirs.send(b"after")
            with trio.fail_after(2):
                await readiness.wait_readable(ours.fileno())
            assert ours.recv(100) == b"after"


async def test_unregistering_wakes_the_waiter_with_an_error() -> None:
    ours, theirs = pair()
    with ours, theirs:
        async with running() as readiness:
            readiness.register(ours)

            async def wait() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await readiness.wait_readable(ours.fileno())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                readiness.unregister(ours)
            readiness.unregister(ours)  # twice, or never registered: nothing to do


async def test_many_sockets_ready_at_once_each_wake_their_task() -> None:
    pairs = [pair() for _ in range(50)]
    try:
        async with running() as readiness:
            got: list[bytes] = []

            async def read(ours: socket.socket) -> None:
                await readiness.wait_readable(ours.fileno())
                got.append(ours.recv(100))

            async with trio.open_nursery() as nursery:
                for ours, _ in pairs:
                    readiness.register(ours)
                    nursery.start_soon(read, ours)
                await trio.testing.wait_all_tasks_blocked()
                for n, (_, theirs) in enumerate(pairs):
                    theirs.send(b"%d" % n)
            assert sorted(got) == sorted(b"%d" % n for n in range(50))
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


async def test_the_end_that_came_with_the_last_data_is_not_missed() -> None:
    # `printf 'PING\r\n' | nc -N`: data and FIN arrive before we read, in one event; the
    # read returns the data, short, and there is no event to come for the end.
    ours, theirs = pair()
    with ours, theirs:
        async with running() as readiness:
            readiness.register(ours)
            theirs.send(b"last words")
            theirs.shutdown(socket.SHUT_WR)
            with trio.fail_after(2):
                await readiness.wait_readable(ours.fileno())
            assert ours.recv(100) == b"last words"
            with trio.fail_after(2):
                await readiness.wait_readable(ours.fileno())
            assert ours.recv(100) == b""
