"""The producer HTTP API never drops what a producer sent with a 202, nor echoes its secrets."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.app import App
from tests.gateway.test_producer_http import BEARER, QUEUES, call
from tests.support.daemon import running_daemon, write_config

RAW = {"Authorization": "Bearer s3cret", "Content-Type": "application/octet-stream"}


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        (
            "/v1/queues/orders/jobs?priority=high&attr.tenant=acme",
            b'{"payload": 1}',
            BEARER,
            400,
            "query option(s) attr.tenant, priority with a JSON body",
        ),
        (
            "/v1/queues/orders/jobs",
            b'{"jobs": [{"payload": 1}], "priority": "high", "delay_ms": 60000}',
            BEARER,
            400,
            "unknown batch field(s): delay_ms, priority",
        ),
        ("/v1/queues/orders/jobs?payload=hello", b"x", RAW, 400, "not ?payload="),
        ("/v1/queues/orders/jobs", b'{"payload": {"a": NaN}}', BEARER, 400, "not valid JSON"),
        ("/v1/queues/orders/jobs", b'{"payload": -Infinity}', BEARER, 400, "not valid JSON"),
        ("/v1/queues/orders/jobs", b'{"payload": [1e400]}', BEARER, 400, "not valid JSON"),
        ("/v1/queues/orders/jobs?id=", b"x", RAW, 400, "a job id is"),
        ("/v1/queues/orders/jobs?id=%FF", b"x", RAW, 400, "not valid UTF-8"),
        (
            "/v1/queues/orders/jobs",
            gzip.compress(b"x"),
            {**RAW, "Content-Encoding": "gzip"},
            415,
            "Content-Encoding 'gzip' is not supported",
        ),
        ("/v1/queues/orders/jobs", b'{"payload": 1, "id": 12}', BEARER, 400, "id must be a string"),
    ],
)
async def test_what_would_be_dropped_or_mangled_is_a_refusal(
    app: App, path: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    got, document, _ = await trio.to_thread.run_sync(call, app, "POST", path, body, headers)
    assert (got, message in str(document["error"])) == (status, True), document
    assert app.store is not None
    assert (await app.store.stats("orders", "email")).pushed_total == 0


async def test_a_blank_query_attribute_is_kept(app: App) -> None:
    path = "/v1/queues/orders/email/jobs?attr.tenant="
    status, document, _ = await trio.to_thread.run_sync(call, app, "POST", path, b"x", RAW)
    assert status == 202, document
    ids = document["ids"]
    assert isinstance(ids, list)
    (job_id,) = ids
    assert app.store is not None
    (record,) = await app.store.get_job(job_id)
    assert record.attributes == {"tenant": ""}


@pytest.mark.parametrize(
    ("credentials", "status", "message"),
    [
        (b"correct-horse-battery", 400, "malformed Basic credentials"),
        (b"correct-horse-battery:", 401, "credentials are for another queue, not 'orders'"),
    ],
)
async def test_basic_credentials_never_echo_a_password(
    app: App, caplog: pytest.LogCaptureFixture, credentials: bytes, status: int, message: str
) -> None:
    caplog.set_level(logging.DEBUG)
    basic = {"Authorization": f"Basic {base64.b64encode(credentials).decode()}"}
    path = "/v1/queues/orders/jobs"
    got, document, _ = await trio.to_thread.run_sync(call, app, "POST", path, b"x", basic)
    assert (got, document["error"]) == (status, message)
    assert "correct-horse" not in caplog.text


async def test_openapi_lists_the_raw_body_options_and_every_refusal(app: App) -> None:
    def get() -> dict[str, Any]:
        url = f"http://{app.http_address}/openapi.json"
        with urllib.request.urlopen(url, timeout=10) as response:
            document: dict[str, Any] = json.loads(response.read())
            return document

    paths = (await trio.to_thread.run_sync(get))["paths"]
    for path in ("/v1/queues/{queue}/jobs", "/v1/queues/{queue}/{topic}/jobs"):
        post = paths[path]["post"]
        query = [p["name"] for p in post["parameters"] if p["in"] == "query"]
        assert query == ["id", "delay_ms", "priority", "traceparent"], path
        assert {"403", "415"} <= set(post["responses"]), path
