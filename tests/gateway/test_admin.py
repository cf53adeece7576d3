"""The admin API against a real daemon and a real php-fpm."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from gateway.app import App
from gateway.resp import encode_command
from tests.support.daemon import running_daemon, wait_received, write_config
from tests.support.phpfpm import PhpFpm

TOKEN = "an-admin-token-long-enough"


def queue_yaml(fpm: PhpFpm, extra: str = "") -> str:
    return f"""\
        queue: orders
        password: s3cret
        topics:
          email:
            backend: fastcgi://127.0.0.1:{fpm.address.port}
            script: {fpm.script("record.php")}
            status_path: /fpm-status
            retry: {{max_attempts: 1}}
{extra}"""


@pytest.fixture
async def app(recording_fpm: PhpFpm, record: Path, tmp_path: Path) -> AsyncIterator[App]:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    config = write_config(
        tmp_path,
        {"orders": queue_yaml(recording_fpm)},
        main_extra="admin_token_file: admin.token\n",
    )
    async with running_daemon(config) as app:
        yield app


def call(
    app: App,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = TOKEN,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    headers = {"Content-Type": content_type} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://{app.http_address}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            is_json = response.headers.get_content_type() == "application/json"
            return response.status, json.loads(raw) if is_json else raw.decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def api(app: App, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    return await trio.to_thread.run_sync(lambda: call(app, method, path, body, **kw))


async def push(app: App, *payloads: bytes) -> None:
    host, _, port = app.resp_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        encode_command("AUTH", "s3cret") + encode_command("RPUSH", "orders", *payloads)
    )
    reply = b""
    while reply.count(b"\r\n") < 2:
        reply += await stream.receive_some(100)
    assert reply == b"+OK\r\n:%d\r\n" % len(payloads)
    await stream.aclose()


async def topic_stats(app: App) -> dict[str, Any]:
    await app.telemetry.sample()  # don't wait for the next tick
    status, document = await api(app, "GET", "/v1/queues/orders/topics/email")
    assert status == 200
    return dict(document)


async def settled(app: App, dead: int = 0, done: int = 0) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            stats = await topic_stats(app)
            if (
                stats["totals"]["dead"] >= dead
                and stats["totals"]["done"] >= done
                and (stats["depth"]["leased"] == 0 and stats["depth"]["ready"] == 0)
            ):
                return stats
            await trio.sleep(0.05)


async def test_token_is_required(app: App) -> None:
    assert (await api(app, "GET", "/v1/stats", token=None))[0] == 401
    status, document = await api(app, "GET", "/v1/stats", token="wrong-token-wrong-token")
    assert status == 401 and "admin token" in document["error"]
    assert (await api(app, "GET", "/metrics", token=None))[0] == 401
    assert (await api(app, "GET", "/healthz", token=None))[0] == 200
    status, document = await api(app, "GET", "/openapi.json", token=None)
    assert status == 200 and "/v1/queues/{queue}/topics/{topic}/dead/replay" in document["paths"]


TOPIC = "/v1/queues/orders/topics/email"


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token"], ids=["none", "wrong"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/stats"),
        ("GET", TOPIC),
        ("GET", "/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        ("GET", f"{TOPIC}/dead"),
        ("POST", f"{TOPIC}/dead/replay"),
        ("POST", f"{TOPIC}/dead/delete"),
        ("POST", f"{TOPIC}/pause"),
        ("POST", f"{TOPIC}/resume"),
        ("POST", f"{TOPIC}/test-delivery"),
        ("GET", "/v1/config"),
        ("GET", "/metrics"),
    ],
)
async def test_every_admin_route_wants_the_token(
    app: App, method: str, path: str, token: str | None
) -> None:
    # Only two routes were checked: any other could have lost its guard unnoticed.
    body = {"all": True} if method == "POST" else None
    assert (await api(app, method, path, body, token=token))[0] == 401


async def test_admin_api_is_off_without_a_token_file(tmp_path: Path) -> None:
    async with running_daemon(write_config(tmp_path, {})) as app:
        status, document = await api(app, "GET", "/v1/stats")
        assert status == 403 and "set admin_token_file" in document["error"]


async def test_stats_job_lookup_and_health(app: App, record: Path) -> None:
    await push(app, b'{"n": 1}', b'{"n": 2}')
    received = await wait_received(record, 2)
    stats = await settled(app, done=2)
    assert stats["totals"]["pushed"] == 2 and stats["totals"]["done"] == 2
    assert stats["duration_ms"]["samples"] == 2 and stats["duration_ms"]["p50"] > 0
    assert stats["circuit"]["state"] == "closed" and stats["paused"] is False
    await app.health.check()
    await app.telemetry.sample()
    health = (await topic_stats(app))["backend_health"]
    # 8 children, or 9 for a moment while php-fpm replaces one that a test left busy
    assert health["pool"] == "test" and health["total_processes"] >= 8
    status, document = await api(app, "GET", "/v1/stats")
    assert status == 200
    (queue,) = document["queues"]
    assert queue["name"] == "orders" and queue["topics"][0]["topic"] == "email"
    status, job = await api(app, "GET", f"/v1/jobs/{received[0].job_id}")
    assert status == 200
    (copy,) = job["copies"]
    # The two jobs run concurrently: compare with whichever php-fpm recorded first.
    assert (copy["state"], copy["payload"], copy["payload_encoding"]) == (
        "done",
        received[0].body.decode(),
        "utf-8",
    )
    assert copy["attempts"][0]["status"] == 200 and copy["attempts"][0]["body"] == "recorded"
    assert (await api(app, "GET", "/v1/jobs/nope"))[0] == 404


async def test_dead_letters_listed_replayed_and_deleted(app: App, record: Path) -> None:
    await push(
        app, *(b'{"respond_status": %d, "n": %d}' % (500 if n % 2 else 404, n) for n in range(6))
    )
    await wait_received(record, 6)
    await settled(app, dead=6)
    base = "/v1/queues/orders/topics/email/dead"
    status, page = await api(app, "GET", base + "?status=500&limit=2")
    assert status == 200 and len(page["jobs"]) == 2 and page["cursor"]
    status, rest = await api(app, "GET", base + f"?status=500&limit=10&cursor={page['cursor']}")
    assert len(rest["jobs"]) == 1 and rest["cursor"] is None
    assert (await api(app, "GET", base + "?limit=1000"))[0] == 400
    assert (await api(app, "GET", base + "?since=yesterday"))[0] == 400
    assert (await api(app, "GET", base + "?attribute=novalue"))[0] == 400
    assert (await api(app, "GET", "/v1/queues/orders/topics/nope/dead"))[0] == 404

    status, result = await api(
        app, "POST", base + "/replay", {"filter": {"status": 500}, "dry_run": True}
    )
    assert result.pop("confirm")  # the jobs counted, to act on exactly them
    assert (status, result) == (200, {"matched": 3, "replayed": 0, "dry_run": True})
    status, result = await api(app, "POST", base + "/replay", {"filter": {"status": 500}})
    assert (status, result) == (200, {"matched": 3, "replayed": 3})
    await wait_received(record, 9)  # delivered again (and dead again: they still answer 500)
    status, result = await api(app, "POST", base + "/replay", {"filter": {"status": 418}})
    assert status == 404 and "no dead job matches" in result["error"]
    status, result = await api(app, "POST", base + "/replay", {"ids": ["a"], "all": True})
    assert status == 400 and "exactly one of" in result["error"]
    status, result = await api(
        app, "POST", base + "/replay", b"ids=x", content_type="application/x-www-form-urlencoded"
    )
    assert status == 415  # a cross-site form cannot drive a mutation
    await settled(app, dead=9)
    status, result = await api(app, "POST", base + "/delete", {"all": True})
    assert status == 200 and result["deleted"] == 6
    assert (await topic_stats(app))["depth"]["dead"] == 0


async def test_replay_by_ids_is_paced_by_rate(app: App, record: Path) -> None:
    await push(app, *(b'{"respond_status": 404, "n": %d}' % n for n in range(4)))
    await wait_received(record, 4)
    await settled(app, dead=4)
    base = "/v1/queues/orders/topics/email/dead"
    status, page = await api(app, "GET", base + "?limit=10")
    ids = [job["id"] for job in page["jobs"]]
    started = trio.current_time()
    status, result = await api(app, "POST", base + "/replay", {"ids": ids, "rate": 5})
    assert (status, result) == (200, {"matched": 4, "replayed": 4})
    assert trio.current_time() - started >= 0.75  # 4 jobs at 5 per second
    await wait_received(record, 8)
    await settled(app, dead=4)
    # A pace that would hold the call open past MAX_PACED_SECONDS is refused, nothing replayed.
    status, result = await api(app, "POST", base + "/replay", {"all": True, "rate": 0.001})
    assert status == 400
    assert result["error"].startswith("4 jobs at 0.001/s would take 4000s; one call may take")
    assert (await topic_stats(app))["depth"]["dead"] == 4


async def test_pause_resume_and_recent_failures(app: App, record: Path) -> None:
    topic = "/v1/queues/orders/topics/email"
    assert (await api(app, "POST", topic + "/pause", b"", content_type="text/plain"))[0] == 415
    assert await api(app, "POST", topic + "/pause", {}) == (
        200,
        {"queue": "orders", "topic": "email", "paused": True},
    )
    await push(app, b'{"respond_status": 500}')
    await trio.sleep(0.3)
    stats = await topic_stats(app)
    assert stats["paused"] and stats["depth"]["ready"] == 1
    assert (await api(app, "POST", topic + "/resume", {}))[0] == 200
    await wait_received(record, 1)
    stats = await settled(app, dead=1)
    (failure,) = stats["recent_failures"]
    assert failure["status"] == 500 and failure["outcome"] == "dead"
    assert "status 500" in failure["error"] and failure["body"] == "recorded"


async def test_test_delivery_reaches_the_backend_and_stores_nothing(app: App, record: Path) -> None:
    status, result = await api(
        app,
        "POST",
        "/v1/queues/orders/topics/email/test-delivery",
        {"payload": {"hello": "test"}, "attributes": {"who": "me"}},
    )
    assert status == 200
    assert (result["status"], result["body"], result["failure"]) == (200, "recorded", None)
    assert result["duration_ms"] > 0
    (received,) = await wait_received(record, 1)
    assert received.body == b'{"hello":"test"}'
    assert received.job_id.startswith("test-")
    assert received.server["HTTP_X_BUSGATE_ATTR_WHO"] == "me"
    assert (await topic_stats(app))["totals"]["pushed"] == 0
    status, result = await api(app, "POST", "/v1/queues/orders/topics/email/test-delivery", {})
    assert status == 400


async def test_config_is_redacted(app: App) -> None:
    status, document = await api(app, "GET", "/v1/config")
    assert status == 200
    assert "s3cret" not in json.dumps(document)
    assert document["queues"][0]["password"] == "********"
    assert document["path"] == os.path.abspath(app.config.path)  # the main file


async def test_metrics(app: App, record: Path) -> None:
    await push(app, b"{}", b'{"respond_status": 500}')
    await wait_received(record, 2)
    await settled(app, dead=1, done=1)
    status, text = await api(app, "GET", "/metrics")
    assert status == 200
    assert 'busgate_jobs_pushed_total{queue="orders",topic="email"} 2.0' in text
    assert 'busgate_jobs_dead_total{queue="orders",topic="email"} 1.0' in text
    assert 'busgate_jobs{queue="orders",state="dead",topic="email"} 1.0' in text
    assert 'busgate_delivery_duration_seconds_count{queue="orders",topic="email"} 2.0' in text
    assert 'busgate_circuit_state{queue="orders",topic="email"} 0.0' in text


async def test_live_websocket(app: App, record: Path) -> None:
    url = f"ws://{app.http_address}/v1/live"
    async with trio_websocket.open_websocket_url(url) as socket:
        await socket.send_message(json.dumps({"token": TOKEN}))
        first = json.loads(await socket.get_message())
        assert first["type"] == "stats" and first["queues"][0]["name"] == "orders"
        await push(app, b'{"respond_status": 500}')
        with trio.fail_after(10):
            while (message := json.loads(await socket.get_message()))["type"] != "attempt":
                pass
        assert (message["queue"], message["outcome"], message["status"]) == ("orders", "dead", 500)
    async with trio_websocket.open_websocket_url(url) as socket:
        await socket.send_message(json.dumps({"token": "wrong"}))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await socket.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1008
    # A plain GET (curl, a browser tab) is told what the endpoint is, not that it is missing.
    status, document = await api(app, "GET", "/v1/live")
    assert (status, document) == (
        426,
        {"error": "/v1/live is a WebSocket: open it with a WebSocket client"},
    )


async def test_an_open_dashboard_does_not_hold_a_shutdown(app: App) -> None:
    # A shutdown waits for the HTTP requests being answered (a push may be stored already);
    # a WebSocket is a conversation, not one of them.
    url = f"ws://{app.http_address}/v1/live"
    async with trio_websocket.open_websocket_url(url) as socket:
        await socket.send_message(json.dumps({"token": TOKEN}))
        assert json.loads(await socket.get_message())["type"] == "stats"
        app.shutdown()
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed):
            while True:
                await socket.get_message()


async def test_a_selection_by_ids_counts_only_this_topics_dead_jobs(app: App, record: Path) -> None:
    await push(app, b'{"respond_status": 404}')
    await wait_received(record, 1)
    await settled(app, dead=1)
    base = "/v1/queues/orders/topics/email/dead"
    (dead,) = [job["id"] for job in (await api(app, "GET", base))[1]["jobs"]]
    chosen = {"ids": [dead, "no-such-job", dead], "dry_run": True}
    assert await api(app, "POST", base + "/replay", chosen) == (
        200,
        {"matched": 1, "replayed": 0, "dry_run": True},
    )
    # Named jobs none of which is dead are said so: no filter was given.
    status, result = await api(app, "POST", base + "/delete", {"ids": ["no-such-job"]})
    assert (status, result) == (
        404,
        {
            "error": "job no-such-job is not a dead job of orders/email"
            " (replayed or deleted already, or unknown)",
            "matched": 0,
            "deleted": 0,
        },
    )
    status, result = await api(app, "POST", base + "/replay", {"ids": ["a", "b", "a"]})
    assert status == 404 and result["error"].startswith("none of the 2 jobs is a dead job of")
