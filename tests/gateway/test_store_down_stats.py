"""While the store does not answer, the stats say so: ``/v1/stats`` and ``/metrics`` (the
dashboard's banner is tests/ui's).  Before, they went on serving the last snapshot as if it
were current, with nothing to tell an operator, or an alert, that the store was down.  And
the log says so once, not every second for every topic."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

from adapters.storage.errors import StoreUnavailable
from adapters.storage.jobs import Job
from gateway.app import App
from tests.gateway.test_admin import TOKEN, api
from tests.gateway.test_admin_cli import busgate
from tests.support.daemon import running_daemon, write_config
from tests.support.redis import RedisServer

QUEUE = """\
    queue: jobs
    topics:
      # A 2 s lease: the idle scheduler looks every second, as the outage lasts 3 s.
      work: {backend: "fastcgi://127.0.0.1:9", script: /srv/x.php, paused: true, lease: 2s}
    """


async def store_state(app: App) -> dict[str, object]:
    status, document = await api(app, "GET", "/v1/stats")
    assert status == 200
    store: dict[str, object] = document["store"]
    return store


async def store_up(app: App) -> str:
    status, text = await api(app, "GET", "/metrics")
    assert status == 200
    lines: list[str] = text.splitlines()
    (line,) = [line for line in lines if line.startswith("busgate_store_up ")]
    return line


def post_job(app: App) -> tuple[int, str | None, str]:
    request = urllib.request.Request(
        f"http://{app.http_address}/v1/queues/jobs/jobs", data=b"hello", method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Retry-After"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Retry-After"], error.read().decode()


async def test_the_stats_say_while_the_store_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    server = RedisServer(tmp_path / "redis")
    server.start()
    (tmp_path / "admin.token").write_text(TOKEN)
    config = write_config(
        tmp_path / "daemon",
        {"jobs": QUEUE},
        main_extra=f"admin_token_file: {tmp_path / 'admin.token'}\n",
        store=f"redis://127.0.0.1:{server.port}/0?timeout=1s&connect_timeout=200ms",
    )
    try:
        async with running_daemon(config) as app:
            assert await store_state(app) == {"ok": True, "error": None, "since": None}
            assert await store_up(app) == "busgate_store_up 1.0"
            await trio.to_thread.run_sync(server.stop)
            with trio.fail_after(10):
                while (state := await store_state(app))["ok"]:
                    await trio.sleep(0.1)
            assert isinstance(state["error"], str) and state["error"]
            assert isinstance(state["since"], float)
            assert await store_up(app) == "busgate_store_up 0.0"
            url = f"http://{app.http_address}"
            shown = await busgate("stats", "-c", str(config), "--url", url)
            assert shown.code == 0, shown
            assert shown.out.startswith("the store is not answering, since "), shown.out
            assert "the figures below are from" in shown.out.splitlines()[0]
            # A push meanwhile is refused, and told when to try again.
            pushed = await trio.to_thread.run_sync(post_job, app)
            assert pushed[0] == 503 and pushed[1] == "1", pushed
            assert "nothing was acknowledged" in pushed[2], pushed
            # The outage's start stays put from one failed sample to the next.
            await trio.sleep(1.5)
            assert (await store_state(app))["since"] == state["since"]
            await trio.to_thread.run_sync(server.start)
            with trio.fail_after(10):
                while not (await store_state(app))["ok"]:
                    await trio.sleep(0.1)
            assert await store_up(app) == "busgate_store_up 1.0"
    finally:
        server.stop()
    # Down for about three seconds: the scheduler and the stats sample failed every second,
    # logged once each (the first), and the end of it once.
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("scheduler failed")]) == 1, messages
    assert len([m for m in messages if m.startswith("stats sample failed")]) == 1, messages
    assert any(m.startswith("the store answers again queue=jobs topic=work") for m in messages)
    assert any(m.startswith("stats sample succeeded again") for m in messages)


async def test_a_reserve_failing_while_the_scheduler_succeeds_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk (SQLite): a reserve writes and fails, the scheduler only reads and
    # succeeds.  The two shared one repeat, and each success ended it: "reserve failed" and
    # "the store answers again" took turns every second, for every topic with jobs waiting.
    caplog.set_level("INFO")
    queue = QUEUE.replace("paused: true", "paused: false")
    async with running_daemon(write_config(tmp_path, {"jobs": queue})) as app:
        store = app.store
        assert store is not None

        async def full(queue: str, topic: str, limit: int, lease: float) -> list[Job]:
            raise StoreUnavailable("injected: database or disk is full")

        reserve, store.reserve = store.reserve, full  # type: ignore[method-assign]
        await trio.to_thread.run_sync(post_job, app)
        await trio.sleep(3.5)
        store.reserve = reserve  # type: ignore[method-assign]
        with trio.fail_after(5):
            while not any(
                m.startswith("the store answers again")
                for m in (r.getMessage() for r in caplog.records)
            ):
                await trio.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("reserve failed")]) == 1, messages
    assert len([m for m in messages if m.startswith("the store answers again")]) == 1, messages
