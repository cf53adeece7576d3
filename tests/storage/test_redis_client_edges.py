"""The Redis client at the edges of a call: one already cancelled sends nothing, a TLS
handshake that runs out of time leaves no socket open, a reply nobody asked for is not read as
the next call's, and a script the server has forgotten is sent again."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import hiredis
import pytest
import trio

from adapters.storage.errors import StoreError, StoreRefused
from adapters.storage.redis_client import RedisAddress, RedisClient, Script
from adapters.storage.redis_routing import Standalone
from tests.support.redis import RedisServer


async def test_a_call_already_cancelled_sends_nothing_to_redis(redis_server: RedisServer) -> None:
    redis_server.cli("DEL", "edge:k")
    client = RedisClient(redis_server.address)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.execute("PING")  # an idle connection: taking it needs no checkpoint
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.execute("SET", "edge:k", "ran")
        assert scope.cancelled_caught
        assert await client.execute("GET", "edge:k") is None
        await client.aclose()
        nursery.cancel_scope.cancel()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@asynccontextmanager
async def serving(
    handle: Callable[[trio.socket.SocketType], Awaitable[None]],
) -> AsyncIterator[int]:
    """A TCP server on a free port that runs ``handle`` on each connection it accepts."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(10)

    async def accept() -> None:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(handle, sock)

    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            yield listener.getsockname()[1]
            nursery.cancel_scope.cancel()


async def test_a_tls_handshake_out_of_time_leaves_no_socket_open() -> None:
    accepted: list[trio.socket.SocketType] = []

    async def never_answer(sock: trio.socket.SocketType) -> None:  # never a word of TLS
        accepted.append(sock)

    async with serving(never_answer) as port:
        client = RedisClient(
            RedisAddress("127.0.0.1", port), tls=True, connect_timeout=0.05, command_timeout=0.3
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            before = _open_fds()
            with pytest.raises(StoreError):
                await client.execute("PING")
            await trio.sleep(0.05)
            assert accepted, "the client never connected"
            assert _open_fds() - before - len(accepted) <= 0  # the server's ends only
            await client.aclose()
            nursery.cancel_scope.cancel()
    for sock in accepted:
        sock.close()


async def test_a_server_that_is_not_redis_is_named_as_such() -> None:
    async def http_server(sock: trio.socket.SocketType) -> None:  # a web server's port
        with sock:
            await sock.recv(4096)
            await sock.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    async with serving(http_server) as port:
        client = RedisClient(RedisAddress("127.0.0.1", port), command_timeout=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            with pytest.raises(StoreRefused, match="does not speak the Redis protocol"):
                await client.execute("PING")
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_a_reply_sent_twice_is_not_taken_for_the_next_calls_answer() -> None:
    async def answers_get_a_twice(sock: trio.socket.SocketType) -> None:
        commands = hiredis.Reader()
        with sock:
            while data := await sock.recv(65536):
                commands.feed(data)
                out = b""
                while (command := commands.gets()) is not False:
                    if command[0].upper() != b"GET":
                        out += b"+OK\r\n"  # the handshake's CLIENT SETNAME
                        continue
                    value = b"value-of-" + command[1]
                    out += b"$%d\r\n%s\r\n" % (len(value), value) * (2 if value[-1:] == b"a" else 1)
                await sock.send(out)

    async with serving(answers_get_a_twice) as port:
        client = RedisClient(RedisAddress("127.0.0.1", port), command_timeout=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            assert await client.execute("GET", "a") == b"value-of-a"
            assert [await client.execute("GET", key) for key in "bcd"] == [
                b"value-of-b",
                b"value-of-c",
                b"value-of-d",
            ]
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_a_script_goes_as_source_first_then_by_sha_and_again_once_forgotten(
    redis_server: RedisServer,
) -> None:
    def calls(command: str) -> int:
        stats = redis_server.cli("INFO", "commandstats")
        for line in stats.splitlines():
            if line.startswith(f"cmdstat_{command}:"):
                return int(line.partition("calls=")[2].partition(",")[0])
        return 0

    script = Script("return redis.call('INCR', KEYS[1])")
    redis_server.cli("SCRIPT", "FLUSH")
    redis_server.cli("DEL", "edge:n")
    client = RedisClient(redis_server.address)
    router = Standalone(client)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        before = calls("eval"), calls("evalsha")
        assert await router.eval(b"edge:n", script, []) == 1
        assert await router.eval(b"edge:n", script, []) == 2
        assert (calls("eval"), calls("evalsha")) == (before[0] + 1, before[1] + 1)
        redis_server.cli("SCRIPT", "FLUSH")  # as a restart would: NOSCRIPT, then EVAL again
        assert await router.eval(b"edge:n", script, []) == 3
        assert (calls("eval"), calls("evalsha")) == (before[0] + 2, before[1] + 2)
        await client.aclose()
        nursery.cancel_scope.cancel()
