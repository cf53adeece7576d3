"""The producer HTTP API and health endpoints, driven with curl and urllib."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from adapters.storage.jobs import Priority
from gateway.app import App
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
          audit:
            backend: fastcgi://127.0.0.1:9
            script: /srv/app/index.php
            paused: true
        """,
    "app-emails": """\
        queue: "app:emails"
        password: "pw:1"
        topics:
          send: {backend: "http://127.0.0.1:9/", paused: true}
        """,
}


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


def call(
    app: App, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object], dict[str, str]]:
    request = urllib.request.Request(
        f"http://{app.http_address}{path}",
        data=body or None,
        method=method,
        headers=headers or {},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


BEARER = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}


async def test_json_push_single_and_batch(app: App) -> None:
    status, body, _ = await trio.to_thread.run_sync(
        call,
        app,
        "POST",
        "/v1/queues/orders/jobs",
        json.dumps(
            {"payload": {"order": 42}, "priority": "high", "attributes": {"tenant": "acme"}}
        ).encode(),
        BEARER,
    )
    ids = body["ids"]
    assert status == 202 and isinstance(ids, list) and len(ids) == 1
    job_id = ids[0]
    assert app.store is not None
    records = await app.store.get_job(job_id)
    assert {r.topic for r in records} == {"email", "audit"}  # fanned out
    assert records[0].payload == b'{"order": 42}'  # the text sent (test_bytes_edges.py)
    assert records[0].priority is Priority.HIGH
    assert records[0].attributes == {"tenant": "acme"}
    batch = {
        "jobs": [{"payload": "plain text", "id": "k-1"}, {"payload": [1, 2], "delay_ms": 60000}]
    }
    status, body, _ = await trio.to_thread.run_sync(
        call, app, "POST", "/v1/queues/orders/email/jobs", json.dumps(batch).encode(), BEARER
    )
    assert status == 202 and body["ids"][0] == "k-1"  # type: ignore[index]
    stats = await app.store.stats("orders", "email")
    assert (stats.ready, stats.delayed) == (2, 1)
    assert (await app.store.stats("orders", "audit")).ready == 1  # topic-targeted batch
    again = await trio.to_thread.run_sync(
        call,
        app,
        "POST",
        "/v1/queues/orders/email/jobs",
        json.dumps({"payload": "x", "id": "k-1"}).encode(),
        BEARER,
    )
    assert again[:2] == (202, {"ids": ["k-1"], "duplicates": 1})


async def test_basic_auth_for_a_queue_whose_name_holds_a_colon(app: App) -> None:
    """Basic auth ends the user at the first ':'; the queue in the URL says where it ends."""

    async def push_as(user_pass: str) -> tuple[int, str]:
        done = await trio.run_process(
            [
                "curl",
                "-sS",
                "-u",
                user_pass,
                "--data-binary",
                "x",
                "-w",
                "%{http_code}",
                f"http://{app.http_address}/v1/queues/app:emails/jobs",
            ],
            capture_stdout=True,
        )
        text = done.stdout.decode()
        return int(text[-3:]), text[:-3]

    status, body = await push_as("app:emails:pw:1")
    assert status == 202, body
    assert app.store is not None
    assert (await app.store.stats("app:emails", "send")).ready == 1
    status, body = await push_as("app:emails:pw:2")
    assert status == 401 and "invalid username-password pair" in body
    status, body = await push_as("orders:s3cret")
    assert status == 401 and "credentials are for queue 'orders', not 'app:emails'" in body
    status, body = await push_as(":pw:1")  # no user: the password alone
    assert status == 202, body


async def test_raw_body_with_curl_and_basic_auth(app: App, tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\x00\x01binary\xff")
    done = await trio.run_process(
        [
            "curl",
            "-sS",
            "-u",
            "orders:s3cret",
            "--data-binary",
            f"@{payload}",
            "-H",
            "Content-Type: application/octet-stream",
            "-H",
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            f"http://{app.http_address}/v1/queues/orders/email/jobs?priority=low&attr.tenant=acme",
        ],
        capture_stdout=True,
    )
    (job_id,) = json.loads(done.stdout)["ids"]
    assert app.store is not None
    (record,) = await app.store.get_job(job_id)
    assert record.payload == b"\x00\x01binary\xff"
    assert record.priority is Priority.LOW
    assert record.attributes == {"tenant": "acme"}
    assert record.trace_id == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        (
            "/v1/queues/orders/jobs",
            b'{"payload": 1}',
            {"Content-Type": "application/json"},
            401,
            "Authentication required",
        ),
        (
            "/v1/queues/orders/jobs",
            b'{"payload": 1}',
            {**BEARER, "Authorization": "Bearer no"},
            401,
            "invalid username-password pair",
        ),
        ("/v1/queues/nope/jobs", b'{"payload": 1}', BEARER, 404, "unknown queue 'nope'"),
        ("/v1/queues/orders/nope/jobs", b'{"payload": 1}', BEARER, 404, "unknown topic"),
        ("/v1/queues/orders/jobs", b'{"payload": 1', BEARER, 400, "not valid JSON"),
        ("/v1/queues/orders/jobs", b'{"pay": 1}', BEARER, 400, "with a 'payload'"),
        (
            "/v1/queues/orders/jobs",
            b'{"payload": 1, "delay": 5}',
            BEARER,
            400,
            "unknown job field(s): delay",
        ),
        (
            "/v1/queues/orders/jobs",
            b'{"payload": 1, "priority": "urgent"}',
            BEARER,
            400,
            "priority must be high, normal or low",
        ),
        (
            "/v1/queues/orders/jobs",
            json.dumps({"payload": "x" * 2000}).encode(),
            BEARER,
            413,
            "exceeds max_payload of 1024 bytes",
        ),
        (
            "/v1/queues/orders/jobs",
            b'{"jobs": [{"payload": 1}, {"id": "x"}]}',
            BEARER,
            400,
            "jobs[1]: each job is an object with a 'payload'",
        ),
        ("/v1/nothing", b"", {}, 404, "no such endpoint"),
    ],
)
async def test_bad_requests_say_what_is_wrong_and_store_nothing(
    app: App, path: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    got, document, _ = await trio.to_thread.run_sync(call, app, "POST", path, body, headers)
    assert got == status
    assert message in str(document["error"])
    assert app.store is not None
    assert (await app.store.stats("orders", "email")).pushed_total == 0


async def test_oversized_body_is_refused_before_it_is_read(app: App) -> None:
    huge = b"x" * (20 * 1024 * 1024)
    basic = base64.b64encode(b"orders:s3cret").decode()
    status, document, _ = await trio.to_thread.run_sync(
        call,
        app,
        "POST",
        "/v1/queues/orders/jobs",
        huge,
        {"Authorization": f"Basic {basic}", "Content-Type": "application/octet-stream"},
    )
    assert status == 413 and "over the limit" in str(document["error"])


async def test_health_and_readiness(app: App) -> None:
    assert (await trio.to_thread.run_sync(call, app, "GET", "/healthz"))[:2] == (
        200,
        {"status": "ok"},
    )
    assert (await trio.to_thread.run_sync(call, app, "GET", "/readyz"))[:2] == (
        200,
        {"status": "ready"},
    )
    status, _, headers = await trio.to_thread.run_sync(call, app, "DELETE", "/healthz")
    assert status == 405 and headers["Allow"] == "GET"


async def test_readiness_names_a_store_that_does_not_answer(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def hangs() -> None:
        await trio.sleep_forever()

    assert app.store is not None
    monkeypatch.setattr(app.store, "check", hangs)
    monkeypatch.setattr("gateway.app.READY_TIMEOUT", 0.1)
    status, document, _ = await trio.to_thread.run_sync(call, app, "GET", "/readyz")
    assert (status, document) == (
        503,
        {"status": "store unavailable", "error": "the store did not answer within 0.1s"},
    )
