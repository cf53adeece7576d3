"""The Redis client at the edges of a call: one already cancelled sends nothing, and a TLS
handshake that runs out of time leaves no socket open."""

from __future__ import annotations

import os

import pytest
import trio

from adapters.storage.errors import StoreError, StoreRefused
from adapters.storage.redis_client import RedisAddress, RedisClient
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


async def test_a_tls_handshake_out_of_time_leaves_no_socket_open() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(10)
    accepted: list[trio.socket.SocketType] = []

    async def never_answer() -> None:  # accepts, and never says a word of TLS
        while True:
            sock, _ = await listener.accept()
            accepted.append(sock)

    port = listener.getsockname()[1]
    client = RedisClient(
        RedisAddress("127.0.0.1", port), tls=True, connect_timeout=0.05, command_timeout=0.3
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(never_answer)
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
    listener.close()


async def test_a_server_that_is_not_redis_is_named_as_such() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(10)

    async def http_server() -> None:  # what a store URL with a web server's port reaches
        while True:
            sock, _ = await listener.accept()
            with sock:
                await sock.recv(4096)
                await sock.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    port = listener.getsockname()[1]
    client = RedisClient(RedisAddress("127.0.0.1", port), command_timeout=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http_server)
        await nursery.start(client.run)
        with pytest.raises(StoreRefused, match="does not speak the Redis protocol"):
            await client.execute("PING")
        await client.aclose()
        nursery.cancel_scope.cancel()
    listener.close()
