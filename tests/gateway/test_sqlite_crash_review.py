"""The SQLite store under a real ``busgate run`` killed with SIGKILL at awkward moments.

Every push a producer saw acknowledged must be in the file after the kill and delivered after
a restart; a job is delivered twice only if its lease was held at the kill; a replay cut short
loses no dead job.  The file itself is read with the sqlite3 module between runs.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import redis
import trio

from adapters.storage.jobs import State
from tests.gateway.test_crash_recovery import start_daemon
from tests.support.daemon import read_received, write_config
from tests.support.phpfpm import PhpFpm
from tests.support.ports import free_port, wait_connectable

TOKEN = "a-crash-review-admin-token"


class Daemon:
    """``busgate run`` in a subprocess on fixed ports, killed and restarted at will."""

    def __init__(self, tmp_path: Path, fpm: PhpFpm, *, db: Path | None = None) -> None:
        self.db = db or tmp_path / "busgate.db"
        self.log = tmp_path / "daemon.log"
        self.resp_port = free_port()
        self.http_port = free_port()
        config = write_config(
            tmp_path,
            {
                "crash": f"""\
                    queue: crash
                    topics:
                      work:
                        backend: fastcgi://127.0.0.1:{fpm.address.port}
                        script: {fpm.script("record.php")}
                        concurrency: 8
                        timeout: 2s
                        lease: 3s
                        circuit: {{failures: 10000}}  # failures here are on purpose
                    """
            },
            main_extra="admin_token_file: admin.token\n",
        )
        (tmp_path / "admin.token").write_text(TOKEN + "\n")
        text = config.read_text().replace(str(tmp_path / "busgate.db"), str(self.db))
        text = text.replace("resp: 127.0.0.1:0", f"resp: 127.0.0.1:{self.resp_port}")
        config.write_text(text.replace("http: 127.0.0.1:0", f"http: 127.0.0.1:{self.http_port}"))
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = start_daemon(self.config, self.log)
        await trio.to_thread.run_sync(wait_connectable, "127.0.0.1", self.resp_port)
        await trio.to_thread.run_sync(wait_connectable, "127.0.0.1", self.http_port)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
            self.process = None

    def admin(self, method: str, path: str, body: object = None) -> dict[str, object]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            result: dict[str, object] = json.load(response)
            return result


def rows(db: Path) -> dict[bytes, tuple[int, int]]:
    """Every job in the file by payload: (state, attempt); and the depth table must agree."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot for both tables: the daemon may be writing
        jobs = {
            bytes(payload): (state, attempt)
            for payload, state, attempt in conn.execute(
                "SELECT payload, state, attempt FROM jobs JOIN payloads USING (seq)"
            )
        }
        counted = Counter(state for state, _ in jobs.values())
        depths = {state: n for state, n in conn.execute("SELECT state, n FROM depths") if n}
    finally:
        conn.close()
    assert depths == dict(counted), "the depth table drifted from the rows"
    return jobs


def replayed(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT sum(n) FROM counters WHERE name = 'replayed'").fetchone()
    finally:
        conn.close()
    return int(row[0] or 0)


async def wait_until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.1)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_every_acknowledged_push_survives_a_stop_mid_stream(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path, how: str
) -> None:
    """SIGKILL: nothing acknowledged is lost.  SIGTERM: the writer commits what it has
    queued before the store closes, and in-flight jobs are released, not left leased."""
    daemon = Daemon(tmp_path, recording_fpm)
    await daemon.start()
    acked: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()

    def produce(producer: int) -> None:
        # One payload per push, and a pipelined batch now and then: a kill may come
        # between the store's commit and the reply, never before the commit and after it.
        client = redis.Redis(port=daemon.resp_port, socket_timeout=10)
        n = 0
        try:
            while not stop.is_set():
                batch = [b"p%d-%d" % (producer, n + i) for i in range(1 if n % 7 else 20)]
                n += len(batch)
                assert client.rpush("crash", *batch) == len(batch)
                with lock:
                    acked.extend(batch)
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # the kill: this push was not acknowledged
        except redis.ResponseError as exc:  # the drain refuses it: not stored either
            assert "shutting down; nothing was stored" in str(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        await wait_until(lambda: len(acked) >= 3000, 60, "pushes")
        if how == "SIGKILL":
            daemon.kill()  # producers are mid-push, deliveries mid-flight
        else:
            daemon.stop()
        stop.set()
        for thread in threads:
            await trio.to_thread.run_sync(thread.join)
        stored = rows(daemon.db)
        missing = [p for p in acked if p not in stored]
        assert not missing, f"{len(missing)} acknowledged pushes lost, e.g. {missing[:5]}"
        leased_at_kill = {p for p, (state, _) in stored.items() if state == State.LEASED}
        if how == "SIGTERM":
            assert not leased_at_kill, "a clean stop left jobs leased"

        await daemon.start()
        await wait_until(
            lambda: set(acked) <= {r.body for r in read_received(record)}, 120, "deliveries"
        )
        await wait_until(
            lambda: all(s == State.DONE for s, _ in rows(daemon.db).values()), 30, "all done"
        )
    finally:
        stop.set()
        daemon.stop()
    twice = {body for body, n in Counter(r.body for r in read_received(record)).items() if n > 1}
    assert twice <= leased_at_kill, "delivered twice without a lease having expired"


async def test_leases_held_at_a_sigkill_come_back_after_their_lease(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    daemon = Daemon(tmp_path, recording_fpm)
    await daemon.start()
    payloads = [json.dumps({"n": n, "sleep_ms": 200}).encode() for n in range(200)]
    try:
        client = redis.Redis(port=daemon.resp_port)
        assert client.rpush("crash", *payloads) == len(payloads)
        client.close()
        await wait_until(lambda: len(read_received(record)) >= 20, 30, "first deliveries")
        daemon.kill()
        killed_at = time.time()
        stored = rows(daemon.db)
        leased = {p for p, (state, _) in stored.items() if state == State.LEASED}
        assert leased, "nothing was leased at the kill"

        await daemon.start()
        await wait_until(
            lambda: all(s == State.DONE for s, _ in rows(daemon.db).values()), 120, "all done"
        )
    finally:
        daemon.stop()
    conn = sqlite3.connect(daemon.db)
    try:
        expired = {
            bytes(payload): started
            for payload, started in conn.execute(
                "SELECT p.payload, a.started_at FROM attempts a JOIN payloads p"
                " ON p.seq = a.job_seq WHERE a.outcome = 'expired'"
            )
        }
    finally:
        conn.close()
    # Each job leased at the kill went back once its lease (3 s) ran out, counted as an
    # attempt, and was delivered again; none came back early.
    assert set(expired) == leased
    assert all(lease_until > killed_at - 3.5 for lease_until in expired.values())
    seen = Counter(r.body for r in read_received(record))
    assert set(seen) == set(payloads)
    assert {body for body, n in seen.items() if n > 1} <= leased
    attempts = {r.body: r.attempt for r in read_received(record)}
    assert all(attempts[p] == 2 for p in leased)


async def test_a_replay_cut_short_by_sigkill_loses_no_dead_job(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    daemon = Daemon(tmp_path, recording_fpm)
    await daemon.start()
    # 400 is dead at once: each job dies on every attempt, so a replay makes it dead again.
    payloads = [json.dumps({"n": n, "respond_status": 400}).encode() for n in range(1000)]
    path = "/v1/queues/crash/topics/work/dead/replay"
    try:
        client = redis.Redis(port=daemon.resp_port)
        assert client.rpush("crash", *payloads) == len(payloads)
        client.close()
        await wait_until(
            lambda: sum(s == State.DEAD for s, _ in rows(daemon.db).values()) == 1000, 60, "dead"
        )

        def replay() -> None:
            try:
                daemon.admin("POST", path, {"all": True, "rate": 200})
            except OSError:
                pass  # the kill

        replaying = threading.Thread(target=replay)
        replaying.start()
        await wait_until(lambda: len(read_received(record)) >= 1300, 30, "replay under way")
        daemon.kill()
        await trio.to_thread.run_sync(replaying.join)
        stored = rows(daemon.db)
        assert set(stored) == set(payloads)
        assert 0 < replayed(daemon.db) < 1000, "the kill did not cut the replay short"

        await daemon.start()
        await wait_until(
            lambda: all(s == State.DEAD for s, _ in rows(daemon.db).values()), 60, "dead again"
        )
        before = replayed(daemon.db)
        result = daemon.admin("POST", path, {"all": True})
        assert result["replayed"] == 1000
        assert replayed(daemon.db) == before + 1000
        await wait_until(
            lambda: all(s == State.DEAD and a == 1 for s, a in rows(daemon.db).values()),
            60,
            "replayed again",
        )
    finally:
        daemon.stop()
    assert set(rows(daemon.db)) == set(payloads)


async def test_two_daemons_on_one_file_share_its_jobs_and_each_others_expired_leases(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    # Sharing the file is meant to work (`busgate curl` opens the live store): SQLite's
    # locks order the writers, and each daemon's scheduler recovers the other's leases.
    db = tmp_path / "shared.db"
    first = Daemon(tmp_path / "first", recording_fpm, db=db)
    second = Daemon(tmp_path / "second", recording_fpm, db=db)
    payloads = {b"job-%d" % n for n in range(4000)}
    try:
        await first.start()
        await second.start()

        def produce(daemon: Daemon, offset: int) -> None:
            client = redis.Redis(port=daemon.resp_port)
            for start in range(offset, 4000, 1000):
                chunk = [b"job-%d" % n for n in range(start, start + 500)]
                assert client.rpush("crash", *chunk) == len(chunk)
            client.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, produce, first, 0)
            nursery.start_soon(trio.to_thread.run_sync, produce, second, 500)
        await wait_until(lambda: len(read_received(record)) >= 1000, 60, "deliveries")
        first.kill()
        leased_at_kill = {p for p, (state, _) in rows(db).items() if state == State.LEASED}
        await wait_until(lambda: all(s == State.DONE for s, _ in rows(db).values()), 60, "done")
    finally:
        first.stop()
        second.stop()
    seen = Counter(r.body for r in read_received(record))
    assert set(seen) == payloads
    assert {body for body, n in seen.items() if n > 1} <= leased_at_kill
