"""The Redis-protocol front door with raw sockets: errors keep the connection, garbage closes
only its own connection, and nothing unacknowledged is stored."""

from __future__ import annotations

import socket
import sqlite3
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

import pytest
import trio

from adapters.storage.errors import StoreUnavailable
from adapters.storage.jobs import PushResult
from gateway.app import App
from gateway.resp import encode_command
from tests.support.daemon import running_daemon, write_config

QUEUES = {
    "orders": """\
        queue: orders
        password: s3cret
        max_payload: 1KiB
        topics:
          email:
            backend: fastcgi://127.0.0.1:9
            script: /srv/app/index.php
            paused: true
        """,
    "open": """\
        queue: open
        topics:
          t:
            backend: fastcgi://127.0.0.1:9
            script: /srv/app/index.php
        """,
    "held": """\
        queue: held
        topics:
          t:
            backend: fastcgi://127.0.0.1:9
            script: /srv/app/index.php
            paused: true
        """,
}


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


class Client:
    """A bare RESP client: sends bytes, reads exactly the replies it expects."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, app: App) -> Self:
        host, _, port = app.resp_address.rpartition(":")
        return cls(await trio.open_tcp_stream(host, int(port)))

    async def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    async def call(self, *args: bytes | str | int) -> bytes:
        await self.stream.send_all(encode_command(*args))
        return await self.line()

    async def closed(self) -> bool:
        with trio.fail_after(5):
            return await self.stream.receive_some(1024) == b""


async def test_errors_keep_the_connection(app: App) -> None:
    client = await Client.connect(app)
    assert await client.call("LPUSH", "orders", "x") == b"-NOAUTH Authentication required."
    assert (await client.call("AUTH", "orders", "nope")).startswith(b"-WRONGPASS")
    assert await client.call("AUTH", "orders", "s3cret") == b"+OK"
    assert await client.call("LPUSH", "nowhere", "x") == b"-ERR unknown queue 'nowhere'"
    assert await client.call("LPUSH", "orders/nope", "x") == (
        b"-ERR unknown topic 'nope' in queue 'orders'"
    )
    assert await client.call("FLUSHALL") == (
        b"-ERR unknown command 'FLUSHALL', with args beginning with: "
    )
    assert await client.call("LPUSH", "orders") == (
        b"-ERR wrong number of arguments for 'lpush' command"
    )
    assert (await client.call("LPUSH", "orders", b"x" * 1025)).startswith(
        b"-ERR payload of 1025 bytes exceeds max_payload of 1024 bytes for queue 'orders'"
    )
    assert await client.call("LPUSH", "orders", b"x" * 1024, b"y") == b":2"
    assert await client.call("LLEN", "orders") == b":2"
    assert await client.call("PING") == b"+PONG"


async def test_oversized_argument_far_over_the_limit_keeps_the_connection(app: App) -> None:
    client = await Client.connect(app)
    await client.call("AUTH", "s3cret")
    big = b"z" * (4 * 1024 * 1024)  # far past max_payload + slack: skipped unbuffered
    reply = await client.call("LPUSH", "orders", big)
    assert reply.startswith(b"-ERR payload of 4194304 bytes exceeds max_payload of ")
    assert reply.endswith(b" bytes (the largest of any queue)")
    assert await client.call("LLEN", "orders") == b":0"


async def test_malformed_stream_closes_only_that_connection(app: App) -> None:
    good = await Client.connect(app)
    bad = await Client.connect(app)
    await bad.stream.send_all(b"*2\r\n$4\r\nPING\r\n:nonsense\r\n")
    assert await bad.line() == b"-ERR Protocol error: expected '$', got ':'"
    assert await bad.closed()
    assert await good.call("PING") == b"+PONG"
    assert await good.call("LPUSH", "open", "still fine") == b":1"


async def test_pipelined_replies_in_order_and_quit(app: App) -> None:
    client = await Client.connect(app)
    await client.stream.send_all(
        encode_command("PING")
        + encode_command("LPUSH", "open", "a", "b")
        + encode_command("ECHO", "hi")
        + encode_command("QUIT")
        + encode_command("PING")  # after QUIT: never answered
    )
    assert [await client.line() for _ in range(5)] == [b"+PONG", b":2", b"$2", b"hi", b"+OK"]
    assert await client.closed()


async def test_a_pipeline_longer_than_one_read_is_answered_whole(app: App) -> None:
    # 140 KB sent at once, then nothing more: after a read that fills the buffer, the rest
    # is already waiting and no new arrival will announce it.
    client = await Client.connect(app)
    await client.stream.send_all(encode_command("PING") * 10_000 + encode_command("ECHO", "end"))
    with trio.fail_after(10):
        assert [await client.line() for _ in range(10_000)] == [b"+PONG"] * 10_000
        assert [await client.line(), await client.line()] == [b"$3", b"end"]


async def test_inline_commands_work_like_telnet(app: App) -> None:
    client = await Client.connect(app)
    await client.stream.send_all(b'LPUSH open "inline job"\r\nPING\r\n')
    assert [await client.line(), await client.line()] == [b":1", b"+PONG"]


async def test_a_producer_that_sends_and_hangs_up_at_once_is_answered_and_let_go(
    app: App,
) -> None:
    # `printf 'LPUSH open job\r\n' | nc -N`: the command and the end of the stream arrive
    # together, before the server reads.  Sent without yielding to the event loop, they are
    # both there when the server accepts the connection.
    host, _, port = app.resp_address.rpartition(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(encode_command("LPUSH", "open", "job"))
        raw.shutdown(socket.SHUT_WR)
        client = Client(trio.SocketStream(trio.socket.from_stdlib_socket(raw.dup())))
        with trio.fail_after(2):
            assert await client.line() == b":1"
            assert await client.closed()
        await client.stream.aclose()


async def test_an_http_request_is_not_run_as_inline_commands(app: App) -> None:
    # What a hostile page makes a browser send to the Redis-protocol port: the form's body
    # would otherwise be pushed, line by line.
    client = await Client.connect(app)
    await client.stream.send_all(
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n\r\n"
        b"LPUSH open from-a-web-page\r\n"
    )
    assert (await client.line()).startswith(b"-ERR Protocol error: an HTTP request")
    assert await client.closed()
    check = await Client.connect(app)
    assert await check.call("LLEN", "open") == b":0"


async def test_idle_connection_is_closed_without_a_stray_reply(tmp_path: Path) -> None:
    config = write_config(tmp_path, QUEUES, main_extra="producer: {idle_timeout: 400ms}\n")
    async with running_daemon(config) as app:
        client = await Client.connect(app)
        assert await client.call("PING") == b"+PONG"
        idle_since = trio.current_time()
        assert await client.closed()  # EOF, and no error text written before it
        assert client.buffer == b""
    # At most a quarter of idle_timeout late (README), with room for a loaded machine.
    assert 0.4 <= trio.current_time() - idle_since < 1.0


async def test_replies_go_out_every_max_pipeline_commands(tmp_path: Path) -> None:
    # With the store stuck on the third command, the two before it are answered at once:
    # a long pipeline is not answered only at its end.
    config = write_config(tmp_path, QUEUES, main_extra="producer: {max_pipeline: 2}\n")
    async with running_daemon(config) as app:
        client = await Client.connect(app)
        lock = sqlite3.connect(tmp_path / "busgate.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # the push waits for the store
        try:
            pipeline = [encode_command("PING"), encode_command("PING")]
            await client.stream.send_all(
                b"".join([*pipeline, encode_command("LPUSH", "open", "x")])
            )
            with trio.fail_after(1.5):
                assert [await client.line(), await client.line()] == [b"+PONG", b"+PONG"]
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        with trio.fail_after(10):
            assert await client.line() == b":1"


async def test_a_connection_in_use_is_not_idle(tmp_path: Path) -> None:
    # Each wait for a command starts its own idle clock: a producer that sends a command
    # every 100 ms for a second, five idle timeouts in all, keeps its connection.
    config = write_config(tmp_path, QUEUES, main_extra="producer: {idle_timeout: 200ms}\n")
    async with running_daemon(config) as app:
        assert app.resp is not None
        client = await Client.connect(app)
        for _ in range(10):
            assert await client.call("PING") == b"+PONG"
            await trio.sleep(0.1)
        assert await client.call("LPUSH", "held", "still here") == b":1"
        assert app.resp.statistics().idle_closed_total == 0
        assert await client.closed()  # and once it stops, it is closed as idle
        assert app.resp.statistics().idle_closed_total == 1


async def test_a_producer_that_resets_mid_pipeline_loses_only_its_unfinished_command(
    app: App,
) -> None:
    assert app.resp is not None
    client = await Client.connect(app)
    assert await client.call("LPUSH", "held", "before") == b":1"  # acknowledged: stored
    # SO_LINGER 0: closing sends a reset, and the replies on their way find no reader.
    client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.stream.send_all(
        encode_command("LPUSH", "held", "maybe") * 50 + encode_command("LPUSH", "held", "cut")[:-4]
    )
    await client.stream.aclose()
    with trio.fail_after(5):
        while app.resp.statistics().connections:
            await trio.sleep(0.01)
    other = await Client.connect(app)  # the server carries on
    stored = int((await other.call("LLEN", "held"))[1:])
    assert 1 <= stored <= 51  # the first push, and at most the 50 whole commands after it


class CountingPushes:
    """Wraps the store's push to count store calls per queue, optionally failing one queue."""

    def __init__(self, app: App, failing: str | None = None) -> None:
        assert app.store is not None
        self.calls: list[tuple[str, int]] = []
        self._push = app.store.push
        self._failing = failing
        app.store.push = self.push  # type: ignore[method-assign]

    async def push(self, queue: str, routes: Any, jobs: Any) -> PushResult:
        self.calls.append((queue, len(jobs)))
        if queue == self._failing:
            raise StoreUnavailable("disk on fire")
        return await self._push(queue, routes, jobs)


async def test_a_pipelined_run_of_pushes_is_one_store_call_per_queue(app: App) -> None:
    pushes = CountingPushes(app)
    client = await Client.connect(app)
    assert await client.call("AUTH", "orders", "s3cret") == b"+OK"
    await client.stream.send_all(
        encode_command("LPUSH", "held", "a", "b")
        + encode_command("RPUSH", "orders", "c")
        + encode_command("LPUSH", "nowhere", "lost")  # refused; its neighbours are stored
        + encode_command("XADD", "held", "job-7", "payload", "d")
        + encode_command("XADD", "held", "job-7", "payload", "d again")  # same id: one job
        + encode_command("LPUSH", "orders", b"x" * 1025)  # over max_payload
        + encode_command("ZADD", "orders", "1", "e")
        + encode_command("LPUSH", "held")  # wrong arity
        + encode_command("PING")  # ends the run
        + encode_command("LPUSH", "held", "f")
    )
    replies = [await client.line() for _ in range(12)]
    assert replies[0:2] == [b":2", b":1"]
    assert replies[2] == b"-ERR unknown queue 'nowhere'"
    assert replies[3:7] == [b"$5", b"job-7", b"$5", b"job-7"]
    assert replies[7].startswith(b"-ERR payload of 1025 bytes exceeds max_payload")
    assert replies[8:10] == [b":1", b"-ERR wrong number of arguments for 'lpush' command"]
    assert replies[10:12] == [b"+PONG", b":1"]
    # The run's two queues are stored concurrently, in either order; PING ends the run.
    assert sorted(pushes.calls[:2]) == [("held", 4), ("orders", 2)]
    assert pushes.calls[2:] == [("held", 1)]
    assert await client.call("LLEN", "held") == b":4"  # a, b, job-7 once, f
    assert await client.call("LLEN", "orders") == b":2"  # c, e (delayed)


async def test_a_failed_store_call_answers_only_its_own_queues_pushes(app: App) -> None:
    pushes = CountingPushes(app, failing="orders")
    client = await Client.connect(app)
    assert await client.call("AUTH", "orders", "s3cret") == b"+OK"
    await client.stream.send_all(
        encode_command("LPUSH", "orders", "a")
        + encode_command("LPUSH", "held", "b")
        + encode_command("LPUSH", "orders", "c")
    )
    replies = [await client.line() for _ in range(3)]
    assert replies[0].startswith(b"-TRYAGAIN store unavailable, nothing was acknowledged")
    assert replies[1:] == [b":1", replies[0]]
    assert sorted(pushes.calls) == [("held", 1), ("orders", 2)]
    assert await client.call("LLEN", "held") == b":1"
    assert await client.call("LLEN", "orders") == b":0"


async def test_a_producer_that_stops_reading_is_dropped_and_others_carry_on(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.resp_server.SEND_TIMEOUT", 0.3)
    assert app.resp is not None
    stuck = await Client.connect(app)
    assert await stuck.call("PING") == b"+PONG"
    assert app.resp.statistics().connections == 1
    # 20 MiB of replies: more than the socket buffers of both ends hold.
    requests = encode_command("ECHO", b"e" * (1024 * 1024)) * 20

    async def send_and_never_read() -> None:
        try:
            await stuck.stream.send_all(requests)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server hung up on us mid-way: what this test expects

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_and_never_read)
        with trio.fail_after(10):
            while app.resp.statistics().connections != 0:
                await trio.sleep(0.05)
    other = await Client.connect(app)
    assert await other.call("PING") == b"+PONG"
    assert app.resp.statistics().idle_closed_total == 0  # dropped for not reading, not idle


async def test_a_pipeline_written_whole_before_its_replies_are_read(app: App) -> None:
    """redis-py and phpredis write a whole pipeline, then read: its replies outgrow the
    client's receive buffer long before the last command is written.  Were we to stop
    reading until they were taken, both ends would wait on each other (and a client that
    gives up and retries would store the pushes twice)."""
    import redis

    host, _, port = app.resp_address.rpartition(":")
    count = 60_000

    def push_all() -> list[Any]:
        client = redis.Redis(host=host, port=int(port), socket_timeout=20)
        try:
            pipeline = client.pipeline(transaction=False)
            for n in range(count):
                pipeline.lpush("held", b"%06d" % n + b"x" * 194)
            return pipeline.execute()
        finally:
            client.close()

    with trio.fail_after(30):
        replies = await trio.to_thread.run_sync(push_all)
    assert len(replies) == count and all(isinstance(reply, int) for reply in replies)
    assert app.store is not None
    assert (await app.store.stats("held", "t")).ready == count  # each one once


async def test_an_absurd_bulk_length_is_a_protocol_error_not_a_wait(app: App) -> None:
    client = await Client.connect(app)
    await client.stream.send_all(b"*3\r\n$5\r\nLPUSH\r\n$4\r\nopen\r\n$999999999999\r\n")
    with trio.fail_after(5):
        assert await client.line() == b"-ERR Protocol error: invalid bulk length"
        assert await client.stream.receive_some(100) == b""  # closed, as Redis does
