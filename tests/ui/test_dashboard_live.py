"""The dashboard's pages keep up with the daemon: dead letters while jobs keep dying, events
the live feed sampled out, a topic a reload removed, the overview's order, a long attribute,
a selection replayed after another operator.  Real daemon, php-fpm and Chromium, through the
helpers of ``test_dashboard``."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
import trio

from gateway import telemetry
from gateway.app import App
from gateway.config import load_config
from tests.support.daemon import running_daemon
from tests.support.phpfpm import PhpFpm
from tests.ui.test_dashboard import (
    PAUSED_QUEUE,
    TOKEN,
    admin_get,
    browser_installed,  # noqa: F401 -- the autouse fixture: fail when Chromium is missing
    daemon_config,
    dashboard,
    recording_topic,
    resp_port,
    sign_in,
    wait_received,
    wait_until,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

DIES = json.dumps({"respond_status": 404})


def dying_queue(fpm: PhpFpm) -> str:
    """orders/email: every job asking for a 404 dies at its first attempt."""
    return "queue: orders\ntopics:\n" + recording_topic(fpm, "email", max_attempts=1)


def dead_ids(app: App) -> list[str]:
    page = admin_get(app, "/v1/queues/orders/topics/email/dead?limit=100")
    return [job["id"] for job in page["jobs"]]


def xadd(app: App, queue: str, *fields: str) -> str:
    """XADD one job with these fields, as a producer would: its id."""
    producer = redis.Redis(port=resp_port(app))
    try:
        job_id = producer.execute_command("XADD", queue, "*", *fields)  # type: ignore[no-untyped-call]
    finally:
        producer.close()
    return str(job_id.decode())


def rows(page: Page, selector: str) -> int:
    return page.locator(selector).count()


async def test_the_dead_letter_list_follows_jobs_that_keep_dying(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = daemon_config(tmp_path, {"orders": dying_queue(recording_fpm)})

    def session(app: App) -> None:
        producer = redis.Redis(port=resp_port(app))
        with dashboard(app) as (page, errors):
            sign_in(page)
            page.goto("/#/topic/orders/email")
            page.locator("#dead-empty").wait_for()
            # A job dies every 200 ms, faster than the list's reload delay: the list must
            # still show them while they keep dying, not once they stop.
            pushed = 0
            started = time.monotonic()
            while time.monotonic() - started < 4:
                producer.lpush("orders", DIES)
                pushed += 1
                time.sleep(0.2)
            shown = rows(page, "#dead-body tr")
            assert shown >= pushed // 2, (shown, pushed)
            assert errors == []
        producer.close()

    async with running_daemon(config) as app:
        await trio.to_thread.run_sync(session, app)


async def test_pages_catch_up_from_the_snapshot_with_every_event_sampled_out(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Busy topics use up the live feed's events (so many a second over all topics): here
    none gets through, and the pages must notice from the per-second snapshot alone."""
    monkeypatch.setattr(telemetry, "EVENTS_PER_SECOND", 0)
    config = daemon_config(tmp_path, {"orders": dying_queue(recording_fpm)})

    def session(app: App) -> None:
        producer = redis.Redis(port=resp_port(app))
        with dashboard(app) as (page, errors):
            sign_in(page)
            page.goto("/#/topic/orders/email")
            page.locator("#dead-empty").wait_for()
            page.wait_for_timeout(1200)  # a snapshot or two of the empty topic
            producer.lpush("orders", DIES)
            (received,) = wait_received(record, 1)
            page.locator(f'#dead-body tr[data-id="{received.job_id}"]').wait_for()
            page.locator(f'#failures-body tr[data-job="{received.job_id}"]').wait_for()
            assert rows(page, "#live-attempts tr") == 0  # no event came indeed

            # The job page of a job not delivered yet shows it delivered.
            job_id = producer.execute_command(  # type: ignore[no-untyped-call]
                "XADD", "orders", "*", "payload", '{"n": 1}', "delay", "2500"
            ).decode()
            page.locator("#find-job-id").fill(job_id)
            page.locator("#find-job-id").press("Enter")
            page.locator("section.job-copy .badge.state-delayed").wait_for()
            wait_received(record, 2)
            page.locator("section.job-copy .badge.state-done").wait_for()
            assert errors == []
        producer.close()

    async with running_daemon(config) as app:
        await trio.to_thread.run_sync(session, app)


async def test_a_topic_page_says_when_its_topic_is_gone_or_unknown(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, {"jobs": PAUSED_QUEUE})

    def session(app: App) -> None:
        with dashboard(app) as (page, errors):
            sign_in(page)
            page.goto("/#/topic/jobs/work")
            page.locator("#topic-state", has_text="paused").wait_for()
            assert page.locator("#resume").is_enabled()
            # A reload removes the topic, which holds no job: nothing lists it any more.
            (config.parent / "conf.d" / "jobs.yaml").unlink()
            trio.from_thread.run(app.reload, load_config(config))
            page.locator("#topic-state", has_text="unknown").wait_for()
            assert "Unknown topic" in page.locator("#topic-info").inner_text()
            for button in ("#pause", "#resume", "#dead-delete-filter", "#dead-replay-filter"):
                assert page.locator(button).is_disabled(), button
            assert page.locator('[data-figure="ready"]').inner_text() == "\u2013"
            assert page.locator("#test-delivery").is_hidden()
            # So is a topic that never was (a mistyped address).
            page.goto("/#/topic/no/such")
            page.locator("#topic-state", has_text="unknown").wait_for()
            assert page.locator("#pause").is_disabled()
            assert all("404" in error for error in errors), errors

    async with running_daemon(config) as app:
        await trio.to_thread.run_sync(session, app)


async def test_queue_and_topic_ascending_is_by_name(tmp_path: Path) -> None:
    def topics(*names: str) -> str:
        return "".join(
            f"  {name}:\n    backend: fastcgi://127.0.0.1:9\n    script: /srv/x.php\n"
            "    paused: true\n"
            for name in names
        )

    # Configuration order (files by name, topics as written) is not name order.
    config = daemon_config(
        tmp_path,
        {
            "a": "queue: zeta\ntopics:\n" + topics("beta", "alpha"),
            "b": "queue: alpha\ntopics:\n" + topics("zz", "aa"),
        },
    )
    by_name = ["alpha/aa", "alpha/zz", "zeta/alpha", "zeta/beta"]
    script = (
        "() => [...document.querySelectorAll('tr.topic-row')]"
        ".map(r => r.dataset.queue + '/' + r.dataset.topic)"
    )

    def session(app: App) -> None:
        with dashboard(app) as (page, errors):
            sign_in(page)
            page.locator("#topics[data-ready=true]").wait_for()
            name = page.locator("#topics thead th").first
            assert name.get_attribute("aria-sort") == "ascending"
            assert page.evaluate(script) == by_name
            name.locator("button.sort").click()
            assert page.evaluate(script) == ["zeta/beta", "zeta/alpha", "alpha/zz", "alpha/aa"]
            name.locator("button.sort").click()
            assert name.get_attribute("aria-sort") == "ascending"
            assert page.evaluate(script) == by_name
            assert errors == []

    async with running_daemon(config) as app:
        await trio.to_thread.run_sync(session, app)


async def test_a_long_attribute_does_not_widen_the_dead_letter_table(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = daemon_config(tmp_path, {"orders": dying_queue(recording_fpm)})
    long_value = "x" * 3000

    def session(app: App) -> None:
        xadd(app, "orders", "payload", DIES, "tenant", "acme", "trace", long_value)
        wait_until("the job to die", lambda: len(dead_ids(app)) == 1)
        with dashboard(app) as (page, errors):
            sign_in(page)
            page.goto("/#/topic/orders/email")
            page.locator("#dead-body tr").first.wait_for()
            widths = page.evaluate(
                """() => {
                    const table = document.querySelector('#dead-table');
                    return [table.scrollWidth, table.parentElement.clientWidth];
                }"""
            )
            assert widths[0] <= widths[1], widths
            attribute = page.locator("#dead-body .attr", has_text="trace=")
            assert attribute.get_attribute("title") == f"trace={long_value}"
            assert errors == []

    async with running_daemon(config) as app:
        await trio.to_thread.run_sync(session, app)


async def test_replay_selected_counts_the_jobs_another_operator_took(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = daemon_config(tmp_path, {"orders": dying_queue(recording_fpm)})

    def delete_dead(app: App, job_id: str) -> None:
        host, _, port = app.http_address.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            body = json.dumps({"ids": [job_id]})
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            connection.request("POST", "/v1/queues/orders/topics/email/dead/delete", body, headers)
            assert connection.getresponse().status == 200
        finally:
            connection.close()

    def session(app: App) -> None:
        producer = redis.Redis(port=resp_port(app))
        producer.lpush("orders", DIES, DIES, DIES)
        producer.close()
        wait_until("three dead jobs", lambda: len(dead_ids(app)) == 3)
        with dashboard(app) as (page, errors):
            sign_in(page)
            page.goto("/#/topic/orders/email")
            boxes = page.locator("#dead-body tr input[type=checkbox]")
            boxes.nth(2).wait_for()
            first, second = boxes.nth(0).get_attribute("value"), boxes.nth(1).get_attribute("value")
            boxes.nth(0).check()
            boxes.nth(1).check()
            delete_dead(app, str(first))  # another operator, meanwhile
            page.locator("#dead-replay-selected").click()
            page.locator(".notice", has_text="Replayed 1 job (1 no longer dead").wait_for()
            # None of the selection is dead any more: said so, not blamed on a filter.
            page.locator(f'#dead-body tr[data-id="{first}"]').wait_for(state="detached")
            assert page.locator("#dead-selection").inner_text() == ""
            wait_until("the replayed job to die again", lambda: len(dead_ids(app)) == 2)
            third = next(job_id for job_id in dead_ids(app) if job_id != second)
            page.locator(f'#dead-body tr[data-id="{third}"] input[type=checkbox]').check()
            delete_dead(app, str(third))
            page.locator("#dead-replay-selected").click()
            notice = page.locator(".notice.info", has_text=f"job {third} is not a dead job")
            notice.wait_for()
            assert "filter" not in notice.inner_text()

            # Asked to delete for good, Enter cancels: the destructive button is not focused.
            page.locator(f'#dead-body tr[data-id="{second}"] input[type=checkbox]').check()
            page.locator("#dead-delete-selected").click()
            page.locator("#confirm").wait_for()
            assert page.evaluate("document.activeElement.id") == "confirm-cancel"
            page.keyboard.press("Enter")
            page.locator("#confirm").wait_for(state="hidden")
            assert second in dead_ids(app)
            assert all("404" in error for error in errors), errors

    async with running_daemon(config) as app:
        await trio.to_thread.run_sync(session, app)


async def test_on_a_phone_the_overview_table_scrolls_not_the_page(tmp_path: Path) -> None:
    # At 375 px the 1,050 px table widened the whole page: the header bar and the name
    # column scrolled off screen with it.
    config = daemon_config(tmp_path, {"jobs": PAUSED_QUEUE})

    def session(app: App) -> None:
        with dashboard(app) as (page, errors):
            page.set_viewport_size({"width": 375, "height": 800})
            sign_in(page)
            page.locator("#topics[data-ready=true]").wait_for()
            page_width, viewport, card_width, card_scroll = page.evaluate(
                """() => {
                    const card = document.querySelector('.table-card');
                    return [document.documentElement.scrollWidth, window.innerWidth,
                            card.clientWidth, card.scrollWidth];
                }"""
            )
            assert page_width <= viewport, (page_width, viewport)
            assert card_scroll > card_width  # the table scrolls inside its card
            page.goto("/#/topic/jobs/work")
            page.locator("#dead-table").wait_for()
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport, ("topic page", width)
            job_id = xadd(app, "jobs", "payload", "{}")
            page.goto(f"/#/job/{job_id}")
            page.locator("input.command").wait_for()
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport, ("job page", width)
            assert errors == []

    async with running_daemon(config) as app:
        await trio.to_thread.run_sync(session, app)
