"""The dashboard in a real headless Chromium, against a daemon running in this process.

playwright's API runs on asyncio and these tests run on trio, so each browser session is one
blocking function (playwright's sync API) in a worker thread, while the daemon goes on
serving in trio's thread.  Everything a session does -- pushing jobs with redis-py, reading
php-fpm's record file, timing the admin API -- happens inside that function, so one thread
owns the browser from launch to close.

Screenshots and timings go to ``artifacts/`` (kept by CI).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
import trio

from gateway.app import App
from tests.support.daemon import Received, read_received, running_daemon, write_config
from tests.support.phpfpm import PhpFpm
from tests.support.ports import free_port
from tests.support.redis import RedisServer

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Error, Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
TOKEN = "dashboard-test-token-7f3c9a1e"
WAIT = 15.0  # seconds for anything the page or the daemon should do promptly
#: A queue whose one topic delivers nothing: for tests of the page, not of deliveries.
PAUSED_QUEUE = """\
    queue: jobs
    topics:
      work:
        backend: fastcgi://127.0.0.1:9
        script: /srv/app/work.php
        paused: true
    """


@pytest.fixture(autouse=True)
def browser_installed() -> None:
    """Fail (never skip) with what to install when the browser stack is missing."""
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append(
            "the playwright Python package (.venv/bin/pip install playwright;"
            " do not run `playwright install`, the tests use Debian's Chromium)"
        )
    if not Path(CHROMIUM).is_file():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        pytest.fail("the dashboard tests need " + " and ".join(missing), pytrace=False)


# -- the daemon ------------------------------------------------------------------------------


def daemon_config(directory: Path, queues: dict[str, str], store: str | None = None) -> Path:
    token_file = directory / "admin.token"
    directory.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN + "\n")
    return write_config(
        directory, queues, main_extra=f"admin_token_file: {token_file}\n", store=store
    )


def recording_topic(fpm: PhpFpm, name: str, *, max_attempts: int) -> str:
    return f"""\
  {name}:
    backend: fastcgi://127.0.0.1:{fpm.address.port}
    script: {fpm.script("record.php")}
    concurrency: 4
    timeout: 5s
    retry: {{max_attempts: {max_attempts}, backoff: 200ms, max_backoff: 400ms}}
"""


def resp_port(app: App) -> int:
    return int(app.resp_address.rpartition(":")[2])


def admin_get(app: App, path: str) -> Any:
    host, _, port = app.http_address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return json.loads(body)
    finally:
        connection.close()


def topic_stats(app: App, queue: str, topic: str) -> dict[str, Any]:
    document: dict[str, Any] = admin_get(app, f"/v1/queues/{queue}/topics/{topic}")
    return document


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll from the browser's thread (blocking is fine there: the daemon runs in trio's)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_received(record: Path, count: int) -> list[Received]:
    wait_until(f"{count} requests at php-fpm", lambda: len(read_received(record)) >= count)
    return read_received(record)


class RestartableDaemon:
    """A daemon the browser's thread can stop and start again (same config, same ports)."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.stop_requested = trio.Event()
        self.stopped = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        self.stop_requested = trio.Event()
        self.stopped = trio.Event()
        try:
            async with running_daemon(self.config) as app:
                task_status.started(app)
                await self.stop_requested.wait()
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        self.stop_requested.set()
        await self.stopped.wait()


# -- the browser -----------------------------------------------------------------------------


@contextmanager
def dashboard(app: App) -> Iterator[tuple[Page, list[str]]]:
    """A Chromium page on the daemon's dashboard and the console errors it logs."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                base_url=f"http://{app.http_address}", viewport={"width": 1440, "height": 1000}
            )
            page = context.new_page()
            page.set_default_timeout(WAIT * 1000)
            errors: list[str] = []

            def on_console(message: ConsoleMessage) -> None:
                if message.type == "error":
                    errors.append(f"console: {message.text} at {message.location}")

            def on_page_error(error: Error) -> None:
                errors.append(f"uncaught: {error}")

            page.on("console", on_console)
            page.on("pageerror", on_page_error)
            yield page, errors
        finally:
            browser.close()


def sign_in(page: Page) -> None:
    page.goto("/")
    page.locator("#login-token").fill(TOKEN)
    page.locator("#login-form button[type=submit]").click()
    page.locator("#login").wait_for(state="hidden")
    page.locator("#live-state[data-state=live]").wait_for()


def cell(page: Page, queue: str, topic: str, column: str) -> str:
    selector = f'tr.topic-row[data-queue="{queue}"][data-topic="{topic}"] td[data-col="{column}"]'
    return page.locator(selector).inner_text()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


# -- tests -----------------------------------------------------------------------------------


async def test_sign_in_and_the_overview_follows_pushes_live(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    orders = "queue: orders\ntopics:\n" + "".join(
        recording_topic(recording_fpm, name, max_attempts=3) for name in ("email", "audit")
    )
    billing = """\
        queue: billing
        topics:
          invoice:
            backend: fastcgi://127.0.0.1:9
            script: /srv/app/invoice.php
            paused: true
        """
    config = daemon_config(tmp_path, {"orders": orders, "billing": billing})

    def session(app: App) -> None:
        with dashboard(app) as (page, errors):
            page.goto("/")
            login = page.locator("#login")
            login.wait_for()
            # A wrong token is refused in words, and the form stays.
            page.locator("#login-token").fill("not-the-admin-token")
            page.locator("#login-form button[type=submit]").click()
            refusal = page.locator("#login-error")
            refusal.wait_for()
            assert "refused" in refusal.inner_text()
            assert "wrong admin token" in refusal.inner_text()
            assert login.is_visible()
            # the browser logs the 401 answer itself; nothing else may be logged
            assert all("401" in error for error in errors), errors
            errors.clear()

            sign_in(page)
            page.locator("#topics[data-ready=true]").wait_for()
            rows = page.locator("tr.topic-row")
            assert rows.count() == 3
            names = {
                (rows.nth(i).get_attribute("data-queue"), rows.nth(i).get_attribute("data-topic"))
                for i in range(3)
            }
            assert names == {("orders", "email"), ("orders", "audit"), ("billing", "invoice")}
            assert cell(page, "billing", "invoice", "state") == "paused"
            assert cell(page, "orders", "email", "circuit") == "closed"
            assert cell(page, "orders", "email", "p95") == "\u2013"  # no duration yet
            assert cell(page, "orders", "email", "failed") == "0"

            # Push while watching: the in/s cell shows the burst, then durations and a failed
            # attempt appear, all without reloading.
            producer = redis.Redis(port=resp_port(app))
            try:
                payloads = [json.dumps({"n": n}) for n in range(40)]
                payloads.append(json.dumps({"respond_status": 500}))
                assert producer.lpush("orders", *payloads) == len(payloads)
            finally:
                producer.close()
            email_in = 'tr.topic-row[data-queue="orders"][data-topic="email"] td[data-col="in"]'
            page.wait_for_function(
                "selector => document.querySelector(selector).textContent !== '0'",
                arg=email_in,
                polling="raf",
            )
            page.wait_for_function(
                """() => {
                    const row = document.querySelector(
                        'tr.topic-row[data-queue="orders"][data-topic="email"]');
                    return row.querySelector('td[data-col=p95]').textContent.endsWith('ms')
                        && row.querySelector('td[data-col=failed]').textContent !== '0';
                }"""
            )
            wait_received(record, 2 * len(payloads))
            assert page.locator(".stat", has_text="Paused").locator("strong").inner_text() == "1"
            page.wait_for_timeout(1500)  # a couple more ticks so the charts show the burst
            screenshot(page, "dashboard-overview.png")

            # Find a job by id from any page: its attempts and the CLI line to reproduce it.
            job_id = read_received(record)[0].job_id
            page.locator("#find-job-id").fill(job_id)
            page.locator("#find-job-id").press("Enter")
            copies = page.locator("section.job-copy")
            copies.first.wait_for()
            assert copies.count() == 2  # one copy per topic of the queue
            email = page.locator('section.job-copy[data-topic="email"]')
            email.locator("table.job-attempts tbody tr").first.wait_for()
            first_attempt = email.locator("table.job-attempts tbody tr").first.inner_text()
            assert "done" in first_attempt
            assert "200" in first_attempt
            command = email.locator("input.command")
            # The daemon's own main file, not the packaged default.
            assert command.input_value() == (
                f"busgate curl {job_id} --topic orders/email -c {os.path.abspath(config)}"
            )
            page.context.grant_permissions(["clipboard-read", "clipboard-write"])
            email.locator("button.copy-curl").click()
            email.locator(".copy-status", has_text="Copied").wait_for()
            assert page.evaluate("navigator.clipboard.readText()") == command.input_value()

            # Unknown ids are answered in words.
            page.locator("#find-job-id").fill("no-such-job")
            page.locator("#find-job-id").press("Enter")
            message = page.locator("#job-copies .form-error")
            message.wait_for()
            assert "no job 'no-such-job'" in message.inner_text()
            assert all("404" in error for error in errors), errors
            errors.clear()

            page.goto("/#/")
            page.locator("#topics[data-ready=true]").wait_for()
            page.locator("#sign-out").click()
            page.locator("#login").wait_for()
            assert page.evaluate("sessionStorage.length") == 0
            assert errors == []

    async with running_daemon(config) as app:
        await trio.to_thread.run_sync(session, app)


async def test_replay_from_the_dead_letter_browser_delivers_the_job(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    orders = "queue: orders\ntopics:\n" + recording_topic(recording_fpm, "email", max_attempts=1)
    config = daemon_config(tmp_path, {"orders": orders})

    def dead_count(app: App) -> int:
        count: int = topic_stats(app, "orders", "email")["depth"]["dead"]
        return count

    def session(app: App) -> None:
        producer = redis.Redis(port=resp_port(app))
        producer.lpush("orders", json.dumps({"respond_status": 500, "order": 7}))
        (first,) = wait_received(record, 1)
        job_id = first.job_id
        assert first.attempt == 1
        wait_until("the job to be dead-lettered", lambda: dead_count(app) == 1)

        with dashboard(app) as (page, errors):
            sign_in(page)
            page.goto("/#/topic/orders/email")
            dead_row = page.locator(f'#dead-body tr[data-id="{job_id}"]')
            dead_row.wait_for()
            assert "500" in dead_row.inner_text()
            assert '"order": 7' in dead_row.inner_text()
            failure = page.locator(f'#failures-body tr[data-job="{job_id}"]').first
            failure.wait_for()
            assert "dead" in failure.inner_text()
            assert "500" in failure.inner_text()
            assert page.locator("#dead-replay-selected").is_disabled()

            # Replay selected: the job is delivered again, from attempt 1.
            dead_row.locator("input[type=checkbox]").check()
            assert page.locator("#dead-selection").inner_text() == "1 job selected"
            page.locator("#dead-replay-selected").click()
            page.locator(".notice", has_text="Replayed 1 job").wait_for()
            received = wait_received(record, 2)
            assert [(r.job_id, r.attempt) for r in received] == [(job_id, 1), (job_id, 1)]
            assert received[1].body == first.body

            # It dies again (php still answers 500): the live feed brings it back to the list.
            wait_until("the job to die again", lambda: dead_count(app) == 1)
            dead_row.wait_for()

            # Replay all matching filter: a dry run counts, the dialog asks, then it replays.
            page.locator("#dead-status").fill("500")
            page.locator("#dead-replay-filter").click()
            dialog = page.locator("#confirm")
            dialog.wait_for()
            assert "1 dead job matches status 500" in dialog.inner_text()
            page.locator("#confirm-ok").click()
            page.locator(".notice", has_text="Replayed 1 job").last.wait_for()
            received = wait_received(record, 3)
            assert [(r.job_id, r.attempt) for r in received[2:]] == [(job_id, 1)]
            wait_until("the job to die a third time", lambda: dead_count(app) == 1)

            # A filter that matches nothing is said in words, nothing is replayed.
            page.locator("#dead-status").fill("404")
            page.locator("#dead-replay-filter").click()
            page.locator(".notice", has_text="no dead job matches that filter").wait_for()
            assert all("404" in error for error in errors), errors
            errors.clear()
            page.locator("#dead-clear").click()

            # The job page lists every attempt, newest state included.
            page.locator(f'#dead-body tr[data-id="{job_id}"] a').click()
            attempts = page.locator("table.job-attempts tbody tr")
            attempts.nth(2).wait_for()
            assert attempts.count() == 3
            for i in range(3):
                text = attempts.nth(i).inner_text()
                assert "dead" in text
                assert "500" in text
            assert page.locator("section.job-copy .badge.state-dead").is_visible()
            page.go_back()

            # Pause holds deliveries back; resume lets them through.
            page.locator("#pause").click()
            page.locator("#topic-state", has_text="paused").wait_for()
            assert page.locator("#resume").is_enabled()
            producer.lpush("orders", json.dumps({"while": "paused"}))
            time.sleep(1.5)
            assert len(read_received(record)) == 3
            page.locator("#resume").click()
            page.locator("#topic-state", has_text="running").wait_for()
            received = wait_received(record, 4)
            assert json.loads(received[3].body) == {"while": "paused"}

            # Test delivery reaches php-fpm now and shows what it answered.
            page.locator("#test-payload").fill('{"probe": true}')
            page.locator("#test-attributes").fill("tenant=acme")
            page.locator("#test-send").click()
            page.locator("#test-status").wait_for()
            assert page.locator("#test-status").inner_text() == "status 200"
            assert page.locator("#test-body").inner_text() == "recorded"
            probe = wait_received(record, 5)[4]
            assert probe.job_id.startswith("test-")
            assert probe.body == b'{"probe": true}'
            page.locator("#live tbody tr").first.wait_for()
            screenshot(page, "dashboard-topic.png")

            # Delete selected, after a confirmation: the dead letter is gone.
            page.locator("#dead-apply").click()
            dead_row.locator("input[type=checkbox]").check()
            page.locator("#dead-delete-selected").click()
            assert "Delete 1 dead job for good?" in page.locator("#confirm").inner_text()
            page.locator("#confirm-ok").click()
            page.locator(".notice", has_text="Deleted 1 job").wait_for()
            page.locator("#dead-empty").wait_for()
            wait_until("the dead letter to be gone", lambda: dead_count(app) == 0)
            page.locator('[data-figure="dead"]', has_text="0").wait_for()
            assert errors == []
        producer.close()

    async with running_daemon(config) as app:
        await trio.to_thread.run_sync(session, app)


@pytest.mark.slow
async def test_overview_of_500_topics_renders_within_a_second(tmp_path: Path) -> None:
    queues = {
        f"q{i:03d}": f"""\
            queue: q{i:03d}
            topics:
              jobs:
                backend: fastcgi://127.0.0.1:9
                script: /srv/app/jobs.php
                paused: true
            """
        for i in range(500)
    }
    config = daemon_config(tmp_path, queues)

    def session(app: App) -> dict[str, float]:
        host, _, port = app.http_address.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            connection.request("GET", "/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
            response = connection.getresponse()
            body = response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status == 200
        connection.close()
        assert sum(len(q["topics"]) for q in json.loads(body)["queues"]) == 500

        with dashboard(app) as (page, errors):
            sign_in(page)
            page.locator("#topics[data-ready=true]").wait_for()
            # Measure a fresh page load with the token already in this tab.
            page.reload()
            # (a function, not an expression: Playwright evals bare expressions in the page,
            # which the dashboard's CSP rightly refuses)
            page.wait_for_function("() => window.__busgateRendered !== undefined")
            rendered: float = page.evaluate("window.__busgateRendered")
            assert page.locator("tr.topic-row").count() == 500
            assert page.locator("#topics").get_attribute("data-rows") == "500"
            # Later ticks update the same rows in place.
            generated = page.locator("#topics").get_attribute("data-generated-at")
            page.evaluate("document.querySelector('tr.topic-row').__busgateMark = true")
            page.wait_for_function(
                "before => document.querySelector('#topics').dataset.generatedAt !== before",
                arg=generated,
            )
            assert page.evaluate("document.querySelector('tr.topic-row').__busgateMark === true")
            tick: float = page.evaluate("window.__busgateTickMs")
            # The filter narrows 500 rows at once.
            page.locator("#topic-filter").fill("q499")
            assert page.locator("#topic-count").inner_text() == "1 of 500 topics"
            assert errors == []
        return {
            "first_render_ms": round(rendered, 1),
            "tick_update_ms": round(tick, 1),
            "stats_median_ms": round(statistics.median(latencies), 2),
            "stats_max_ms": round(max(latencies), 2),
        }

    async with running_daemon(config) as app:
        timings = await trio.to_thread.run_sync(session, app)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dashboard-timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print("dashboard timings (500 topics):", timings)
    assert timings["first_render_ms"] < 1000, timings
    assert timings["stats_median_ms"] < 50, timings


async def test_live_feed_reconnects_and_a_refused_token_asks_again(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, {"jobs": PAUSED_QUEUE})
    # a fixed port, so the restarted daemon is where the page reconnects to
    config.write_text(
        config.read_text().replace("http: 127.0.0.1:0", f"http: 127.0.0.1:{free_port()}")
    )
    daemon = RestartableDaemon(config)

    async with trio.open_nursery() as nursery:
        app: App = await nursery.start(daemon.serve)

        def session() -> None:
            with dashboard(app) as (page, errors):
                sign_in(page)
                table = page.locator("#topics[data-ready=true]")
                table.wait_for()
                trio.from_thread.run(daemon.stop)
                page.locator("#live-state[data-state=retrying]").wait_for()
                assert "reconnecting in" in page.locator("#live-state").inner_text()
                trio.from_thread.run(nursery.start, daemon.serve)
                page.locator("#live-state[data-state=live]").wait_for(timeout=40_000)
                generated = table.get_attribute("data-generated-at")
                page.wait_for_function(
                    "before => document.querySelector('#topics').dataset.generatedAt !== before",
                    arg=generated,
                )
                # While the daemon was down the browser logged the refused connections.
                assert all("WebSocket connection to" in error for error in errors), errors
                errors.clear()

                # A token the daemon no longer accepts: cleared, and the form asks again.
                page.evaluate("sessionStorage.setItem('busgate.admin-token', 'a-token-it-refuses')")
                page.reload()
                message = page.locator("#login-error")
                message.wait_for()
                assert "refused the admin token" in message.inner_text()
                assert page.evaluate("sessionStorage.length") == 0
                assert page.locator("#view").is_hidden()
                assert all("401" in error for error in errors), errors
                sign_in(page)
                page.locator("#topics[data-ready=true]").wait_for()

        await trio.to_thread.run_sync(session)
        await daemon.stop()


async def test_a_banner_says_the_store_is_not_answering_and_goes_once_it_is(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = f"redis://127.0.0.1:{server.port}/0?timeout=1s&connect_timeout=200ms"
        config = daemon_config(tmp_path / "daemon", {"jobs": PAUSED_QUEUE}, store)
        async with running_daemon(config) as app:

            def session() -> None:
                with dashboard(app) as (page, errors):
                    sign_in(page)
                    page.locator("#topics[data-ready=true]").wait_for()
                    banner = page.locator("#store-down")
                    assert banner.is_hidden()
                    trio.from_thread.run_sync(server.stop)
                    banner.wait_for(state="visible", timeout=WAIT * 1000)
                    assert "The store is not answering" in banner.inner_text()
                    trio.from_thread.run_sync(server.start)
                    banner.wait_for(state="hidden", timeout=WAIT * 1000)
                    assert errors == []

            await trio.to_thread.run_sync(session)
    finally:
        server.stop()
