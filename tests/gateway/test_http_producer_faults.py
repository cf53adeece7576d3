"""The producer HTTP API against clients that bend HTTP, over raw sockets to a running daemon:
odd request targets, credentials, JSON that is almost right, pipelines, bodies too big or too
slow, heads that stall.  What must hold: a push is stored once or not at all, the answer says
why, and a connection is answered in order or closed, never left with stray bytes."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway import http_server
from gateway.app import App
from tests.gateway.test_producer_http import QUEUES
from tests.support.daemon import running_daemon, write_config


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


async def connect(app: App) -> trio.SocketStream:
    host, _, port = app.http_address.rpartition(":")
    return await trio.open_tcp_stream(host, int(port))


async def exchange(app: App, data: bytes, *, until: float = 5) -> bytes:
    """Send ``data``, then read until the daemon closes or ``until`` seconds pass."""
    stream = await connect(app)
    async with stream:
        await stream.send_all(data)
        return await read_all(stream, until)


async def read_all(stream: trio.SocketStream, until: float) -> bytes:
    received = b""
    with trio.move_on_after(until):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


def post(
    target: str,
    body: bytes,
    *,
    auth: str = "Bearer s3cret",
    content_type: str = "application/json",
    keep_alive: bool = False,
) -> bytes:
    close = "" if keep_alive else "Connection: close\r\n"
    return (
        f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
        f"Content-Type: {content_type}\r\n{close}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def answers(received: bytes) -> list[tuple[int, dict[str, object]]]:
    """Each (status, JSON body) in a stream of responses."""
    out = []
    while received.startswith(b"HTTP/1.1 "):
        head, _, rest = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        out.append((int(head[9:12]), json.loads(rest[:length])))
        received = rest[length:]
    return out


async def stored(app: App) -> int:
    assert app.store is not None
    return (await app.store.stats("orders", "email")).pushed_total


# -- request targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["//elsewhere/v1/queues/orders/jobs", "//v1/queues/orders/jobs"], ids=["host", "v1"]
)
async def test_a_path_starting_with_two_slashes_is_a_path_not_a_host(app: App, target: str) -> None:
    # urlsplit read "//elsewhere" as a host and routed the rest: a proxy in front, allowing
    # or denying by path, saw one path and busgate served another.
    (status, document), *_ = answers(await exchange(app, post(target, b'{"payload": 1}')))
    assert status == 404 and document == {"error": f"no such endpoint: {target}"}
    assert await stored(app) == 0


async def test_percent_encoded_and_non_ascii_queue_names(app: App) -> None:
    colon = answers(
        await exchange(
            app,
            post(
                "/v1/queues/app%3Aemails/jobs", b"x", auth="Bearer pw:1", content_type="text/plain"
            ),
        )
    )
    assert colon[0][0] == 202
    encoded = answers(await exchange(app, post("/v1/queues/%C3%A9t%C3%A9/jobs", b"{}")))
    assert encoded == [(404, {"error": "unknown queue 'été'"})]
    raw = await exchange(app, post("/v1/queues/été/jobs", b"{}"))
    assert raw.startswith(b"HTTP/1.1 400 ")  # not a valid request line: refused, then closed
    slash = answers(await exchange(app, post("/v1/queues/orders%2Femail/jobs", b'{"payload": 1}')))
    assert slash == [(404, {"error": "unknown queue 'orders/email'"})]
    assert await stored(app) == 0


# -- credentials ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue", "auth"),
    [
        ("orders", "Basic  " + base64.b64encode(b"orders:s3cret").decode()),  # 1*SP (RFC 9110)
        ("orders", "basic " + base64.b64encode(b"orders:s3cret").decode()),
        ("app:emails", "Basic " + base64.b64encode(b"app:emails:pw:1").decode()),
        ("app:emails", "Basic " + base64.b64encode(b":pw:1").decode()),
        ("app:emails", "Bearer pw:1"),
    ],
)
async def test_credentials_clients_send(app: App, queue: str, auth: str) -> None:
    received = await exchange(app, post(f"/v1/queues/{queue}/jobs", b'{"payload": 1}', auth=auth))
    assert answers(received)[0][0] == 202, received


async def test_a_basic_password_sent_in_latin_1_is_read_as_latin_1(tmp_path: Path) -> None:
    # Older clients (Java's, browsers without a charset in the challenge) encode Basic
    # credentials in ISO-8859-1; that was a 400 "malformed Basic credentials".
    queues = {
        "intl": """\
            queue: intl
            password: 'pässwort'
            topics:
              t: {backend: "http://127.0.0.1:9/", paused: true}
            """
    }
    async with running_daemon(write_config(tmp_path, queues)) as app:
        for encoding in ("utf-8", "latin-1"):
            credentials = base64.b64encode("intl:pässwort".encode(encoding)).decode()
            received = await exchange(
                app, post("/v1/queues/intl/jobs", b'{"payload": 1}', auth=f"Basic {credentials}")
            )
            assert answers(received)[0][0] == 202, (encoding, received)
        wrong = base64.b64encode("intl:passwort".encode("latin-1")).decode()
        received = await exchange(
            app, post("/v1/queues/intl/jobs", b'{"payload": 1}', auth=f"Basic {wrong}")
        )
        assert received.startswith(b"HTTP/1.1 401 ")


# -- bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", ["true", "1.5", '"1.5"', "[1]", "null"])
async def test_delay_ms_must_be_a_whole_number(app: App, delay: str) -> None:
    # JSON true was a delay of 1 ms, and 1.5 one of 1 ms: a producer's mistake, stored.
    body = f'{{"payload": 1, "delay_ms": {delay}}}'.encode()
    (status, document), *_ = answers(await exchange(app, post("/v1/queues/orders/jobs", body)))
    assert status == 400 and "delay_ms must be an integer" in str(document["error"])
    assert await stored(app) == 0


async def test_whole_delays_in_json_and_query(app: App) -> None:
    for body, target in [
        (b'{"payload": 1, "delay_ms": 1000}', "/v1/queues/orders/jobs"),
        (b'{"payload": 1, "delay_ms": 1e3}', "/v1/queues/orders/jobs"),
        (b'{"payload": 1, "delay_ms": "1000"}', "/v1/queues/orders/jobs"),
        (b"raw", "/v1/queues/orders/jobs?delay_ms=1000"),
    ]:
        content_type = "application/json" if body.startswith(b"{") else "text/plain"
        received = await exchange(app, post(target, body, content_type=content_type))
        assert answers(received)[0][0] == 202, (body, received)
    assert app.store is not None
    assert (await app.store.stats("orders", "email")).delayed == 4


async def test_a_content_type_other_than_json_is_a_raw_payload(app: App) -> None:
    received = await exchange(
        app, post("/v1/queues/orders/email/jobs", b'{"payload": 1}', content_type="text/plain")
    )
    ((status, document),) = answers(received)
    assert status == 202
    assert app.store is not None
    ids = document["ids"]
    assert isinstance(ids, list)
    (record,) = await app.store.get_job(ids[0])
    assert record.payload == b'{"payload": 1}'  # byte for byte, not unwrapped


async def test_pipelined_pushes_are_answered_in_order_on_one_connection(app: App) -> None:
    pipeline = (
        post("/v1/queues/orders/jobs", b'{"payload": 1}', keep_alive=True)
        # malformed: a 400, with the body read, so the connection goes on
        + post("/v1/queues/orders/jobs", b'{"payload": ', keep_alive=True)
        + post(
            "/v1/queues/orders/jobs",
            b'{"jobs": [{"payload": 2}, {"payload": 3}]}',
            keep_alive=True,
        )
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    got = answers(await exchange(app, pipeline))
    assert [status for status, _ in got] == [202, 400, 202, 200]
    assert len(got[2][1]["ids"]) == 2  # type: ignore[arg-type]
    assert await stored(app) == 3


async def test_an_oversized_chunked_body_is_refused_without_being_held(app: App) -> None:
    stream = await connect(app)
    async with stream:
        await stream.send_all(
            b"POST /v1/queues/orders/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
            b"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        received = b""
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                nonlocal received
                received = await read_all(stream, 10)
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            try:
                for _ in range(16 * 16):  # 16 MiB: twice the limit
                    await stream.send_all(chunk)
            except trio.BrokenResourceError:
                pass  # closed once refused, as it should be
    ((status, document),) = answers(received)
    assert status == 413 and "over the limit" in str(document["error"])
    assert b"connection: close" in received.lower()
    assert await stored(app) == 0


# -- stalls --------------------------------------------------------------------------------------


async def test_a_stalled_body_gets_a_408_and_the_connection_closes(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_server, "REQUEST_TIMEOUT", 0.5)
    started = trio.current_time()
    request = post("/v1/queues/orders/jobs", b'{"payload": 1}', keep_alive=True)
    received = await exchange(app, request[:-4])
    assert trio.current_time() - started < 3
    ((status, _),) = answers(received)
    assert status == 408 and b"connection: close" in received.lower()
    assert await stored(app) == 0


async def test_a_stalled_head_is_closed_at_the_request_timeout_without_a_byte(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A head that never ends waited for the idle timeout (60 s) rather than the request
    # timeout (30 s): the connection is idle only until a request begins.
    monkeypatch.setattr(http_server, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(http_server, "IDLE_TIMEOUT", 4.0)
    partial, idle = await connect(app), await connect(app)
    async with partial, idle:
        await partial.send_all(b"POST /v1/queues/orders/jobs HTTP/1.1\r\nHost: x\r\n")
        started = trio.current_time()
        assert await read_all(partial, 3) == b""  # closed, quietly
        assert trio.current_time() - started < 2
        # An idle connection is not a stalled request: it waits for its idle timeout.
        await idle.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_all(idle, 3)).startswith(b"HTTP/1.1 200 ")


async def test_an_idle_kept_alive_connection_is_closed_without_a_byte(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_server, "IDLE_TIMEOUT", 0.5)
    stream = await connect(app)
    async with stream:
        await stream.send_all(post("/v1/queues/orders/jobs", b'{"payload": 1}', keep_alive=True))
        received = await read_all(stream, 3)
    ((status, _),) = answers(received)  # the answer, then nothing: no 408 into the pool
    assert status == 202
