"""One odd request gets an error answer and the daemon serves on.

Each case here once raised out of its handler, through the server's nursery, and stopped the
whole daemon: producers, dispatchers and the admin API.  Several needed no token.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import trio

from gateway.app import App
from gateway.resp import encode_command
from gateway.resp_session import RespSession
from tests.support.daemon import running_daemon, write_config

TOKEN = "an-admin-token-long-enough"
QUEUE = """\
    queue: orders
    topics:
      email:
        backend: fastcgi://127.0.0.1:9
        script: /srv/app/index.php
        paused: true
    """


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    config = write_config(tmp_path, {"orders": QUEUE}, main_extra="admin_token_file: admin.token\n")
    async with running_daemon(config) as app:
        yield app


def get(path: str, token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode()


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


async def http(app: App, request: bytes) -> bytes:
    host, _, port = app.http_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


async def resp(app: App, *commands: tuple[str | bytes, ...]) -> list[bytes]:
    host, _, port = app.resp_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    replies = []
    async with stream:
        for command in commands:
            await stream.send_all(encode_command(*command))
            with trio.fail_after(10):
                replies.append(await stream.receive_some(65536))
    return replies


async def serving(app: App) -> None:
    assert (await http(app, get("/healthz", token=None))).startswith(b"HTTP/1.1 200 ")
    assert await resp(app, ("PING",)) == [b"+PONG\r\n"]


HTTP_CASES = {
    "HTTP/1.1 without Host": b"GET /healthz HTTP/1.1\r\n\r\n",
    "not HTTP at all": b"GARBAGE\r\n\r\n",
    "ui name with a NUL": get("/ui/a%00b", token=None),
    "ui name too long": get("/ui/" + "a" * 300, token=None),
    "request target //[x": get("//[x", token=None),
    "Basic credentials not ASCII": post(
        "/v1/queues/orders/jobs", b"{}", b"Authorization: Basic \xe9\xe9\r\n"
    ),
    "delay_ms 1e400": post("/v1/queues/orders/jobs", b'{"payload": "x", "delay_ms": 1e400}'),
    "delay_ms of 400 digits": post(
        "/v1/queues/orders/jobs", b'{"payload": "x", "delay_ms": %s}' % (b"9" * 400)
    ),
    "payload a lone surrogate": post("/v1/queues/orders/jobs", b'{"payload": "\\ud800"}'),
    "JSON nested 100k deep": post("/v1/queues/orders/jobs", b"[" * 100_000 + b"]" * 100_000),
    "limit of a superscript two": get("/v1/queues/orders/topics/email/dead?limit=%C2%B2"),
}


@pytest.mark.parametrize("request_bytes", HTTP_CASES.values(), ids=HTTP_CASES.keys())
async def test_odd_http_requests_are_refused(app: App, request_bytes: bytes) -> None:
    answer = await http(app, request_bytes)
    assert answer[9:10] == b"4", answer[:300]  # a 4xx, not a dropped connection or a 500
    await serving(app)


async def test_a_handler_bug_is_a_500_and_a_logged_traceback(
    app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> object:
        raise RuntimeError("a bug in a handler")

    monkeypatch.setattr(type(app.admin), "_configured", broken)
    answer = await http(app, get("/v1/queues/orders/topics/email/dead"))
    assert answer.startswith(b"HTTP/1.1 500 ") and b"internal error" in answer
    assert "a bug in a handler" in caplog.text
    await serving(app)


async def test_pause_while_a_reload_restarts_the_topic_is_a_409(app: App) -> None:
    key = ("orders", "email")
    restarting = app._dispatchers.pop(key)  # as App.reload does while the old one drains
    try:
        answer = await http(
            app,
            post(
                "/v1/queues/orders/topics/email/pause",
                b"{}",
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n",
            ),
        )
    finally:
        app._dispatchers[key] = restarting
    assert answer.startswith(b"HTTP/1.1 409 ") and b"Retry-After: 1" in answer
    await serving(app)


async def test_odd_commands_are_errors_on_a_connection_that_stays(app: App) -> None:
    replies = await resp(
        app,
        ("XADD", "orders", "*", "payload", "x", "delay", "9" * 400),
        ("HELLO", "9" * 5000),
        ("PING",),
    )
    assert replies[0].startswith(b"-ERR delay is not an integer or out of range")  # 64 bits
    assert replies[1].startswith(b"-ERR Protocol version is not an integer")
    assert replies[2] == b"+PONG\r\n"


async def test_a_command_bug_is_an_error_reply_and_a_logged_traceback(
    app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(session: RespSession, args: tuple[bytes, ...]) -> bytes:
        raise RuntimeError("a bug in a command")

    monkeypatch.setitem(
        RespSession.commands,
        b"ECHO",
        dataclasses.replace(RespSession.commands[b"ECHO"], handler=broken),
    )
    replies = await resp(app, ("ECHO", "x"), ("PING",))
    assert replies == [
        b"-ERR internal error, nothing was acknowledged: RuntimeError\r\n",
        b"+PONG\r\n",
    ]
    assert "a bug in a command" in caplog.text


async def test_a_websocket_client_that_never_answers_is_dropped(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Upgraded, then silent: no token, and no answer to the close frame either.  It used to
    # hold its connection (and a file descriptor) for ever, without a token.
    monkeypatch.setattr("gateway.admin.AUTH_TIMEOUT", 0.2)
    monkeypatch.setattr("gateway.admin.CLOSE_TIMEOUT", 0.2)
    key = base64.b64encode(os.urandom(16)).decode()
    host, _, port = app.http_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            f"GET /v1/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        with trio.fail_after(5):
            received = b""
            while chunk := await stream.receive_some(4096):  # until the server hangs up
                received += chunk
    assert received.startswith(b"HTTP/1.1 101 ")
    assert b'send {"token"' in received  # the close frame's reason


def port_of(app: App) -> int:
    return int(app.resp_address.rpartition(":")[2])


async def test_redis_py_transaction_pipelines_store_their_pushes_at_exec(app: App) -> None:
    # redis-py's pipeline() is MULTI ... EXEC unless told otherwise.
    def produce() -> list[object]:
        client = redis.Redis(port=port_of(app))
        with client.pipeline() as pipe:
            pipe.rpush("orders", b"one")
            pipe.rpush("orders", b"two", b"three")
            pipe.llen("orders")
            results: list[object] = pipe.execute()
        client.close()
        return results

    results = await trio.to_thread.run_sync(produce)
    assert results == [1, 2, 3]  # the jobs each push stored, then LLEN after them
    assert app.store is not None
    assert (await app.store.stats("orders", "email")).ready == 3


async def test_transactions_queue_check_and_discard_as_redis_does(app: App) -> None:
    replies = await resp(
        app,
        ("MULTI",),
        ("RPUSH", "orders", "a"),
        ("NOSUCH",),  # refused while queueing: EXEC then discards everything
        ("EXEC",),
        ("MULTI",),
        ("RPUSH", "orders", "b"),
        ("DISCARD",),
        ("EXEC",),
        ("MULTI",),
        ("RPUSH", "nowhere", "c"),  # queued; its error comes with EXEC's answer
        ("RPUSH", "orders", "d"),
        ("EXEC",),
    )
    assert replies[:4] == [
        b"+OK\r\n",
        b"+QUEUED\r\n",
        replies[2],
        b"-EXECABORT Transaction discarded because of previous errors.\r\n",
    ]
    assert replies[2].startswith(b"-ERR unknown command")
    assert replies[4:8] == [b"+OK\r\n", b"+QUEUED\r\n", b"+OK\r\n", b"-ERR EXEC without MULTI\r\n"]
    assert replies[8:11] == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n"]
    assert replies[11].startswith(b"*2\r\n-ERR unknown queue 'nowhere'") and replies[11].endswith(
        b":1\r\n"
    )
    assert app.store is not None
    assert (await app.store.stats("orders", "email")).ready == 1  # only "d"
    # An argument over the size limit is refused before the session sees it (it is never
    # buffered): in a transaction it aborts EXEC all the same.
    replies = await resp(
        app, ("MULTI",), ("RPUSH", "orders", "e"), ("RPUSH", "orders", b"x" * (2 << 20)), ("EXEC",)
    )
    assert replies[:2] == [b"+OK\r\n", b"+QUEUED\r\n"]
    assert replies[2].startswith(b"-ERR payload of 2097152 bytes exceeds max_payload")
    assert replies[3] == b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    assert (await app.store.stats("orders", "email")).ready == 1


async def test_config_get_is_a_map_under_resp3(app: App) -> None:
    def config() -> object:
        client = redis.Redis(port=port_of(app), protocol=3)
        try:
            return client.config_get("appendonly")
        finally:
            client.close()

    assert await trio.to_thread.run_sync(config) == {"appendonly": "no"}
