"""The Redis-protocol front door with raw sockets: errors keep the connection, garbage closes
only its own connection, and nothing unacknowledged is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

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
    async def connect(cls, app: App) -> Client:
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
    assert reply.startswith(b"-ERR payload of 4194304 bytes is over the limit")
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


async def test_inline_commands_work_like_telnet(app: App) -> None:
    client = await Client.connect(app)
    await client.stream.send_all(b'LPUSH open "inline job"\r\nPING\r\n')
    assert [await client.line(), await client.line()] == [b":1", b"+PONG"]


async def test_idle_connection_is_closed_without_a_stray_reply(tmp_path: Path) -> None:
    config = write_config(tmp_path, QUEUES, main_extra="producer: {idle_timeout: 200ms}\n")
    async with running_daemon(config) as app:
        client = await Client.connect(app)
        assert await client.call("PING") == b"+PONG"
        assert await client.closed()  # EOF, and no error text written before it
        assert client.buffer == b""
