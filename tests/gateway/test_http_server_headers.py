"""Repeated header fields and query parameters, and absolute-form targets, on ``listen.http``.

RFC 9110 5.3 lets a recipient join a field's repeated lines with ", " only when the field is
a list.  The server joined every field, so two ``Content-Type: application/json`` lines read
as "application/json, application/json", not JSON: the producer API stored the whole JSON
document as a raw payload.  Each case is sent over a raw socket to a running daemon.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway.app import App
from tests.support.daemon import running_daemon, write_config

TOKEN = "an-admin-token-long-enough"
PASSWORD = "s3cret-password"
QUEUE = """\
    queue: orders
    password: s3cret-password
    topics:
      email: {backend: "fastcgi://127.0.0.1:9", script: /srv/app/index.php, paused: true}
    """
UNICODE_QUEUE = """\
    queue: unicode
    password: "pässwörd"
    topics:
      t: {backend: "fastcgi://127.0.0.1:9", script: /srv/app/index.php, paused: true}
    """
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    config = write_config(
        tmp_path,
        {"orders": QUEUE, "unicode": UNICODE_QUEUE},
        main_extra="admin_token_file: admin.token\n",
    )
    async with running_daemon(config) as app:
        yield app


async def exchange(app: App, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request, read until the daemon closes: (status, lower-case headers, body)."""
    host, _, port = app.http_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    answer = b""
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def push(body: bytes, fields: str, target: str = "/v1/queues/orders/jobs") -> bytes:
    """A producer push; ``fields`` are header lines ("Name: value\\r\\n" each), one
    character a byte."""
    return (
        f"POST {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{fields}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


AUTH = f"Authorization: Bearer {PASSWORD}\r\n"
JSON = "Content-Type: application/json\r\n"


async def stored(app: App) -> int:
    assert app.store is not None
    return (await app.store.stats("orders", "email")).ready


async def test_a_content_type_sent_twice_alike_is_read_once(app: App) -> None:
    status, _, body = await exchange(app, push(b'{"payload": {"order": 42}}', AUTH + JSON + JSON))
    assert status == 202, body
    assert app.store is not None
    (record,) = await app.store.get_job(json.loads(body)["ids"][0])
    assert record.payload == b'{"order": 42}'  # was the whole document, as a raw body


async def test_an_authorization_sent_twice_alike_logs_in(app: App) -> None:
    status, _, body = await exchange(app, push(b'{"payload": 1}', AUTH + AUTH + JSON))
    assert status == 202, body
    admin = f"Authorization: Bearer {TOKEN}\r\n"
    status, _, body = await exchange(
        app,
        f"GET /v1/stats HTTP/1.1\r\nHost: x\r\n{admin}{admin}Connection: close\r\n\r\n".encode(),
    )
    assert status == 200, body


DIFFERING = {
    "Content-Type": AUTH + JSON + "Content-Type: text/plain\r\n",
    "Authorization": AUTH + "Authorization: Bearer another-password\r\n" + JSON,
    "Origin": AUTH + JSON + "Origin: http://x\r\nOrigin: http://elsewhere.example\r\n",
    # Read for every push: the trace of the jobs that name none of their own.
    "traceparent": AUTH + "Content-Type: text/plain\r\n"
    f"traceparent: {TRACE}\r\ntraceparent: {OTHER_TRACE}\r\n",
}


@pytest.mark.parametrize(("name", "fields"), DIFFERING.items(), ids=DIFFERING.keys())
async def test_a_field_of_one_value_sent_twice_differently_is_a_400_naming_it(
    app: App, name: str, fields: str
) -> None:
    status, headers, body = await exchange(app, push(b'{"payload": {"order": 42}}', fields))
    assert status == 400, body
    message = json.loads(body)["error"]
    assert name in message and "different values" in message, message
    assert headers["connection"] == "close"  # refused on its head: the body is not read
    assert await stored(app) == 0


async def test_the_admin_api_refuses_two_different_tokens(app: App) -> None:
    status, _, body = await exchange(
        app,
        f"GET /v1/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Authorization: Bearer not-the-token\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 400 and b"Authorization" in body, body


async def test_list_fields_and_fields_nobody_reads_may_repeat(app: App) -> None:
    fields = (
        AUTH + JSON + "Accept: application/json\r\nAccept: text/plain\r\n"
        "X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-For: 192.0.2.2\r\n"
    )
    status, _, body = await exchange(app, push(b'{"payload": 1}', fields))
    assert status == 202, body


async def test_a_query_parameter_given_twice_differently_is_a_400_naming_it(app: App) -> None:
    fields = AUTH + "Content-Type: text/plain\r\n"
    status, _, body = await exchange(
        app, push(b"raw", fields, "/v1/queues/orders/jobs?id=job-a&id=job-b")
    )
    assert status == 400, body  # was stored, silently, as job-b
    message = json.loads(body)["error"]
    assert "'id'" in message and "different values" in message, message
    assert await stored(app) == 0
    status, _, body = await exchange(
        app, push(b"raw", fields, "/v1/queues/orders/jobs?id=job-a&id=job-a")
    )
    assert (status, json.loads(body)) == (202, {"ids": ["job-a"], "duplicates": 0})
    status, _, body = await exchange(
        app,
        f"GET /v1/queues/orders/topics/email/dead?status=500&status=404 HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 400 and b"'status'" in body, body


async def test_an_absolute_form_target_without_a_path_means_the_root(app: App) -> None:
    # RFC 9110 4.2.3: an empty path is "/".  It was a 404 "no such endpoint: ".
    for target in ("http://x", "http://x?tab=overview"):
        status, headers, body = await exchange(
            app, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 200, body
        assert headers["content-type"].startswith("text/html")


async def test_a_websocket_upgrade_in_absolute_form_is_served(app: App) -> None:
    # It was told "/v1/live is a WebSocket: open it with a WebSocket client" (426).
    key = base64.b64encode(os.urandom(16)).decode()
    host, _, port = app.http_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            f"GET http://{app.http_address}/v1/live HTTP/1.1\r\nHost: {app.http_address}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        answer = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 101 "), answer


async def test_a_bearer_password_that_is_not_ascii_logs_in_as_basic_does(app: App) -> None:
    # curl -H 'Authorization: Bearer pässwörd' sends UTF-8; the field was read as ISO-8859-1
    # and the password never matched, while Basic (and the Redis protocol's AUTH) took it.
    basic = base64.b64encode("unicode:pässwörd".encode())
    for credentials in (b"Bearer " + "pässwörd".encode(), b"Basic " + basic):
        request = b"Authorization: " + credentials + b"\r\nContent-Type: text/plain\r\n"
        status, _, body = await exchange(
            app, push(b"raw", request.decode("latin-1"), "/v1/queues/unicode/jobs")
        )
        assert status == 202, (credentials, body)
