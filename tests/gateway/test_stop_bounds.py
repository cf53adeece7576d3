"""A stop is bounded by what the README promises whatever else holds on: a SQLite file another
process keeps locked, a producer that never reads its replies.  systemd's TimeoutStopSec is
sized from that promise; past it, the daemon is killed with its jobs still leased."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

import gateway.app as app_module
import gateway.dispatcher as dispatch
from adapters.storage import sqlite as sqlite_module
from adapters.storage.errors import StoreUnavailable
from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from adapters.storage.sqlite import SQLiteStore
from gateway.app import App
from gateway.config import load_config
from tests.support.daemon import wait_received, write_config
from tests.support.phpfpm import PhpFpm

pytestmark = pytest.mark.trio

#: What busgate's writer waits for a lock (``PRAGMA busy_timeout`` in sqlite.py), in seconds.
BUSY_TIMEOUT = 5.0

_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes it
"""


class Locker:
    """Another process holding the SQLite file's write lock, as a backup tool or a stray
    ``sqlite3`` shell would."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == b"locked\n"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)


async def test_a_push_waits_out_a_lock_a_little_longer_than_the_busy_timeout(
    tmp_path: Path,
) -> None:
    """A group whose BEGIN times out is tried again write by write: a lock another process
    holds for a while (a backup) is waited out, not answered "nothing was stored".  (The stop
    is bounded by CLOSE_GRACE instead: the test below.)"""
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path))
    locker = Locker(path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, _release_after, locker, BUSY_TIMEOUT + 1)
            result = await store.push("q", [("t", Filter())], [NewJob(b"job")])
        assert result.copies == 1
    finally:
        await store.aclose()


def _release_after(locker: Locker, seconds: float) -> None:
    time.sleep(seconds)
    locker.release()


async def test_a_lock_that_stays_fails_a_group_of_writes_after_two_waits_whatever_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a lock that is not let go, each group of writes hears "database is locked" after
    two busy timeouts, the second for a lock held a little longer.  Tried write by write, a
    group of k waited k+1 timeouts: a stop waited behind its idle topics' shielded reserves
    (85 s for six topics, past systemd's TimeoutStopSec)."""
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 0.4)
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path))
    locker = Locker(path)
    answered: list[float] = []
    began = trio.current_time()

    async def reserve(topic: str) -> None:
        with pytest.raises(StoreUnavailable, match="database is locked"):
            await store.reserve("q", topic, 10, 60)
        answered.append(trio.current_time() - began)

    try:
        async with trio.open_nursery() as nursery:
            for n in range(8):  # the first may go in a group of its own, the rest in another
                nursery.start_soon(reserve, f"t{n}")
    finally:
        await trio.to_thread.run_sync(locker.release)
        await store.aclose()
    # Two groups, two waits each: 1.6 s; write by write, 0.8 + 8 x 0.4 = 4 s.
    assert len(answered) == 8 and max(answered) < 2 * 2 * 0.4 + 0.8, answered


async def test_a_locked_sqlite_file_holds_a_stop_no_longer_than_its_graces(
    recording_fpm: PhpFpm,
    record: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM while another process holds the store's lock, two deliveries in flight past
    shutdown_timeout.  The release waits for one grace, the store's close for its own; the
    jobs left leased are logged.  Before, the stop waited for every queued write to time out
    (40 s for a 2 s shutdown_timeout), and said nothing of the jobs it left leased."""
    monkeypatch.setattr(dispatch, "RECORD_GRACE", 1.5)
    monkeypatch.setattr(app_module, "RECORD_GRACE", 1.5)
    monkeypatch.setattr(sqlite_module, "CLOSE_GRACE", 1.0)
    caplog.set_level(logging.INFO)
    queue = f"""\
        queue: q
        topics:
          t:
            backend: fastcgi://127.0.0.1:{recording_fpm.address.port}
            script: {recording_fpm.script("record.php")}
            concurrency: 2
        """
    config = load_config(write_config(tmp_path, {"q": queue}))
    db = tmp_path / "busgate.db"
    async with trio.open_nursery() as nursery:
        app: App = await nursery.start(App(config).run)
        assert app.service is not None
        entry = app.service.resolve("q", {})
        await app.service.push(entry, [NewJob(b'{"sleep_ms": 4000}') for _ in range(2)])
        await wait_received(record, 2)
        locker = await trio.to_thread.run_sync(Locker, db)
        began = trio.current_time()
        app.shutdown(timeout=0.3)
    took = trio.current_time() - began
    await trio.to_thread.run_sync(locker.release)
    # 0.3 s of deliveries, 1.5 s of grace, 1 s to close; before, more than 20 s.
    assert took < 0.3 + 1.5 + 1.0 + 1.5, took
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "release failed queue=q topic=t jobs=2" in m and "within the stop's 1.5s grace" in m
        for m in messages
    ), messages
    assert any("the store's writer did not finish within 1s" in m for m in messages), messages
    # Nothing is lost: the two jobs wait, leased, for their leases to run out.
    store = await SQLiteStore.open(str(db))
    try:
        stats = await store.stats("q", "t")
    finally:
        await store.aclose()
    assert (stats.leased, stats.done) == (2, 0)


async def test_a_producer_that_reads_no_reply_holds_a_stop_no_longer_than_its_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis-protocol client pipelines ECHOs and never reads: their replies fill the
    socket buffers.  The stop ends at shutdown_timeout plus the grace, not at the 30 s a
    reply may take to send (it took 26 s with shutdown_timeout 5s)."""
    monkeypatch.setattr(app_module, "RECORD_GRACE", 1.0)
    queue = """\
        queue: q
        topics:
          t:
            backend: fastcgi://127.0.0.1:9
            script: /srv/none.php
            paused: true
        """
    config = load_config(write_config(tmp_path, {"q": queue}))
    async with trio.open_nursery() as nursery:
        app: App = await nursery.start(App(config).run)
        assert app.resp is not None
        host, _, port = app.resp_address.rpartition(":")
        client = socket.create_connection((host, int(port)), timeout=0.5)
        echo = b"*2\r\n$4\r\nECHO\r\n$65536\r\n" + b"x" * 65536 + b"\r\n"

        def fill() -> None:
            """Send until busgate stops reading: its replies' output limit is reached."""
            try:
                for _ in range(10_000):
                    client.sendall(echo)
            except TimeoutError:
                return
            raise AssertionError("busgate went on reading")

        await trio.to_thread.run_sync(fill)
        began = trio.current_time()
        app.shutdown(timeout=0.5)
    took = trio.current_time() - began
    client.close()
    assert took < 0.5 + 1.0 + 1.0, took
