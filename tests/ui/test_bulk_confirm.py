"""The dashboard's "Delete all matching filter" deletes the jobs its dialog counted.

It confirmed a dry run's count, then posted the filter again: the jobs that failed while
the dialog was open were deleted too (36 confirmed, 94 deleted).  Now it sends the dry run's
``confirm`` token back, and the daemon deletes the jobs counted.

A real headless Chromium drives a daemon running in this process (as in test_dashboard.py),
which delivers to the h11 recording backend; it makes every job dead at its first attempt.
"""

from __future__ import annotations

import json
from pathlib import Path

import redis
import trio

from gateway.app import App
from tests.support.daemon import running_daemon
from tests.support.http_server import RecordingServer
from tests.ui.test_dashboard import (
    daemon_config,
    dashboard,
    resp_port,
    sign_in,
    topic_stats,
    wait_until,
)

DIES = json.dumps({"respond_status": 404})  # in dead_on: dead at the first attempt


async def test_delete_all_matching_deletes_what_the_dialog_counted(tmp_path: Path) -> None:
    def dead_count(app: App) -> int:
        count: int = topic_stats(app, "orders", "email")["depth"]["dead"]
        return count

    def fail(app: App, count: int) -> None:
        before = dead_count(app)
        with redis.Redis(port=resp_port(app)) as producer:
            producer.lpush("orders", *[DIES] * count)
        wait_until(f"{count} more dead jobs", lambda: dead_count(app) == before + count)

    def session(app: App) -> None:
        fail(app, 10)
        with dashboard(app) as (page, errors):
            sign_in(page)
            page.goto("/#/topic/orders/email")
            page.locator("#dead-body tr[data-id]").first.wait_for()
            page.locator("#dead-status").fill("404")
            page.locator("#dead-delete-filter").click()
            dialog = page.locator("#confirm")
            dialog.wait_for()
            assert "10 dead jobs match status 404" in dialog.inner_text()
            fail(app, 4)  # while the operator reads the dialog
            page.locator("#confirm-ok").click()
            page.locator(".notice", has_text="Deleted 10 jobs").wait_for()
            wait_until("the 10 to be gone", lambda: dead_count(app) == 4)
            assert errors == []

    backend = RecordingServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        queue = f"queue: orders\ntopics:\n  email:\n    backend: {backend.url}\n"
        queue += "    retry: {max_attempts: 1}\n"
        async with running_daemon(daemon_config(tmp_path, {"orders": queue})) as app:
            await trio.to_thread.run_sync(session, app)
        nursery.cancel_scope.cancel()
