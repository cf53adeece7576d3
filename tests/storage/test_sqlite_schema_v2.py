"""SQLite store schema version 2: payloads in a table of their own.

A version 1 store kept each payload in its ``jobs`` row, and SQLite writes a whole row on
every UPDATE, overflow pages included: every lease, retry and ack wrote the payload again.
These tests pin what version 2 changes (a state change writes no payload), that every delete
takes its payload along, and that a version 1 file migrates on open, whole or not at all.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from adapters.storage.base import Finish, Retention
from adapters.storage.errors import StoreUnavailable
from adapters.storage.fanout import Filter
from adapters.storage.jobs import Attempt, DeadFilter, NewJob, Outcome, Priority, State
from adapters.storage.sqlite import SQLiteStore
from tests.storage.conftest import FakeClock

QUEUE = "orders"
FAN_OUT = [("email", Filter()), ("audit", Filter())]
TOPICS = ("email", "audit", "spam")  # spam: pushed to by name only
BUSGATE_APPLICATION_ID = 0x62736774
ROOT = Path(__file__).resolve().parents[2]

#: The tables of schema version 1, as busgate wrote them (adapters/storage/sqlite.py before
#: version 2): what a store file made by an earlier busgate holds.
V1_SCHEMA = (
    """CREATE TABLE jobs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- FIFO order within a priority
    id          TEXT    NOT NULL,
    queue       TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    state       INTEGER NOT NULL,
    priority    INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    attributes  TEXT,                               -- JSON object, NULL when empty
    attempt     INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL    NOT NULL,
    run_at      REAL    NOT NULL,
    lease_until REAL,
    finished_at REAL,
    trace_id    TEXT    NOT NULL,
    last_status INTEGER,
    last_error  TEXT,
    UNIQUE (queue, topic, id)
)""",
    "CREATE INDEX jobs_ready    ON jobs (queue, topic, state, priority, seq)",
    "CREATE INDEX jobs_timed    ON jobs (queue, topic, state, run_at)",
    "CREATE INDEX jobs_leases   ON jobs (queue, topic, state, lease_until)",
    "CREATE INDEX jobs_finished ON jobs (queue, topic, state, finished_at)",
    "CREATE INDEX jobs_id       ON jobs (id)",
    """CREATE TABLE attempts (
    job_seq    INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    started_at REAL    NOT NULL,
    duration   REAL    NOT NULL,
    outcome    TEXT    NOT NULL,
    status     INTEGER,
    error      TEXT,
    body       BLOB,
    stderr     BLOB
)""",
    "CREATE INDEX attempts_job ON attempts (job_seq)",
    """CREATE TABLE depths (
    queue TEXT NOT NULL, topic TEXT NOT NULL, state INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (queue, topic, state)
) WITHOUT ROWID""",
    """CREATE TABLE counters (
    queue TEXT NOT NULL, topic TEXT NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (queue, topic, name)
) WITHOUT ROWID""",
    "CREATE TABLE probe (data BLOB)",
)
V1_JOB_COLUMNS = (
    "seq, id, queue, topic, state, priority, payload, attributes, attempt, enqueued_at,"
    " run_at, lease_until, finished_at, trace_id, last_status, last_error"
)

BIG = bytes(range(256)) * 8192  # 2 MiB, every byte value: a payload on overflow pages


def attempt(job_attempt: int, outcome: Outcome, status: int | None, error: str | None) -> Attempt:
    return Attempt(job_attempt, 1_800_000_000.5, 0.25, outcome, status, error, b"body", b"warn")


async def jobs_in_every_state(store: SQLiteStore, clock: FakeClock) -> list[str]:
    """Ready, delayed, leased, retried, done and dead jobs, fanned out and not, with
    attributes and attempts; the top seq deleted, so AUTOINCREMENT's mark is above the
    last row.  Their ids."""
    pushed = await store.push(
        QUEUE,
        FAN_OUT,
        [
            NewJob(b'{"n": 1}', id="fanned", attributes={"tenant": "acme"}),
            NewJob(BIG, id="big", priority=Priority.HIGH),
            NewJob(b"", id="empty"),
            NewJob(b"later", id="later", run_at=clock.now + 3600),
            *(NewJob(f"job {n}".encode(), topic="email") for n in range(6)),
        ],
    )
    # Six of email's nine: big (high priority), then fanned, empty, job 0, 1 and 2.
    leased = {job.id: job for job in await store.reserve(QUEUE, "email", 6, lease=60)}
    await store.finish(
        [
            Finish(leased["big"], attempt(1, Outcome.RETRY, 500, "500"), Outcome.RETRY, 0.0),
            Finish(leased["fanned"], attempt(1, Outcome.DONE, 200, None), Outcome.DONE),
            Finish(leased["empty"], attempt(1, Outcome.DEAD, 422, "422"), Outcome.DEAD),
        ]
    )
    (audit,) = await store.reserve(QUEUE, "audit", 1, lease=60)
    assert audit.id == "big"
    await store.finish([Finish(audit, attempt(1, Outcome.DEAD, 410, "gone"), Outcome.DEAD)])
    await store.push(QUEUE, FAN_OUT, [NewJob(b"doomed", id="doomed", topic="spam")])
    (doomed,) = await store.reserve(QUEUE, "spam", 1, lease=60)
    await store.finish([Finish(doomed, attempt(1, Outcome.DEAD, 400, "bad"), Outcome.DEAD)])
    assert await store.delete_dead(QUEUE, "spam", ["doomed"]) == 1
    return [*pushed.ids, "doomed"]


def dump(path: Path) -> dict[str, list[Any]]:
    """Every row of a store's tables (payloads by seq, whichever table holds them)."""
    conn = sqlite3.connect(path)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        if "payload" in columns:  # version 1
            payloads = conn.execute("SELECT seq, payload FROM jobs ORDER BY seq").fetchall()
            jobs = conn.execute(
                "SELECT " + V1_JOB_COLUMNS.replace(" payload,", "") + " FROM jobs ORDER BY seq"
            ).fetchall()
        else:  # version 1's columns: version 3's lease tokens are no version 1 store's
            payloads = conn.execute("SELECT seq, payload FROM payloads ORDER BY seq").fetchall()
            jobs = conn.execute(
                "SELECT " + V1_JOB_COLUMNS.replace(" payload,", "") + " FROM jobs ORDER BY seq"
            ).fetchall()
        return {
            "jobs": jobs,
            "payloads": payloads,
            "attempts": conn.execute("SELECT * FROM attempts ORDER BY rowid").fetchall(),
            "depths": conn.execute("SELECT * FROM depths").fetchall(),
            "counters": conn.execute("SELECT * FROM counters").fetchall(),
            "sqlite_sequence": conn.execute("SELECT * FROM sqlite_sequence").fetchall(),
        }
    finally:
        conn.close()


def stamp_and_layout(path: Path) -> tuple[int, int, set[str], set[str]]:
    conn = sqlite3.connect(path)
    try:
        (application_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    finally:
        conn.close()
    return application_id, version, tables, columns


def write_v1_store(source: Path, path: Path, *, stamped: bool) -> None:
    """The jobs of the store at ``source`` in a file laid out by schema version 1, stamped
    as version 1, or, as every file was before the stamp, not stamped at all."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # as busgate left it
        conn.execute("ATTACH DATABASE ? AS source", (str(source),))
        conn.execute("BEGIN")
        for statement in V1_SCHEMA:
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO main.jobs ({V1_JOB_COLUMNS}) SELECT {V1_JOB_COLUMNS}"
            " FROM source.jobs JOIN source.payloads USING (seq)"
        )
        for table in ("attempts", "depths", "counters"):
            conn.execute(f"INSERT INTO main.{table} SELECT * FROM source.{table}")
        conn.execute(
            "UPDATE main.sqlite_sequence SET seq = (SELECT seq FROM source.sqlite_sequence"
            " WHERE name = 'jobs') WHERE name = 'jobs'"
        )
        if stamped:
            conn.execute(f"PRAGMA main.application_id = {BUSGATE_APPLICATION_ID}")
            conn.execute("PRAGMA main.user_version = 1")
        conn.execute("COMMIT")
    finally:
        conn.close()


async def read_everything(path: Path, ids: list[str], clock: FakeClock) -> list[Any]:
    """What the store's read paths answer for these jobs: records, dead letters, stats."""
    store = await SQLiteStore.open(str(path), clock=clock)
    try:
        return [
            [await store.get_job(job_id) for job_id in ids],
            [await store.list_dead(QUEUE, t, DeadFilter(), None, 100) for t in TOPICS],
            await store.stats_many([(QUEUE, t) for t in TOPICS]),
        ]
    finally:
        await store.aclose()


@pytest.fixture
async def source(tmp_path: Path, clock: FakeClock) -> tuple[Path, list[str]]:
    """A store of this busgate holding jobs in every state, closed; the ids of its jobs."""
    path = tmp_path / "source.db"
    store = await SQLiteStore.open(str(path), clock=clock)
    try:
        ids = await jobs_in_every_state(store, clock)
    finally:
        await store.aclose()
    return path, ids


@pytest.mark.parametrize("stamped", [True, False], ids=["version-1", "before-the-stamp"])
async def test_a_version_1_store_migrates_on_open_keeping_every_job(
    source: tuple[Path, list[str]],
    tmp_path: Path,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    stamped: bool,
) -> None:
    source_path, ids = source
    old = tmp_path / "old.db"
    write_v1_store(source_path, old, stamped=stamped)
    expected = dump(source_path)
    application_id, version, tables, columns = stamp_and_layout(old)
    assert (application_id, version) == ((BUSGATE_APPLICATION_ID, 1) if stamped else (0, 0))
    assert "payloads" not in tables and "payload" in columns
    assert dump(old) == expected  # the payloads in the jobs rows, every byte
    assert len(expected["payloads"]) == 14  # 4 jobs fanned out to 2 topics, 6 to one
    assert {State(row[4]) for row in expected["jobs"]} == set(State)

    with caplog.at_level(logging.INFO, logger="busgate.sqlite"):
        migrated = await read_everything(old, ids, clock)
    assert migrated == await read_everything(source_path, ids, clock)
    assert dump(old) == expected
    assert stamp_and_layout(old) == stamp_and_layout(source_path)
    (line,) = [r.getMessage() for r in caplog.records if "upgraded" in r.getMessage()]
    assert re.fullmatch(
        rf"{old}: store upgraded from schema version 1 to 3: moved the payloads of 14 jobs to"
        r" their own table in \d+\.\d\ds",
        line,
    ), line

    # The migrated store goes on: the big job is delivered whole; a new push takes a seq
    # above the deleted top one (AUTOINCREMENT's mark came along).  The upgrade's
    # exclusive lock is gone: a second busgate shares the file.
    store = await SQLiteStore.open(str(old), clock=clock)
    try:
        (big,) = await store.reserve(QUEUE, "email", 1, lease=60)
        assert (big.id, big.payload) == ("big", BIG)
        with trio.fail_after(2):  # not the busy timeout's 5 s
            other = await SQLiteStore.open(str(old), clock=clock)
        try:
            await other.push(QUEUE, FAN_OUT, [NewJob(b"new", id="new", topic="email")])
        finally:
            await other.aclose()
    finally:
        await store.aclose()
    [(_, top)] = expected["sqlite_sequence"]
    conn = sqlite3.connect(old)
    try:
        (seq,) = conn.execute("SELECT seq FROM jobs WHERE id = 'new'").fetchone()
    finally:
        conn.close()
    assert seq == top + 1


async def test_a_crash_in_the_middle_of_the_migration_leaves_the_version_1_file(
    source: tuple[Path, list[str]], tmp_path: Path, clock: FakeClock
) -> None:
    source_path, ids = source
    old = tmp_path / "old.db"
    write_v1_store(source_path, old, stamped=True)
    before = dump(old)
    # The whole migration runs, payloads copied and the column dropped, and the process is
    # killed before its COMMIT.
    script = (
        "import os, signal, sys, trio\n"
        "from adapters.storage import sqlite\n"
        "move_payloads = sqlite._move_payloads\n"
        "def move_then_die(conn):\n"
        "    move_payloads(conn)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "sqlite._move_payloads = move_then_die\n"
        "trio.run(sqlite.SQLiteStore.open, sys.argv[1])\n"
    )
    with trio.fail_after(60):
        died = await trio.run_process(
            [sys.executable, "-c", script, str(old)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_stderr=True,
            check=False,
        )
    assert died.returncode == -signal.SIGKILL, died.stderr
    # The migration's writes had reached the WAL (the 2 MiB payload does not fit SQLite's
    # page cache): uncommitted, they are not the file's.
    assert os.path.getsize(f"{old}-wal") > len(BIG)

    application_id, version, tables, columns = stamp_and_layout(old)
    assert (application_id, version) == (BUSGATE_APPLICATION_ID, 1)
    assert "payloads" not in tables and "payload" in columns
    assert dump(old) == before

    assert await read_everything(old, ids, clock) == await read_everything(source_path, ids, clock)
    assert stamp_and_layout(old)[:2] == (BUSGATE_APPLICATION_ID, 3)


async def assert_refused_while_open(path: Path, clock: FakeClock) -> None:
    """Opening ``path``, which needs an upgrade, while another connection holds it fails."""
    with pytest.raises(
        StoreUnavailable,
        match=rf"{path}: this busgate upgrades the store to schema version 3 on its first"
        r" start, which needs the file to itself, and another process has it open",
    ):
        await SQLiteStore.open(str(path), clock=clock)


async def test_the_upgrade_waits_for_the_file_to_itself(
    source: tuple[Path, list[str]], tmp_path: Path, clock: FakeClock
) -> None:
    source_path, ids = source
    old = tmp_path / "old.db"
    write_v1_store(source_path, old, stamped=True)
    before = dump(old)
    # What a busgate of version 1 still running on the file holds: an open WAL connection.
    running = sqlite3.connect(old, isolation_level=None)
    try:
        running.execute("SELECT count(*) FROM jobs").fetchone()
        await assert_refused_while_open(old, clock)
        assert stamp_and_layout(old)[:2] == (BUSGATE_APPLICATION_ID, 1)
        assert dump(old) == before
        # ... which goes on working: the layout it writes is still there.
        running.execute("UPDATE jobs SET payload = payload WHERE id = 'fanned'")
    finally:
        running.close()
    assert await read_everything(old, ids, clock) == await read_everything(source_path, ids, clock)


def payload_keys(path: Path) -> tuple[list[int], list[int]]:
    """The seqs of the jobs and the seqs of the payloads, as the file holds them."""
    conn = sqlite3.connect(path)
    try:
        jobs = [seq for (seq,) in conn.execute("SELECT seq FROM jobs ORDER BY seq")]
        payloads = [seq for (seq,) in conn.execute("SELECT seq FROM payloads ORDER BY seq")]
    finally:
        conn.close()
    return jobs, payloads


async def test_every_delete_takes_the_payload_along(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path), clock=clock)
    try:
        await jobs_in_every_state(store, clock)  # spam's dead job deleted among them
        jobs, payloads = payload_keys(path)
        assert jobs == payloads and len(jobs) == 14

        # An explicit id pushed again once its job is done replaces the old one.
        (job,) = await store.reserve(QUEUE, "audit", 1, lease=60)
        await store.finish([Finish(job, attempt(1, Outcome.DONE, 200, None), Outcome.DONE)])
        await store.push(QUEUE, FAN_OUT, [NewJob(b"again", id=job.id, topic="audit")])
        (record,) = [r for r in await store.get_job(job.id) if r.topic == "audit"]
        assert (record.state, record.payload) == (State.READY, b"again")
        jobs, payloads = payload_keys(path)
        assert jobs == payloads and len(jobs) == 14

        assert await store.delete_dead(QUEUE, "email", ["empty"]) == 1
        clock.advance(10)
        keep_none = Retention(max_count=0, max_age=0)
        assert [await store.prune(QUEUE, t, keep_none, keep_none) for t in TOPICS] == [1, 1, 0]
        jobs, payloads = payload_keys(path)
        assert jobs == payloads and len(jobs) == 11  # email's done and audit's dead gone
    finally:
        await store.aclose()


def no_autocheckpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # every commit appends to the WAL


async def wal_bytes_of_a_jobs_life(path: Path, size: int) -> int:
    """What the WAL grows by from a job's reserve to its ack, through an extend, a retry
    and a second reserve: every state change but the push."""
    store = await SQLiteStore.open(str(path))
    try:
        await store._writer.run(no_autocheckpoint)
        await store.push(QUEUE, FAN_OUT, [NewJob(b"x" * size, topic="email")])
        before = os.path.getsize(f"{path}-wal")
        (job,) = await store.reserve(QUEUE, "email", 1, lease=60)
        assert await store.extend(job, 120)
        retry = attempt(1, Outcome.RETRY, 503, "status 503")
        assert await store.finish([Finish(job, retry, Outcome.RETRY, run_at=0.0)]) == [True]
        (job,) = await store.reserve(QUEUE, "email", 1, lease=60)
        assert len(job.payload) == size
        done = attempt(2, Outcome.DONE, 200, None)
        assert await store.finish([Finish(job, done, Outcome.DONE)]) == [True]
        return os.path.getsize(f"{path}-wal") - before
    finally:
        await store.aclose()


async def test_a_state_change_does_not_write_the_payload_again(tmp_path: Path) -> None:
    # Version 1 wrote a 16 MiB job's payload twice per state change here (the row again,
    # and SQLite's secure_delete zeroing its old pages): about 128 MiB of WAL.
    small = await wal_bytes_of_a_jobs_life(tmp_path / "small.db", 1024)
    big = await wal_bytes_of_a_jobs_life(tmp_path / "big.db", 16 << 20)
    assert big - small < 1 << 20, f"{big} bytes of WAL against {small} for a 1 KiB job"


async def test_a_version_2_store_gains_the_lease_column_and_goes_on(
    source: tuple[Path, list[str]], tmp_path: Path, clock: FakeClock
) -> None:
    """Version 3 adds ``jobs.lease`` in place: every job stays, and a new lease works."""
    source_path, ids = source
    old = tmp_path / "v2.db"
    write_v2_store(source_path, old)
    assert "lease" not in stamp_and_layout(old)[3]
    assert await read_everything(old, ids, clock) == await read_everything(source_path, ids, clock)
    assert stamp_and_layout(old)[:2] == (BUSGATE_APPLICATION_ID, 3)
    assert "lease" in stamp_and_layout(old)[3]
    store = await SQLiteStore.open(str(old), clock=clock)
    try:
        (job,) = await store.reserve(QUEUE, "email", 1, lease=60)
        assert job.lease and await store.ack(job, attempt(job.attempt, Outcome.DONE, 200, None))
    finally:
        await store.aclose()


def write_v2_store(source: Path, target: Path) -> None:
    """A copy of the store at ``source`` laid out and stamped as schema version 2."""
    shutil.copy(source, target)
    conn = sqlite3.connect(target)
    try:
        conn.execute("ALTER TABLE jobs DROP COLUMN lease")
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
    finally:
        conn.close()


async def test_the_version_3_upgrade_waits_for_the_file_to_itself(
    source: tuple[Path, list[str]],
    tmp_path: Path,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A version 2 busgate running on would leave ``jobs.lease`` as it found it: a lease it
    ended would keep a version 3 holder's token, and that holder's late outcome would land on
    the version 2 daemon's next lease of the job (hunt 28).  So version 3 is added as
    version 2 was, with the file to itself."""
    source_path, ids = source
    old = tmp_path / "v2.db"
    write_v2_store(source_path, old)
    before = dump(old)
    running = sqlite3.connect(old, isolation_level=None)  # a version 2 busgate's connection
    try:
        running.execute("SELECT count(*) FROM jobs").fetchone()
        await assert_refused_while_open(old, clock)
        assert stamp_and_layout(old)[:2] == (BUSGATE_APPLICATION_ID, 2)
        assert "lease" not in stamp_and_layout(old)[3] and dump(old) == before
        running.execute("UPDATE jobs SET lease_until = lease_until")  # it goes on
    finally:
        running.close()
    with caplog.at_level(logging.INFO, logger="busgate.sqlite"):
        upgraded = await read_everything(old, ids, clock)
    assert upgraded == await read_everything(source_path, ids, clock)
    (line,) = [r.getMessage() for r in caplog.records if "upgraded" in r.getMessage()]
    assert re.fullmatch(rf"{old}: store upgraded from schema version 2 to 3 in \d+\.\d\ds", line)


async def test_a_version_2_daemons_lease_is_no_stale_version_3_holders(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A version 2 busgate on the same file reserves without a token: the row must not keep
    the token of an expired version 3 lease, or that stale holder's late outcome would land on
    the version 2 daemon's lease.  Every path that ends a lease clears the token."""
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path), clock=clock)
    try:
        await store.push(QUEUE, [("email", Filter())], [NewJob(b"x")])
        (stale,) = await store.reserve(QUEUE, "email", 1, lease=30)
        clock.advance(31)
        assert (await store.recover_expired(QUEUE, "email", max_attempts=1)).count == 1
        assert await store.replay_dead(QUEUE, "email", [stale.id]) == 1
        conn = sqlite3.connect(path)
        try:  # what a version 2 busgate's reserve does
            conn.execute(
                "UPDATE jobs SET state=?, attempt=attempt+1, lease_until=? WHERE id=?",
                (State.LEASED, clock.now + 30, stale.id),
            )
            conn.commit()
        finally:
            conn.close()
        assert not await store.ack(stale, attempt(stale.attempt, Outcome.DEAD, 400, "late"))
    finally:
        await store.aclose()
