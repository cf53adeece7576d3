"""Topics (and whole queues) a reload removed while they still hold jobs stay in view.

Their jobs stay in the store, undelivered.  The stats used to list configured topics only, so
an operator who removed a topic by mistake could not see them stranded.  Now `/v1/stats`, the
topic's own answer, the live feed, `/metrics`, `busgate stats` and the dashboard list such a
topic, `"configured": false`, for as long as it holds ready, delayed, leased or dead jobs, and
a reload warns of each.

A real daemon runs in-process on SQLite or on a real redis-server (the fixture of
test_admin_removed_topic), delivering to the h11 recording backend; the dashboard runs in a
real headless Chromium (as in tests/ui).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
import trio_websocket

from gateway.app import App
from gateway.config import load_config
from tests.gateway import test_admin_removed_topic as removed_topic
from tests.gateway.test_admin import TOKEN, api
from tests.gateway.test_admin_removed_topic import FAILS, orders_yaml, reload_with
from tests.gateway.test_operator_review import Daemon
from tests.support.daemon import running_daemon
from tests.support.http_server import RecordingServer
from tests.ui import test_dashboard as ui

daemon = removed_topic.daemon  # on SQLite and on Redis

STRANDED = (
    "topic {} was removed with {} jobs waiting ({} ready, {} delayed, 0 leased) and {} dead:"
    " they stay in the store, undelivered, until a topic of that name comes back; /v1/stats"
    " and `busgate stats` list it as not configured meanwhile"
)


async def stats_when(app: App, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """`/v1/stats` once it shows what ``ready`` waits for (it is sampled every second)."""
    with trio.fail_after(10):
        while True:
            status, document = await api(app, "GET", "/v1/stats")
            assert status == 200, document
            if ready(document):
                return dict(document)
            await trio.sleep(0.1)


def topics_of(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(t["queue"], t["topic"]): t for q in document["queues"] for t in q["topics"]}


def unconfigured(document: dict[str, Any], queue: str, topic: str) -> bool:
    return topics_of(document).get((queue, topic), {}).get("configured") is False


def queue_of(document: dict[str, Any], name: str) -> dict[str, Any]:
    (queue,) = [q for q in document["queues"] if q["name"] == name]
    return dict(queue)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "was removed with" in r.getMessage()
    ]


async def push_delayed(daemon: Daemon, payload: str, queue: str = "orders") -> None:
    host, _, port = daemon.app.resp_address.rpartition(":")

    def zadd() -> None:
        with redis.Redis(host=host, port=int(port)) as client:
            client.zadd(queue, {payload: time.time() + 3600})

    await trio.to_thread.run_sync(zadd)


async def test_a_removed_topic_holding_jobs_is_listed_as_not_configured_until_back(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    app = daemon.app
    await daemon.push(FAILS, FAILS)  # dead at once in both topics (max_attempts: 1)
    await daemon.dead_ids(2, "sms")
    await daemon.dead_ids(2, "email")
    status, _ = await api(app, "POST", "/v1/queues/orders/topics/sms/pause", {})
    assert status == 200
    await daemon.push("{}", "{}", "{}")  # sms is paused: they wait there, ready
    await push_delayed(daemon, '{"later": true}')
    await daemon.push("{}", queue="other")  # delivered: other/audit holds history only
    before = await stats_when(
        app,
        lambda d: (
            topics_of(d)["orders", "sms"]["depth"]["delayed"] == 1
            and topics_of(d)["other", "audit"]["totals"]["done"] == 1
        ),
    )
    email_keys = set(topics_of(before)["orders", "email"])

    caplog.set_level(logging.WARNING)
    await reload_with(daemon, orders_yaml(daemon.backend.url, "email"))
    assert warnings_of(caplog) == [STRANDED.format("orders/sms", 4, 3, 1, 2)]

    # /v1/stats lists it after the configured topics of its queue, saying it is not configured
    document = await stats_when(app, lambda d: unconfigured(d, "orders", "sms"))
    topics = topics_of(document)
    assert [t["topic"] for t in queue_of(document, "orders")["topics"]] == ["email", "sms"]
    sms = topics["orders", "sms"]
    assert sms["configured"] is False
    assert sms["depth"] == {"ready": 3, "delayed": 1, "leased": 0, "dead": 2, "done_kept": 0}
    assert (sms["totals"]["pushed"], sms["totals"]["dead"]) == (6, 2)
    assert (sms["backend"], sms["in_flight"], sms["paused"]) == (None, 0, False)
    assert set(sms) == email_keys | {"configured"}  # every reader finds what it reads
    # configured topics and queues read as before
    for key in (("orders", "email"), ("other", "audit")):
        assert set(topics[key]) == email_keys, key
    assert "configured" not in queue_of(document, "orders")
    assert "configured" not in queue_of(document, "other")

    # its own answer, with the failures it had
    status, answer = await api(app, "GET", "/v1/queues/orders/topics/sms")
    assert status == 200, answer
    assert (answer["configured"], answer["depth"]["ready"]) == (False, 3)
    assert [f["status"] for f in answer["recent_failures"]] == [500, 500]

    # busgate stats
    code, out, err = await daemon.cli("stats")
    assert (code, err) == (0, ""), out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("orders/sms ")]
    assert row[:5] == ["orders/sms", "3", "1", "0", "2"] and row[-2:] == ["-", "-"]
    assert "not configured (removed by a reload?): orders/sms;" in out
    code, out, err = await daemon.cli("stats", "--json")
    assert topics_of(json.loads(out))["orders", "sms"]["configured"] is False

    # /metrics: its store series, and a marker; no series of a dispatcher it does not have
    status, text = await api(app, "GET", "/metrics")
    assert status == 200
    assert 'busgate_jobs{queue="orders",state="ready",topic="sms"} 3.0' in text
    assert 'busgate_jobs_dead_total{queue="orders",topic="sms"} 2.0' in text
    assert 'busgate_topic_unconfigured{queue="orders",topic="sms"} 1.0' in text
    assert 'busgate_topic_unconfigured{queue="orders",topic="email"}' not in text
    assert 'busgate_paused{queue="orders",topic="sms"}' not in text
    assert 'busgate_paused{queue="orders",topic="email"} 0.0' in text

    # the live feed the dashboard reads
    async with trio_websocket.open_websocket_url(f"ws://{app.http_address}/v1/live") as socket:
        await socket.send_message(json.dumps({"token": TOKEN}))
        with trio.fail_after(10):
            while (message := json.loads(await socket.get_message()))["type"] != "stats":
                pass
    assert topics_of(message)["orders", "sms"]["configured"] is False
    assert "configured" not in topics_of(message)["orders", "email"]

    # dead jobs deleted: still listed, at once, for the jobs still waiting
    status, answer = await api(
        app, "POST", "/v1/queues/orders/topics/sms/dead/delete", {"all": True}
    )
    assert (status, answer["deleted"]) == (200, 2)
    status, document = await api(app, "GET", "/v1/stats")
    assert topics_of(document)["orders", "sms"]["depth"]["dead"] == 0

    # the whole queue removed, and another whose topic holds only finished history
    (daemon.config.parent / "conf.d" / "other.yaml").unlink()
    caplog.clear()
    await reload_with(daemon, None)
    # (sms was removed by the reload before: it is not warned of again)
    assert warnings_of(caplog) == [STRANDED.format("orders/email", 1, 0, 1, 2)]
    document = await stats_when(app, lambda d: unconfigured(d, "orders", "email"))
    assert [q["name"] for q in document["queues"]] == ["orders"]  # other/audit holds nothing
    orders = queue_of(document, "orders")
    assert (orders["configured"], [t["topic"] for t in orders["topics"]]) == (
        False,
        ["email", "sms"],
    )
    assert all(t["configured"] is False for t in orders["topics"])
    assert topics_of(document)["orders", "email"]["depth"]["dead"] == 2

    # configured again: read as any configured topic, and its jobs are delivered
    daemon.backend.requests.clear()
    await reload_with(daemon, orders_yaml(daemon.backend.url, "email", "sms"))
    document = await stats_when(app, lambda d: topics_of(d)["orders", "sms"]["totals"]["done"] == 3)
    assert "configured" not in queue_of(document, "orders")
    assert all("configured" not in t for t in topics_of(document).values())
    sms_requests = [r for r in daemon.backend.requests if r.headers["x-busgate-topic"] == "sms"]
    assert len(sms_requests) == 3
    status, answer = await api(app, "GET", "/v1/queues/orders/topics/sms")
    assert status == 200 and "configured" not in answer


async def test_a_removed_topic_that_holds_nothing_stays_unknown(daemon: Daemon) -> None:
    await daemon.push("{}")
    await stats_when(daemon.app, lambda d: topics_of(d)["orders", "sms"]["totals"]["done"] == 1)
    await reload_with(daemon, orders_yaml(daemon.backend.url, "email"))
    await daemon.app.telemetry.sample()  # not the sample from before the reload
    status, document = await api(daemon.app, "GET", "/v1/stats")
    assert status == 200
    assert ("orders", "sms") not in topics_of(document)
    status, answer = await api(daemon.app, "GET", "/v1/queues/orders/topics/sms")
    assert (status, answer) == (404, {"error": "unknown topic 'sms' in queue 'orders'"})
    status, text = await api(daemon.app, "GET", "/metrics")
    assert "busgate_topic_unconfigured" not in text and 'topic="sms"' not in text


async def test_the_openapi_document_describes_the_marker(daemon: Daemon) -> None:
    status, document = await api(daemon.app, "GET", "/openapi.json", token=None)
    assert status == 200
    topic = document["components"]["schemas"]["TopicStats"]["properties"]
    assert topic["configured"]["const"] is False
    assert "removed by a reload" in topic["configured"]["description"]
    stats = document["paths"]["/v1/stats"]["get"]["responses"]["200"]["content"]
    queue = stats["application/json"]["schema"]["properties"]["queues"]["items"]["properties"]
    assert queue["configured"]["const"] is False


async def test_the_dashboard_marks_a_removed_topic_not_configured(tmp_path: Path) -> None:
    backend = RecordingServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        config = ui.daemon_config(tmp_path, {"orders": orders_yaml(backend.url, "email", "sms")})
        drop_in = tmp_path / "conf.d" / "orders.yaml"
        drop_in.write_text(drop_in.read_text().replace("  sms:\n", "  sms:\n    paused: true\n"))
        async with running_daemon(config) as app:
            await trio.to_thread.run_sync(lpush, ui.resp_port(app), "orders", "{}", "{}")

            def reload(*topics: str) -> None:
                """From the browser's thread: rewrite the drop-in, reload as SIGHUP does."""
                drop_in.write_text(orders_yaml(backend.url, *topics))
                trio.from_thread.run(app.reload, load_config(config))

            await trio.to_thread.run_sync(dashboard_session, app, reload)
        nursery.cancel_scope.cancel()


def lpush(port: int, queue: str, *payloads: str) -> None:
    with redis.Redis(port=port) as client:
        client.lpush(queue, *payloads)


def dashboard_session(app: App, reload: Callable[..., None]) -> None:
    with ui.dashboard(app) as (page, errors):
        ui.sign_in(page)
        row = page.locator('tr.topic-row[data-queue="orders"][data-topic="sms"]')
        badge = row.locator("th.name .badge.unconfigured")
        row.wait_for()
        ui.wait_until(
            "sms paused with 2 ready", lambda: ui.cell(page, "orders", "sms", "ready") == "2"
        )
        assert ui.cell(page, "orders", "sms", "state") == "paused"
        assert badge.count() == 0

        # removed while the page is open: the row stays, marked
        reload("email")
        badge.wait_for()
        assert badge.inner_text() == "not configured"
        assert ui.cell(page, "orders", "sms", "ready") == "2"
        assert ui.cell(page, "orders", "sms", "state") == "not configured"
        assert ui.cell(page, "orders", "sms", "circuit") == "\u2013"
        assert ui.cell(page, "orders", "email", "state") == "running"
        assert page.locator("tr.topic-row .badge.unconfigured").count() == 2  # name and state
        queue_state = page.locator("tr.queue-row td[data-col=state]").inner_text()
        assert queue_state == "1 not configured"
        # "needs attention only" keeps it
        page.locator("#problems-only").check()
        assert row.is_visible()
        assert not page.locator('tr.topic-row[data-topic="email"]').is_visible()

        # its page says why nothing delivers it, and offers no replay, pause or test delivery
        row.locator("th.name a").click()
        page.locator("#topic-state", has_text="not configured").wait_for()
        assert "removed from the configuration" in page.locator("#topic-info").inner_text()
        assert page.locator('dd[data-figure="ready"]').inner_text() == "2"
        for button in ("#pause", "#resume", "#dead-replay-filter"):
            assert page.locator(button).is_disabled(), button
        assert page.locator("#dead-delete-filter").is_enabled()
        assert page.locator("#test-delivery").is_hidden()

        # added back: a topic like any other again, and its jobs are delivered
        reload("email", "sms")
        page.locator("#topic-state", has_text="running").wait_for()
        ui.wait_until(
            "the 2 jobs delivered",
            lambda: page.locator('dd[data-figure="done"]').inner_text() == "2",
        )
        assert "http backend" in page.locator("#topic-info").inner_text()
        assert page.locator("#pause").is_enabled()
        assert page.locator("#dead-replay-filter").is_enabled()
        assert page.locator("#test-delivery").is_visible()
        page.goto("/#/")
        ui.wait_until("the overview", lambda: ui.cell(page, "orders", "sms", "state") == "running")
        assert page.locator(".badge.unconfigured").count() == 0
        assert errors == []
