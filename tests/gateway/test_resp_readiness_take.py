"""Pushes taken by the readiness task: a producer whose task waits for commands has its
pushes read, checked and handed to the store call under way by the task that watches the
sockets (``RespServer._take``), without a task step of its own; anything else wakes it.

The store is the real SQLite store, held at a gate (``GatedPushes``) so that a store call is
under way for as long as a test needs.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.app import App
from gateway.resp import encode_command
from gateway.resp_server import RespServer
from tests.gateway.test_group_commit import GatedPushes, a_store_call_under_way, nothing_to_read
from tests.gateway.test_producer_protocol import QUEUES, Client, CountingPushes
from tests.support.daemon import running_daemon, write_config


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


class ConnectionSteps(trio.abc.Instrument):
    """Counts the task steps of producer connections' tasks (``trio.serve_listeners`` runs
    each in a task of its own, with ``RespServer._serve`` as its handler)."""

    def __init__(self) -> None:
        self.steps = 0
        self.tasks: set[trio.lowlevel.Task] = set()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        frame = getattr(task.coro, "cr_frame", None)
        handler = frame.f_locals.get("handler") if frame is not None else None
        if getattr(handler, "__func__", None) is RespServer._serve:
            self.steps += 1
            self.tasks.add(task)


async def steps_while(app: App, pushes: GatedPushes, client: Client, data: bytes) -> int:
    """Send ``data`` from ``client`` while the store call is held; the connection tasks'
    steps until everything is parked again."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    steps = ConnectionSteps()
    trio.lowlevel.add_instrument(steps)
    try:
        await client.stream.send_all(data)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    finally:
        trio.lowlevel.remove_instrument(steps)
    return steps.steps


async def test_a_push_joining_the_store_call_under_way_does_not_wake_its_task(app: App) -> None:
    pushes, first, second = await a_store_call_under_way(app)
    third = await Client.connect(app)
    data = encode_command("LPUSH", "held", "b")
    assert await steps_while(app, pushes, second, data) == 0
    assert await steps_while(app, pushes, third, encode_command("RPUSH", "held", "c", "d")) == 0
    assert await nothing_to_read(second)  # no ack before the store has the job
    pushes.gate.set()
    with trio.fail_after(5):
        assert await first.line() == b":1"
        assert await second.line() == b":1"
        assert await third.line() == b":2"
    assert pushes.calls == [[b"a"], [b"b", b"c", b"d"]]  # both joined the next call
    assert await second.call("LLEN", "held") == b":4"
    assert app.resp is not None
    stats = app.resp.statistics()
    assert (stats.commands_total, stats.errors_total) == (4, 0)


async def test_a_refused_push_is_answered_by_the_readiness_task(app: App) -> None:
    pushes, first, second = await a_store_call_under_way(app)
    data = encode_command("LPUSH", "nowhere", "x")
    assert await steps_while(app, pushes, second, data) == 0
    with trio.fail_after(5):
        assert await second.line() == b"-ERR unknown queue 'nowhere'"
    pushes.gate.set()
    with trio.fail_after(5):
        assert await first.line() == b":1"


async def test_other_commands_wake_the_task_and_are_answered_in_order(app: App) -> None:
    pushes, first, second = await a_store_call_under_way(app)
    data = encode_command("LPUSH", "held", "b") + encode_command("PING")
    assert await steps_while(app, pushes, second, data) > 0
    assert await nothing_to_read(second)  # the PING waits for the push's reply
    pushes.gate.set()
    with trio.fail_after(5):
        assert await first.line() == b":1"
        assert [await second.line(), await second.line()] == [b":1", b"+PONG"]


async def test_a_push_with_the_end_of_the_stream_still_closes_the_connection(app: App) -> None:
    """The push and the producer's end arrive in one event: taking the push must not leave
    the end unread (no later event would report it)."""
    pushes, first, _ = await a_store_call_under_way(app)
    host, _, port = app.resp_address.rpartition(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.setblocking(False)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        # Both in the kernel before the readiness task looks: no checkpoint between them.
        raw.send(encode_command("LPUSH", "held", "b"))
        raw.shutdown(socket.SHUT_WR)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        pushes.gate.set()
        received = b""
        with trio.fail_after(5):
            while True:
                await trio.lowlevel.wait_readable(raw)
                data = raw.recv(1024)
                if not data:
                    break  # the server closed the connection once it had answered
                received += data
    assert received == b":1\r\n"
    with trio.fail_after(5):
        assert await first.line() == b":1"
    assert pushes.calls == [[b"a"], [b"b"]]


async def test_a_read_that_fills_the_buffer_is_followed_by_another(app: App) -> None:
    """Pushes ending exactly where a 64 KiB read ends, then more: what the read left behind
    comes with no event of its own, so it must be read without waiting for one."""
    pushes, first, second = await a_store_call_under_way(app)
    push = encode_command("LPUSH", "held", b"p" * 1000)
    filler = 65536 - len(push) * (65536 // len(push))
    head = push * (65536 // len(push) - 1) + encode_command("LPUSH", "held", b"p" * (1000 + filler))
    assert len(head) == 65536
    await second.stream.send_all(head + push * 3)
    pushes.gate.set()
    count = 65536 // len(push) + 3
    with trio.fail_after(5):
        assert await first.line() == b":1"
        assert [await second.line() for _ in range(count)] == [b":1"] * count
    assert await second.call("LLEN", "held") == b":%d" % (count + 1)


async def test_pushes_arriving_together_are_stored_in_one_call(app: App) -> None:
    """With no store call under way, the first push taken starts the next one (its task is
    woken to make it); those taken in the same wake-up join it rather than waiting for the
    call after."""
    pushes = CountingPushes(app)
    host, _, port = app.resp_address.rpartition(":")
    raws = [socket.create_connection((host, int(port))) for _ in range(3)]
    try:
        for raw in raws:
            raw.setblocking(False)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        steps = ConnectionSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            for index, raw in enumerate(raws):  # no checkpoint between them
                raw.send(encode_command("LPUSH", "held", f"job{index}"))
            for raw in raws:
                with trio.fail_after(5):
                    await trio.lowlevel.wait_readable(raw)
                assert raw.recv(1024) == b":1\r\n"
        finally:
            trio.lowlevel.remove_instrument(steps)
    finally:
        for raw in raws:
            raw.close()
    assert pushes.calls == [("held", 3)]
    assert len(steps.tasks) == 1  # the task making the call; the other two stayed parked


async def test_a_producer_whose_pushes_are_refused_is_not_idle(tmp_path: Path) -> None:
    """Refused pushes are answered by the readiness task with no store call: the producer
    is busy all the same, and the idle sweeper must not close its connection."""
    config = write_config(tmp_path, QUEUES, main_extra="producer: {idle_timeout: 1s}\n")
    async with running_daemon(config) as app:
        client = await Client.connect(app)
        for _ in range(8):  # 2.4 s in all, a reply every 0.3 s
            await trio.sleep(0.3)
            with trio.fail_after(5):
                assert await client.call("LPUSH", "nowhere", "x") == (
                    b"-ERR unknown queue 'nowhere'"
                )
        await trio.sleep(1.5)  # and idle now: closed
        assert await client.closed()
        assert app.resp is not None
        assert app.resp.statistics().idle_closed_total == 1
