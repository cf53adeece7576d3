"""What a client without credentials, or a hostile page in an operator's browser, can make of
``listen.http``: no body held before the credentials are checked, no connection held past
``max_connections`` or a deadline, no traceback for a client's own bad bytes, and no push
from another site.  Each case was found by probing a running daemon."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio_websocket

from gateway.app import App
from gateway.config import load_config
from tests.support.daemon import running_daemon, write_config

TOKEN = "an-admin-token-long-enough"
QUEUES = {
    "orders": """\
        queue: orders
        password: s3cret-password
        topics:
          email: {backend: "fastcgi://127.0.0.1:9", script: /srv/app/index.php, paused: true}
        """,
    "open": """\
        queue: open
        topics:
          t: {backend: "fastcgi://127.0.0.1:9", script: /srv/app/index.php, paused: true}
        """,
}


def configure(tmp_path: Path, main_extra: str = "") -> Path:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    return write_config(tmp_path, QUEUES, main_extra="admin_token_file: admin.token\n" + main_extra)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(configure(tmp_path)) as app:
        yield app


async def connect(app: App) -> trio.SocketStream:
    host, _, port = app.http_address.rpartition(":")
    return await trio.open_tcp_stream(host, int(port))


async def read_until(stream: trio.SocketStream, marker: bytes, timeout: float = 5) -> bytes:
    received = b""
    with trio.fail_after(timeout):
        while marker not in received:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += chunk
    return received


async def stored(app: App, queue: str) -> int:
    assert app.store is not None
    stats = await app.store.stats(queue, "email" if queue == "orders" else "t")
    return stats.ready


@pytest.mark.parametrize(
    ("path", "auth"),
    [
        ("/v1/queues/orders/topics/email/test-delivery", "Bearer wrong-token"),
        ("/v1/queues/orders/jobs", ""),
        ("/v1/queues/orders/jobs", "Bearer wrong-password"),
    ],
)
async def test_no_body_is_read_before_the_credentials_are_checked(
    app: App, path: str, auth: str
) -> None:
    # A head announcing 4 MB, and no body: the 401 comes at once.  It used to wait for the
    # whole body, held in memory, 16 MB per connection on test-delivery.
    stream = await connect(app)
    async with stream:
        header = f"Authorization: {auth}\r\n" if auth else ""
        await stream.send_all(
            f"POST {path} HTTP/1.1\r\nHost: x\r\n{header}Content-Type: application/json\r\n"
            f"Content-Length: 4000000\r\n\r\n".encode()
        )
        answer = await read_until(stream, b"\r\n\r\n", timeout=2)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"connection: close" in answer.lower()


async def test_expect_100_continue_is_answered_once_the_head_is_accepted(app: App) -> None:
    body = json.dumps({"payload": "x" * 500_000}).encode()
    stream = await connect(app)
    async with stream:
        await stream.send_all(
            b"POST /v1/queues/orders/jobs HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer s3cret-password\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = await read_until(stream, b"\r\n\r\n", timeout=2)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await stream.send_all(body)
        answer = await read_until(stream, b'"duplicates"')
    assert answer.startswith(b"HTTP/1.1 202 ")
    assert await stored(app, "orders") == 1


async def test_a_body_framed_two_ways_is_refused_and_the_connection_closed(app: App) -> None:
    # Behind a proxy that frames by Content-Length, the smuggled request would be another
    # client's.
    stream = await connect(app)
    async with stream:
        await stream.send_all(
            b"POST /v1/queues/open/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 35\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answer = await read_until(stream, b"\x00never")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1") == 1  # the smuggled GET was not answered
    assert await stored(app, "open") == 0


@pytest.mark.parametrize(
    "rest",
    [
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a chunk size
        b'Content-Length: 100\r\n\r\n{"payload": ',  # then the client goes away
    ],
    ids=["bad-chunk", "cut-off"],
)
async def test_a_clients_broken_body_is_a_400_not_an_internal_error(
    app: App, rest: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    stream = await connect(app)
    async with stream:
        await stream.send_all(
            b"POST /v1/queues/open/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + rest
        )
        await stream.send_eof()
        answer = await read_until(stream, b"\x00never")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_websocket_upgrade_pipelined_behind_a_request_is_served(app: App) -> None:
    # Both in one segment: the upgrade's bytes came in the first request's read, and the
    # handshake waited for them for ever, outside every deadline.
    key = base64.b64encode(os.urandom(16)).decode()
    stream = await connect(app)
    async with stream:
        await stream.send_all(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            + f"GET /v1/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        answer = await read_until(stream, b"HTTP/1.1 101 ", timeout=3)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 101 " in answer


async def test_connections_past_max_connections_get_a_503(tmp_path: Path) -> None:
    config = configure(tmp_path, "producer: {max_connections: 3}\n")
    async with running_daemon(config) as app:
        held = [await connect(app) for _ in range(3)]
        await trio.sleep(0.1)  # accepted and counted
        extra = await connect(app)
        async with extra:
            answer = await read_until(extra, b"\x00never")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer
        await held.pop().aclose()
        await trio.sleep(0.1)
        again = await connect(app)
        async with again:
            await again.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await read_until(again, b"\x00never")).startswith(b"HTTP/1.1 200 ")
        for stream in held:
            await stream.aclose()
        assert app.http is not None and app.http.statistics().rejected_total == 1


@pytest.mark.parametrize(
    ("host", "origin", "status"),
    [
        ("x", "http://evil.example", 403),
        ("x", "null", 403),
        ("x", "http://[x", 403),
        # DNS rebinding: the hostile page's own name, pointed at 127.0.0.1 by its DNS, is the
        # same origin by name.  Only an address (or localhost) names this host for sure.
        ("evil.example:12019", "http://evil.example:12019", 403),
        ("127.0.0.1:12019", "http://127.0.0.1:12019", 202),
        ("localhost:12019", "http://localhost:12019", 202),
        ("[::1]:12019", "http://[::1]:12019", 202),
        ("x", None, 202),
    ],
)
async def test_a_page_on_another_site_cannot_push(
    app: App, host: str, origin: str | None, status: int
) -> None:
    # A form a page submits in the operator's browser: text/plain needs no CORS preflight.
    header = f"Origin: {origin}\r\n" if origin else ""
    body = b'{"evil": "from another origin"}'
    stream = await connect(app)
    async with stream:
        await stream.send_all(
            f"POST /v1/queues/open/jobs HTTP/1.1\r\nHost: {host}\r\n{header}Connection: close\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answer = await read_until(stream, b"\x00never")
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert await stored(app, "open") == (1 if status == 202 else 0)


async def test_a_rotated_admin_token_ends_the_live_feeds_opened_with_the_old_one(
    tmp_path: Path,
) -> None:
    config_path = configure(tmp_path)
    async with running_daemon(config_path) as app:
        url = f"ws://{app.http_address}/v1/live"
        async with trio_websocket.open_websocket_url(url) as socket:
            await socket.send_message(json.dumps({"token": TOKEN}))
            assert json.loads(await socket.get_message())["type"] == "stats"
            (tmp_path / "admin.token").write_text("a-new-admin-token-after-rotation\n")
            await app.reload(load_config(config_path))
            with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await socket.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.reason == "the admin token changed"


@pytest.mark.parametrize(
    ("path", "status"), [("/metrics", 401), ("/healthz", 413), ("/ui/app.js", 413)]
)
async def test_a_get_with_a_body_is_answered_on_its_head(app: App, path: str, status: int) -> None:
    # A megabyte announced to a GET that needs no token (or checked its token only in the
    # handler, as /metrics did) was invited (100 Continue) and held: 150 such connections
    # took the daemon from 41 to 203 MB.  A GET carries no body; /metrics is guarded.
    stream = await connect(app)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        answer = await read_until(stream, b"\r\n\r\n", timeout=2)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer


async def test_a_head_completed_by_a_later_read_is_held_to_the_limit(app: App) -> None:
    # h11 bounds a head only while incomplete: one completed in a second read was served
    # at up to twice MAX_HEADERS (64 KiB).
    stream = await connect(app)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65_000)
        await trio.sleep(0.2)  # read on its own
        await stream.send_all(b"a" * 35_000 + b"\r\n\r\n")
        answer = await read_until(stream, b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]


async def test_the_live_feed_takes_no_large_message_before_its_login(app: App) -> None:
    # A megabyte (the library's default) per connection before any token was checked.
    url = f"ws://{app.http_address}/v1/live"
    async with trio_websocket.open_websocket_url(url) as socket:
        await socket.send_message("x" * 10_000)
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await socket.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 1009
