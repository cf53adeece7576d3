"""The wall clock stepped under a running daemon (NTP), on both stores.

Leases and finished times are wall-clock stamps, so after a step forward the daemon's own
stamps look older than they are.  The jobs it is delivering must not be taken back and
delivered again, and dead letters must not be pruned as if they had aged.  The daemon runs in
this process with a wall clock the test steps.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import trio

from gateway import dispatcher
from tests.gateway.test_dispatch_faults import push
from tests.support.daemon import read_received, running_daemon, wait_received, write_config
from tests.support.phpfpm import PhpFpm
from tests.support.redis import RedisServer

HOUR, WEEK = 3600.0, 7 * 86400.0


class SteppedClock:
    """time.time(), plus the steps the test makes."""

    def __init__(self) -> None:
        self.stepped = 0.0

    def __call__(self) -> float:
        return time.time() + self.stepped


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    server: RedisServer = request.getfixturevalue("redis")
    return f"redis://127.0.0.1:{server.port}/0"


def topic(fpm: PhpFpm, extra: str = "") -> str:
    return f"""\
        queue: q
        topics:
          t:
            backend: fastcgi://127.0.0.1:{fpm.address.port}
            script: {fpm.script("record.php")}
            timeout: 10s
            retry: {{max_attempts: 1}}
{extra}"""


async def test_a_step_forward_does_not_take_back_the_jobs_being_delivered(
    recording_fpm: PhpFpm,
    record: Path,
    tmp_path: Path,
    store: str | None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(dispatcher, "SCHEDULER_INTERVAL", 0.3)  # Redis: look often
    clock = SteppedClock()
    config = write_config(tmp_path, {"q": topic(recording_fpm)}, store=store)
    async with running_daemon(config, clock=clock) as app:
        await push(app, b'{"sleep_ms": 2500}')
        await wait_received(record, 1)
        clock.stepped = HOUR
        assert app.store is not None
        with trio.fail_after(10):
            while (stats := await app.store.stats("q", "t")).done_total == 0:
                assert stats.dead_total == 0, stats
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # a second delivery would have begun by now
    assert [r.attempt for r in read_received(record)] == [1]
    assert (stats.expired_total, stats.dead_total) == (0, 0)
    (warning,) = [r for r in caplog.records if "wall clock stepped forward" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "seconds=3600" in warning.getMessage()
    assert "the leases of the 1 jobs held" in warning.getMessage()


async def test_a_step_forward_does_not_prune_dead_letters_as_if_they_had_aged(
    recording_fpm: PhpFpm,
    record: Path,
    tmp_path: Path,
    store: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatcher, "PRUNE_INTERVAL", 0.2)
    monkeypatch.setattr(dispatcher, "SCHEDULER_INTERVAL", 0.2)
    clock = SteppedClock()
    queue = topic(recording_fpm, "            dead: {max_age: 7d}\n")
    queue += "            completed: {max_age: 1h}\n"
    config = write_config(tmp_path, {"q": queue}, store=store)
    async with running_daemon(config, clock=clock) as app:
        await push(app, b'{"respond_status": 500}', b"{}")
        assert app.store is not None
        with trio.fail_after(10):
            while (stats := await app.store.stats("q", "t")).dead + stats.done < 2:
                await trio.sleep(0.05)
        clock.stepped = WEEK + HOUR
        await trio.sleep(1)  # several prunes
        stats = await app.store.stats("q", "t")
        assert (stats.dead, stats.done) == (1, 1)
