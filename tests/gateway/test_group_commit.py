"""Group commit on the Redis protocol: a push that joins another connection's store call is
answered from that call's task, in order with whatever its producer sends next, and never
before the store has the job.

The store is the real SQLite store; the tests only hold its push at a gate, to make a store
call last as long as they need.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from adapters.storage.jobs import NewJob, Pushed, PushResult
from fastcgi.readiness import Readiness
from gateway.app import App
from gateway.config import load_config
from gateway.producer import FLUSH_GRACE, MERGE_LIMIT, PushFailures, _Batcher
from gateway.resp import encode_command
from gateway.resp_server import _Connection
from tests.gateway.test_producer_protocol import QUEUES, Client, CountingPushes
from tests.support.daemon import running_daemon, write_config


class GatedPushes:
    """Holds each store push until ``gate`` is set; records the jobs each call carried."""

    def __init__(self, app: App) -> None:
        assert app.store is not None
        self.calls: list[list[bytes]] = []
        self.gate = trio.Event()
        self.entered = trio.Event()
        self._push = app.store.push
        app.store.push = self.push  # type: ignore[method-assign]

    async def push(self, queue: str, routes: Any, jobs: Any) -> PushResult:
        self.calls.append([job.payload for job in jobs])
        self.entered.set()
        await self.gate.wait()
        return await self._push(queue, routes, jobs)


async def a_store_call_under_way(app: App) -> tuple[GatedPushes, Client, Client]:
    """Two producers; the first has pushed "a" to queue held, and the store call carrying
    it is held at the gate, so what the second pushes now joins the next call."""
    pushes = GatedPushes(app)
    first, second = await Client.connect(app), await Client.connect(app)
    await first.stream.send_all(encode_command("LPUSH", "held", "a"))
    with trio.fail_after(5):
        await pushes.entered.wait()
    return pushes, first, second


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


async def nothing_to_read(client: Client) -> bool:
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    with trio.move_on_after(0.2):
        data = await client.stream.receive_some(1024)
        client.buffer += data
        return False
    return True


async def test_a_joined_push_is_answered_before_the_next_command(app: App) -> None:
    pushes, first, second = await a_store_call_under_way(app)
    await second.stream.send_all(encode_command("LPUSH", "held", "b"))
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    # The second producer sends on before its reply: that must wait for the reply.
    await second.stream.send_all(encode_command("PING"))
    assert await nothing_to_read(second)  # no ack before the store has the job, no PONG
    pushes.gate.set()
    with trio.fail_after(5):
        assert await first.line() == b":1"
        assert [await second.line(), await second.line()] == [b":1", b"+PONG"]
    assert pushes.calls == [[b"a"], [b"b"]]  # b joined the call after the one under way
    assert await first.call("LLEN", "held") == b":2"
    assert app.resp is not None
    stats = app.resp.statistics()
    assert (stats.commands_total, stats.errors_total) == (4, 0)


async def test_pushes_waiting_for_a_store_call_are_merged_up_to_the_limit(app: App) -> None:
    """A store call takes the pushes waiting up to MERGE_LIMIT jobs, so that the next call's
    are read and prepared while the store runs it; one push larger than that is one call."""
    pushes, first, second = await a_store_call_under_way(app)
    third = await Client.connect(app)
    size = MERGE_LIMIT * 2 // 3  # two of them do not fit in one call
    sent = {}
    for n, client in enumerate([second, third, first]):
        sent[n] = [b"%d-%d" % (n, i) for i in range(size if n < 2 else MERGE_LIMIT + 1)]
        await client.stream.send_all(encode_command("LPUSH", "held", *sent[n]))
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    pushes.gate.set()
    with trio.fail_after(5):
        assert await first.line() == b":1"
        assert await second.line() == b":%d" % size
        assert await third.line() == b":%d" % size
        assert await first.line() == b":%d" % (MERGE_LIMIT + 1)
    assert pushes.calls == [[b"a"], sent[0], sent[1], sent[2]]
    assert await first.call("LLEN", "held") == b":%d" % (1 + 2 * size + MERGE_LIMIT + 1)


async def test_a_producer_that_half_closes_still_gets_its_reply(app: App) -> None:
    pushes, first, second = await a_store_call_under_way(app)
    # As `printf 'LPUSH ...' | nc` does: send the command, then end the sending side.
    await second.stream.send_all(encode_command("RPUSH", "held", "b", "c"))
    await second.stream.send_eof()
    assert await nothing_to_read(second)
    pushes.gate.set()
    with trio.fail_after(5):
        assert await second.line() == b":2"
        assert await second.closed()
        assert await first.line() == b":1"
    assert await first.call("LLEN", "held") == b":3"


async def test_a_store_call_out_of_time_answers_every_push_it_held_with_an_error(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.producer.FLUSH_GRACE", 0.3)
    pushes, first, second = await a_store_call_under_way(app)
    await second.stream.send_all(encode_command("LPUSH", "held", "b"))
    with trio.fail_after(5):
        # first's push was in the call: the store may yet carry it out.  second's was not.
        assert await first.line() == (
            b"-TRYAGAIN not acknowledged; it may have been stored:"
            b" the store did not answer within 0.3s"
        )
        assert await second.line() == (
            b"-TRYAGAIN store unavailable, nothing was acknowledged:"
            b" the store did not answer within 0.3s; this push was not sent to it"
        )
    pushes.gate.set()
    assert await second.call("LLEN", "held") == b":0"  # nothing stored, nothing acknowledged
    assert await second.call("LPUSH", "held", "c") == b":1"  # and the queue works again
    assert app.resp is not None
    assert app.resp.statistics().errors_total == 2


async def test_an_answer_too_big_for_the_socket_buffer_is_sent_by_a_task_of_its_own() -> None:
    server, producer = socket.socketpair()
    with server, producer:
        server.setblocking(False)
        producer.setblocking(False)
        filled = 0
        while True:  # a producer that has stopped reading: the buffer is full
            try:
                filled += server.send(b"f" * 65536)
            except BlockingIOError:
                break
        async with trio.open_nursery() as nursery:
            conn = _Connection(server, nursery, Readiness())  # never reads here
            conn.owed = True
            conn.answer(b":1\r\n")
            # Written, so the connection may read on; not sent: that waits for room, in a
            # task of its own.
            assert not conn.owed and conn.unsent_bytes == 4
            received = b""
            with trio.fail_after(5):
                while len(received) < filled + 4:
                    await trio.lowlevel.wait_readable(producer)
                    received += producer.recv(1 << 20)
                await conn.flushed()
        assert conn.unsent_bytes == 0
        assert received == b"f" * filled + b":1\r\n"


async def test_a_push_the_store_refuses_is_answered_with_an_error_and_the_connection_stays(
    app: App,
) -> None:
    pushes = CountingPushes(app, failing="held")
    client = await Client.connect(app)
    assert (await client.call("LPUSH", "held", "a")).startswith(
        b"-TRYAGAIN store unavailable, nothing was acknowledged: disk on fire"
    )
    assert await client.call("LPUSH", "open", "b") == b":1"
    assert pushes.calls == [("held", 1), ("open", 1)]
    assert await client.call("LLEN", "held") == b":0"


async def test_quit_after_a_joined_push_gets_both_replies_in_order(app: App) -> None:
    pushes, first, second = await a_store_call_under_way(app)
    await second.stream.send_all(encode_command("LPUSH", "held", "b"))
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    await second.stream.send_all(encode_command("QUIT"))
    assert await nothing_to_read(second)
    pushes.gate.set()
    with trio.fail_after(5):
        assert [await second.line(), await second.line()] == [b":1", b"+OK"]
        assert await second.closed()
        assert await first.line() == b":1"
    assert await first.call("LLEN", "held") == b":2"


async def test_many_producers_mixing_pushes_and_other_commands_get_every_reply_in_order(
    app: App,
) -> None:
    # Twenty connections, each sending pushes alone, pipelined with PING and ECHO, or
    # followed by another command before the push's reply has come back; every reply must
    # come in order, and every acknowledged job must be stored.
    rng = random.Random(4)
    pushed = 0

    async def producer(index: int) -> None:
        nonlocal pushed
        client = await Client.connect(app)
        for round_ in range(25):
            commands: list[tuple[bytes, ...]] = []
            expected: list[bytes] = []
            for _ in range(rng.choice((1, 1, 2, 5))):
                kind = rng.choice(("push", "push", "ping", "echo"))
                if kind == "push":
                    payloads = [f"{index}-{round_}-{n}".encode() for n in range(rng.randint(1, 3))]
                    commands.append((b"LPUSH", b"held", *payloads))
                    expected.append(b":%d" % len(payloads))
                    pushed += len(payloads)
                elif kind == "ping":
                    commands.append((b"PING",))
                    expected.append(b"+PONG")
                else:
                    word = f"w{index}-{round_}".encode()
                    commands.append((b"ECHO", word))
                    expected += [b"$%d" % len(word), word]
            if rng.random() < 0.5:  # all in one write
                await client.stream.send_all(b"".join(encode_command(*c) for c in commands))
            else:  # one write each, without waiting for replies in between
                for command in commands:
                    await client.stream.send_all(encode_command(*command))
                    await trio.lowlevel.checkpoint()
            with trio.fail_after(10):
                assert [await client.line() for _ in expected] == expected
        await client.stream.aclose()

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(producer, index)
    checker = await Client.connect(app)
    assert await checker.call("LLEN", "held") == b":%d" % pushed
    assert app.resp is not None
    assert app.resp.statistics().errors_total == 0


class SlowPushes:
    """The store's push, taking ``delay`` seconds: long enough to shut down meanwhile."""

    def __init__(self, app: App, delay: float) -> None:
        assert app.store is not None
        self.started = trio.Event()
        self._push = app.store.push
        self._delay = delay
        app.store.push = self.push  # type: ignore[method-assign]

    async def push(self, queue: str, routes: Any, jobs: Any) -> PushResult:
        self.started.set()
        await trio.sleep(self._delay)
        return await self._push(queue, routes, jobs)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (encode_command("LPUSH", "held", "b"), [b":1"]),  # answered by the store call's task
        (  # answered by the connection's own task, once the store call is done
            encode_command("MULTI")
            + encode_command("LPUSH", "held", "b")
            + encode_command("RPUSH", "held", "c")
            + encode_command("EXEC"),
            [b"+OK", b"+QUEUED", b"+QUEUED", b"*2", b":1", b":1"],
        ),
    ],
    ids=["push", "multi-exec"],
)
async def test_a_shutdown_sends_the_replies_for_pushes_already_with_the_store(
    tmp_path: Path, sent: bytes, expected: list[bytes]
) -> None:
    # SIGTERM used to cancel every producer connection at once.  A push that joined
    # another connection's store call was stored, but its connection was closed before
    # the reply: the producer pushed it again.
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        slow = SlowPushes(app, 0.3)
        first, joining = await Client.connect(app), await Client.connect(app)
        await first.stream.send_all(encode_command("LPUSH", "held", "a"))
        await slow.started.wait()  # first's task is making the store call
        await joining.stream.send_all(sent)
        await trio.sleep(0.05)  # joined: waiting for the next store call
        app.shutdown()
        with trio.fail_after(5):
            assert await first.line() == b":1"
            assert [await joining.line() for _ in expected] == expected
            assert await joining.closed()  # and then the connection ends
            host, _, port = app.resp_address.rpartition(":")
            with pytest.raises(OSError):  # the port closed at once
                await trio.open_tcp_stream(host, int(port))


async def test_a_shutdown_answers_an_http_push_the_store_has(tmp_path: Path) -> None:
    # The daemon used to end the HTTP server with the rest, a push still waiting for its
    # store call included: stored, but never answered, so the producer pushed it again.
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        slow = SlowPushes(app, 0.3)
        host, _, port = app.http_address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            b"POST /v1/queues/held/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        )
        await slow.started.wait()  # taken before the shutdown: the store is storing it
        app.shutdown()
        answer = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                answer += chunk
        assert app.store is not None
        assert (await app.store.stats("held", "t")).ready == 1
    assert answer.startswith(b"HTTP/1.1 202"), answer


async def test_a_push_checked_after_a_reload_goes_to_the_topics_it_made(tmp_path: Path) -> None:
    # A store call is under way when a reload adds topic "more" to queue held.  A push
    # checked before the reload waits for the next call, and so does one checked after it.
    # The merged call used to carry every push to the topics of the one that started the
    # flush: under steady load, the new topic got no job (and a removed one went on getting
    # copies nobody delivers).
    config = write_config(tmp_path, QUEUES)
    async with running_daemon(config) as app:
        pushes, first, before = await a_store_call_under_way(app)
        await before.stream.send_all(encode_command("LPUSH", "held", "before"))
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        held = (tmp_path / "conf.d" / "held.yaml").read_text()
        (tmp_path / "conf.d" / "held.yaml").write_text(
            held + "  more:\n    backend: fastcgi://127.0.0.1:9\n    script: /srv/x.php\n"
            "    paused: true\n"
        )
        await app.reload(load_config(config))
        after = await Client.connect(app)
        await after.stream.send_all(encode_command("LPUSH", "held", "after"))
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        pushes.gate.set()
        with trio.fail_after(5):
            assert [await first.line(), await before.line(), await after.line()] == [b":1"] * 3
        assert app.store is not None
        assert (await app.store.stats("held", "t")).ready == 3
        (copy,) = await app.store.reserve("held", "more", 10, 30)
        assert copy.payload == b"after"


class _TenMillisecondStore:
    """A store whose every push takes 10 ms (the group commit's one layer under test)."""

    calls = 0

    async def push(self, queue: str, routes: Any, jobs: list[Any]) -> PushResult:
        self.calls += 1
        await trio.sleep(0.01)
        count = len(jobs)
        return PushResult(tuple(map(str, range(count))), (Pushed.STORED,) * count, (1,) * count)


async def test_a_steady_stream_of_pushes_outlasts_the_flush_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The flush loops for as long as pushes keep coming.  Its 30 s deadline was the whole
    # loop's: after 30 s of steady load the call under way was cancelled, its pushes told
    # "may have been stored" (pushed again: duplicates), though every call took 10 ms.
    store = _TenMillisecondStore()
    batcher = _Batcher(store, PushFailures())  # type: ignore[arg-type]
    entry = SimpleNamespace(config=SimpleNamespace(name="q"), routes=())
    errors: list[Exception] = []
    stored = 0

    def on_stored(outcome: PushResult | Exception, first: int) -> None:
        nonlocal stored
        if isinstance(outcome, Exception):
            errors.append(outcome)
        else:
            stored += 1

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        while trio.current_time() - start < FLUSH_GRACE + 10:  # a push every 5 ms
            if batcher.add(entry, [NewJob(b"x")], on_stored):  # type: ignore[arg-type]
                nursery.start_soon(batcher.flush)
            await trio.sleep(0.005)
    assert errors == []
    assert stored > 7000 and store.calls > 3000
