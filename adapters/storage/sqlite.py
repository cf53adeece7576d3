"""The embedded store: one SQLite file in WAL mode, for a single host.

One writer connection lives in its own thread.  Operations queue up for it and are committed
together (group commit): whatever arrived while the previous transaction was being synced
goes into the next one, so many producers share one fsync.  A group with a push is synced
(``synchronous=FULL``) before any producer is acknowledged; other groups are not (see
``_Writer``).  If one operation of a group fails, the
group is rolled back and its operations are redone one transaction each, so a bad operation
cannot take its neighbours down with it.

Depth per (queue, topic, state) is kept in its own table and updated in the same transaction
as every state change, so stats never count rows.

A job's payload lives in a table of its own (``payloads``), not in its ``jobs`` row: SQLite
writes a whole row on every UPDATE, overflow pages included, so a state change (a lease, a
retry, an ack) would write the payload again each time.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue as queue_module
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self, TypeVar

import outcome
import trio

from adapters.storage.base import (
    DEAD_SCAN_LIMIT,
    MAINTENANCE_BATCH,
    Due,
    Expiry,
    Finish,
    Retention,
    Route,
    Store,
    dead_cursor,
    parse_dead_cursor,
)
from adapters.storage.errors import (
    StoreCorrupt,
    StoreError,
    StoreRefused,
    StoreUnavailable,
    StoreUnsupported,
)
from adapters.storage.fanout import route
from adapters.storage.jobs import (
    Attempt,
    DeadFilter,
    DeadJob,
    DeadPage,
    Job,
    JobRecord,
    NewJob,
    Outcome,
    Priority,
    Pushed,
    PushResult,
    State,
    TopicStats,
    new_job_id,
    new_lease,
    new_trace_id,
)
from adapters.storage.priority import PriorityScheduler

log = logging.getLogger("busgate.sqlite")

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], T]

_MAX_GROUP = 1024  # operations per transaction
#: How long closing the store waits for the writer to run what is queued (see _Writer.stop).
CLOSE_GRACE = 5.0
#: How long a write waits for the lock another process holds (``PRAGMA busy_timeout``), in
#: seconds; a group of writes waits twice at most (_Writer._commit_group).
BUSY_TIMEOUT = 5.0
_PENDING = (State.READY, State.DELAYED, State.LEASED)

#: Bytes of -wal kept once a checkpoint has emptied it (``PRAGMA journal_size_limit``).
WAL_SIZE_LIMIT = 8 << 20

#: ``PRAGMA application_id`` of a busgate store ("bsgt"): tells its file from another program's.
_APPLICATION_ID = 0x62736774
#: ``PRAGMA user_version``: the layout of the tables below.  A busgate finding a higher one
#: refuses the file (it would misread it); files from before the stamp are version 1.
#: Version 2 moved the payloads out of ``jobs`` into ``payloads`` (see _move_payloads);
#: version 3 added ``jobs.lease`` (see _add_lease).
_SCHEMA_VERSION = 3

#: One payload per job row (so per topic copy of a fanned-out job, as the Redis store keeps
#: them), under the row's seq; deleted with the row (_delete_jobs).
_PAYLOADS = """CREATE TABLE IF NOT EXISTS payloads (
    seq     INTEGER PRIMARY KEY,  -- jobs.seq
    payload BLOB    NOT NULL
)"""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- FIFO order within a priority
    id          TEXT    NOT NULL,
    queue       TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    state       INTEGER NOT NULL,
    priority    INTEGER NOT NULL,
    attributes  TEXT,                               -- JSON object, NULL when empty
    attempt     INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL    NOT NULL,
    run_at      REAL    NOT NULL,
    lease_until REAL,
    lease       TEXT,                               -- the reservation's token (Job.lease)
    finished_at REAL,
    trace_id    TEXT    NOT NULL,
    last_status INTEGER,
    last_error  TEXT,
    UNIQUE (queue, topic, id)
)""",
    "CREATE INDEX IF NOT EXISTS jobs_ready    ON jobs (queue, topic, state, priority, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_timed    ON jobs (queue, topic, state, run_at)",
    "CREATE INDEX IF NOT EXISTS jobs_leases   ON jobs (queue, topic, state, lease_until)",
    "CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (queue, topic, state, finished_at)",
    "CREATE INDEX IF NOT EXISTS jobs_id       ON jobs (id)",
    _PAYLOADS,
    """CREATE TABLE IF NOT EXISTS attempts (
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
    "CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_seq)",
    """CREATE TABLE IF NOT EXISTS depths (
    queue TEXT NOT NULL, topic TEXT NOT NULL, state INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (queue, topic, state)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS counters (
    queue TEXT NOT NULL, topic TEXT NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (queue, topic, name)
) WITHOUT ROWID""",
    # Written to and emptied by a readiness check while writes are failing (see check()).
    "CREATE TABLE IF NOT EXISTS probe (data BLOB)",
)
#: The tables of a version 1 store (sqlite_sequence is SQLite's, for AUTOINCREMENT): the only
#: layout a file from before the stamp can have.
_V1_TABLES = frozenset({"jobs", "attempts", "depths", "counters", "probe", "sqlite_sequence"})
_V1_JOB_FIELDS = frozenset(
    {
        *("seq", "id", "queue", "topic", "state", "priority", "payload", "attributes"),
        *("attempt", "enqueued_at", "run_at", "lease_until", "finished_at", "trace_id"),
        *("last_status", "last_error"),
    }
)

#: A job's row, read without its payload (see _payloads).
_JOB_COLUMNS = (
    "seq, id, queue, topic, state, priority, attributes, attempt,"
    " enqueued_at, run_at, lease_until, finished_at, trace_id"
)


class SQLiteStore(Store):
    """Open with ``await SQLiteStore.open(path)``; close with ``aclose()``.

    ``read_only`` opens it for an operator's look (``busgate curl``): see _connect_read_only.
    Reads work as a user who may read the files but not write them; writes fail.
    """

    def __init__(
        self, path: str, *, clock: Callable[[], float] = time.time, read_only: bool = False
    ) -> None:
        super().__init__()
        self.path = path
        self._clock = clock
        self._writer = _Writer(path, read_only=read_only)
        self._schedulers: dict[tuple[str, str], PriorityScheduler] = {}

    @classmethod
    async def open(
        cls, path: str, *, clock: Callable[[], float] = time.time, read_only: bool = False
    ) -> Self:
        store = cls(path, clock=clock, read_only=read_only)
        await store._writer.start()
        return store

    async def aclose(self) -> None:
        await self._writer.stop()

    async def check(self) -> None:
        """The writer answers; and, if the last write failed for want of disk (full, I/O
        error, read-only), a write now succeeds.

        An empty transaction succeeds on a full disk, so while writes are failing the check
        makes one of its own: only then, so a ready store costs no write per probe.  It is
        what lets the store be ready again once there is room, with no push to find out.
        """
        await self._writer.run(_ready)
        if self._writer.write_failure is not None:
            await self._writer.run(_probe_write)

    # -- producers ----------------------------------------------------------------------------

    async def push(self, queue: str, routes: Sequence[Route], jobs: Sequence[NewJob]) -> PushResult:
        now = self._clock()
        plan = [_plan_copies(job, routes, now) for job in jobs]

        def op(conn: sqlite3.Connection) -> tuple[PushResult, set[str], set[str]]:
            ids: list[str] = []
            outcomes: list[Pushed] = []
            copies_each: list[int] = []
            ready_topics: set[str] = set()
            delayed_topics: set[str] = set()
            moves: dict[tuple[str, State], int] = {}
            pushed: dict[str, int] = {}
            for job, (job_id, topics, run_at, trace_id) in zip(jobs, plan, strict=True):
                ids.append(job_id)
                if not topics:
                    outcomes.append(Pushed.UNMATCHED)
                    copies_each.append(0)
                    continue
                if job.id is not None and _has_unfinished_copy(conn, queue, job_id):
                    outcomes.append(Pushed.DUPLICATE)
                    copies_each.append(0)
                    continue
                state = State.DELAYED if run_at > now else State.READY
                attributes = json.dumps(dict(job.attributes)) if job.attributes else None
                for topic in topics:
                    if job.id is not None:
                        _forget_finished(conn, queue, topic, job_id, moves)
                    seq = conn.execute(
                        "INSERT INTO jobs (id, queue, topic, state, priority, attributes,"
                        " enqueued_at, run_at, trace_id) VALUES (?,?,?,?,?,?,?,?,?)",
                        (
                            job_id,
                            queue,
                            topic,
                            state,
                            job.priority,
                            attributes,
                            now,
                            run_at,
                            trace_id,
                        ),
                    ).lastrowid
                    conn.execute(
                        "INSERT INTO payloads (seq, payload) VALUES (?,?)", (seq, job.payload)
                    )
                    moves[topic, state] = moves.get((topic, state), 0) + 1
                    pushed[topic] = pushed.get(topic, 0) + 1
                    (ready_topics if state is State.READY else delayed_topics).add(topic)
                outcomes.append(Pushed.STORED)
                copies_each.append(len(topics))
            for (topic, state), n in moves.items():
                _add_depth(conn, queue, topic, state, n)
            for topic, n in pushed.items():
                _count(conn, queue, topic, "pushed", n)
            unmatched = outcomes.count(Pushed.UNMATCHED)
            if unmatched:
                _count(conn, queue, "", "unmatched", unmatched)
            result = PushResult(tuple(ids), tuple(outcomes), tuple(copies_each))
            return result, ready_topics, delayed_topics

        result, ready_topics, delayed_topics = await self._writer.run(op, durable=True)
        for topic in ready_topics:
            self.doorbells.ring(queue, topic)
        for topic in delayed_topics:
            self.timers.ring(queue, topic)
        return result

    async def depth(self, queue: str, topics: Sequence[str]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return sum(_depth(conn, queue, topic, State.READY) for topic in topics)

        return await self._writer.run(op)

    # -- dispatchers --------------------------------------------------------------------------

    async def reserve(self, queue: str, topic: str, limit: int, lease: float) -> list[Job]:
        scheduler = self._schedulers.get((queue, topic))
        if scheduler is None:
            scheduler = self._schedulers[queue, topic] = PriorityScheduler()

        def op(conn: sqlite3.Connection) -> list[Job]:
            now = self._clock()
            candidates = {
                priority: [
                    seq
                    for (seq,) in conn.execute(
                        "SELECT seq FROM jobs WHERE queue=? AND topic=? AND state=? AND priority=?"
                        " ORDER BY seq LIMIT ?",
                        (queue, topic, State.READY, priority, limit),
                    )
                ]
                for priority in Priority
            }
            plan = scheduler.plan({p: len(seqs) for p, seqs in candidates.items()}, limit)
            if not plan:
                return []
            taken = {p: iter(seqs) for p, seqs in candidates.items()}
            order = [next(taken[p]) for p in plan]
            lease_until, token = now + lease, new_lease()
            rows = {
                row[0]: row
                for row in conn.execute(
                    f"UPDATE jobs SET state=?, attempt=attempt+1, lease_until=?, lease=?"
                    f" WHERE seq IN ({','.join('?' * len(order))}) RETURNING {_JOB_COLUMNS}",
                    (State.LEASED, lease_until, token, *order),
                )
            }
            _add_depth(conn, queue, topic, State.READY, -len(order))
            _add_depth(conn, queue, topic, State.LEASED, len(order))
            payloads = _payloads(conn, order)
            return [_job(rows[seq], payloads[seq], token) for seq in order]

        return await self._writer.run(op)

    async def finish(self, items: Sequence[Finish]) -> list[bool]:
        def op(conn: sqlite3.Connection) -> list[State | None]:
            return [_finish_one(conn, item, self._clock()) for item in items]

        states = await self._writer.run(op)
        for item, state in zip(items, states, strict=True):
            if state is State.READY:
                self.doorbells.ring(item.job.queue, item.job.topic)
            elif state is State.DELAYED:
                self.timers.ring(item.job.queue, item.job.topic)
        return [state is not None for state in states]

    async def extend(self, job: Job, lease: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE jobs SET lease_until=? WHERE queue=? AND topic=? AND id=? AND state=?"
                " AND attempt=? AND lease=?",
                (
                    self._clock() + lease,
                    job.queue,
                    job.topic,
                    job.id,
                    State.LEASED,
                    job.attempt,
                    job.lease,
                ),
            )
            return cursor.rowcount == 1

        return await self._writer.run(op)

    async def release(self, jobs: Sequence[Job]) -> int:
        def op(conn: sqlite3.Connection) -> tuple[int, set[tuple[str, str]]]:
            released = 0
            touched: set[tuple[str, str]] = set()
            for job in jobs:
                seq = _leased_seq(conn, job)
                if seq is None:
                    continue
                conn.execute(
                    "UPDATE jobs SET state=?, lease_until=NULL, lease=NULL, attempt=attempt-1"
                    " WHERE seq=?",
                    (State.READY, seq),
                )
                _add_depth(conn, job.queue, job.topic, State.LEASED, -1)
                _add_depth(conn, job.queue, job.topic, State.READY, 1)
                released += 1
                touched.add((job.queue, job.topic))
            return released, touched

        released, touched = await self._writer.run(op)
        for queue, topic in touched:
            self.doorbells.ring(queue, topic)
        return released

    # -- maintenance --------------------------------------------------------------------------

    async def recover_expired(self, queue: str, topic: str, max_attempts: int) -> Due:
        def op(conn: sqlite3.Connection) -> Due:
            now = self._clock()
            expired = conn.execute(
                "SELECT seq, id, attempt, lease_until FROM jobs WHERE queue=? AND topic=?"
                " AND state=? AND lease_until<=? ORDER BY lease_until LIMIT ?",
                (queue, topic, State.LEASED, now, MAINTENANCE_BATCH),
            ).fetchall()
            for seq, _, attempt, lease_until in expired:
                state = State.DEAD if attempt >= max_attempts else State.READY
                error = "lease expired before an outcome was recorded"
                conn.execute(
                    "UPDATE jobs SET state=?, lease_until=NULL, lease=NULL, finished_at=?,"
                    " last_status=NULL, last_error=? WHERE seq=?",
                    (state, now if state is State.DEAD else None, error, seq),
                )
                _record_attempt(
                    conn, seq, Attempt(attempt, lease_until, 0.0, Outcome.EXPIRED, error=error)
                )
                _add_depth(conn, queue, topic, State.LEASED, -1)
                _add_depth(conn, queue, topic, state, 1)
                if state is State.DEAD:
                    _count(conn, queue, topic, "dead", 1)
            if expired:
                _count(conn, queue, topic, "expired", len(expired))
            (next_at,) = conn.execute(
                "SELECT MIN(lease_until) FROM jobs WHERE queue=? AND topic=? AND state=?",
                (queue, topic, State.LEASED),
            ).fetchone()
            jobs = tuple(
                Expiry(id_, attempt, attempt >= max_attempts) for _, id_, attempt, _ in expired
            )
            return Due(len(expired), next_at, jobs)

        due = await self._writer.run(op)
        if due.count:
            self.doorbells.ring(queue, topic)
        return due

    async def promote_due(self, queue: str, topic: str) -> Due:
        def op(conn: sqlite3.Connection) -> Due:
            now = self._clock()
            promoted = conn.execute(
                "UPDATE jobs SET state=? WHERE seq IN (SELECT seq FROM jobs WHERE queue=?"
                " AND topic=? AND state=? AND run_at<=? ORDER BY run_at LIMIT ?)",
                (State.READY, queue, topic, State.DELAYED, now, MAINTENANCE_BATCH),
            ).rowcount
            if promoted:
                _add_depth(conn, queue, topic, State.DELAYED, -promoted)
                _add_depth(conn, queue, topic, State.READY, promoted)
            (next_at,) = conn.execute(
                "SELECT MIN(run_at) FROM jobs WHERE queue=? AND topic=? AND state=?",
                (queue, topic, State.DELAYED),
            ).fetchone()
            return Due(promoted, next_at)

        due = await self._writer.run(op)
        if due.count:
            self.doorbells.ring(queue, topic)
        return due

    async def _prune_some(
        self, queue: str, topic: str, done: Retention, dead: Retention, limit: int
    ) -> int:
        def op(conn: sqlite3.Connection) -> int:
            now = self._clock()
            removed = 0
            for state, keep in ((State.DONE, done), (State.DEAD, dead)):
                seqs = [
                    seq
                    for (seq,) in conn.execute(
                        "SELECT seq FROM jobs WHERE queue=? AND topic=? AND state=?"
                        " AND (finished_at < ? OR seq NOT IN (SELECT seq FROM jobs WHERE queue=?"
                        " AND topic=? AND state=? ORDER BY finished_at DESC LIMIT ?)) LIMIT ?",
                        (
                            queue,
                            topic,
                            state,
                            now - keep.max_age,
                            queue,
                            topic,
                            state,
                            keep.max_count,
                            limit,
                        ),
                    )
                ]
                _delete_jobs(conn, seqs)
                _add_depth(conn, queue, topic, state, -len(seqs))
                removed += len(seqs)
            return removed

        return await self._writer.run(op)

    # -- operators ----------------------------------------------------------------------------

    async def stats(self, queue: str, topic: str) -> TopicStats:
        (stats,) = await self.stats_many([(queue, topic)])
        return stats

    async def stats_many(self, topics: Sequence[tuple[str, str]]) -> list[TopicStats]:
        def op(conn: sqlite3.Connection) -> list[TopicStats]:
            # Both tables hold a few rows per topic: read them whole rather than per topic.
            depths: dict[tuple[str, str], dict[int, int]] = {}
            for queue, topic, state, n in conn.execute("SELECT queue, topic, state, n FROM depths"):
                depths.setdefault((queue, topic), {})[state] = n
            counters: dict[tuple[str, str], dict[str, int]] = {}
            for queue, topic, name, n in conn.execute("SELECT queue, topic, name, n FROM counters"):
                counters.setdefault((queue, topic), {})[name] = n
            return [
                _topic_stats(
                    queue,
                    topic,
                    depths.get((queue, topic), {}),
                    counters.get((queue, topic), {}),
                    counters.get((queue, ""), {}).get("unmatched", 0),
                )
                for queue, topic in topics
            ]

        return await self._writer.run(op)

    async def topics(self) -> list[tuple[str, str]]:
        def op(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            # A topic's first job writes its depth and its pushed counter, and neither row
            # is ever deleted; topic '' is the queue's own counter (unmatched pushes).
            rows = conn.execute(
                "SELECT queue, topic FROM depths UNION SELECT queue, topic FROM counters"
                " WHERE topic != '' ORDER BY queue, topic"
            ).fetchall()
            return [(str(queue), str(topic)) for queue, topic in rows]

        return await self._writer.run(op)

    async def get_job(self, job_id: str) -> list[JobRecord]:
        def op(conn: sqlite3.Connection) -> list[JobRecord]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS}, payload FROM jobs JOIN payloads USING (seq)"
                " WHERE id=? ORDER BY seq",
                (job_id,),
            ).fetchall()
            return [_job_record(conn, row[:-1], row[-1]) for row in rows]

        return await self._writer.run(op)

    async def list_dead(
        self, queue: str, topic: str, where: DeadFilter, cursor: str | None, limit: int
    ) -> DeadPage:
        after = None if cursor is None else parse_dead_cursor(cursor)

        def op(conn: sqlite3.Connection) -> DeadPage:
            # The scan reads no payload: up to DEAD_SCAN_LIMIT of them at up to max_payload
            # each would be gigabytes for one page.  Only the matches' payloads are read.
            sql = (
                "SELECT seq, id, attributes, attempt, finished_at, last_status, last_error"
                " FROM jobs WHERE queue=? AND topic=? AND state=?"
            )
            params: list[Any] = [queue, topic, State.DEAD]
            if after is not None:
                sql += " AND (finished_at < ? OR (finished_at = ? AND id < ?))"
                params += [after[0], after[0], after[1]]
            sql += " ORDER BY finished_at DESC, id DESC LIMIT ?"
            # Read row by row: a page's matches are usually its first rows, and fetching all
            # DEAD_SCAN_LIMIT of them for each page of 100 made `dead replay --all` read
            # 50 times what it used.
            rows = conn.execute(sql, (*params, DEAD_SCAN_LIMIT))
            found: list[tuple[int, str, Mapping[str, str], int, float, int | None, str | None]] = []
            last: tuple[float, str] | None = None
            scanned = 0
            for seq, job_id, attributes, attempt, died_at, status, error in rows:
                scanned += 1
                last = (died_at, job_id)
                attrs = _attributes(attributes)
                if where.matches(status, error, died_at, attrs):
                    found.append((seq, job_id, attrs, attempt, died_at, status, error))
                    if len(found) == limit:
                        break
            rows.close()
            payloads = _payloads(conn, [seq for seq, *_ in found])
            jobs = tuple(
                DeadJob(job_id, queue, topic, payloads[seq], attrs, attempt, died_at, status, error)
                for seq, job_id, attrs, attempt, died_at, status, error in found
            )
            more = len(found) == limit or scanned == DEAD_SCAN_LIMIT
            next_cursor = dead_cursor(*last) if more and last is not None else None
            return DeadPage(jobs, next_cursor)

        return await self._writer.run(op)

    async def replay_dead(self, queue: str, topic: str, ids: Sequence[str]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            replayed = 0
            for job_id in ids:
                cursor = conn.execute(
                    "UPDATE jobs SET state=?, attempt=0, run_at=?, finished_at=NULL"
                    " WHERE queue=? AND topic=? AND id=? AND state=?",
                    (State.READY, self._clock(), queue, topic, job_id, State.DEAD),
                )
                replayed += cursor.rowcount
            if replayed:
                _add_depth(conn, queue, topic, State.DEAD, -replayed)
                _add_depth(conn, queue, topic, State.READY, replayed)
                _count(conn, queue, topic, "replayed", replayed)
            return replayed

        replayed = await self._writer.run(op)
        if replayed:
            self.doorbells.ring(queue, topic)
        return replayed

    async def delete_dead(self, queue: str, topic: str, ids: Sequence[str]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            seqs = []
            for job_id in dict.fromkeys(ids):  # an id given twice is deleted (and counted) once
                row = conn.execute(
                    "SELECT seq FROM jobs WHERE queue=? AND topic=? AND id=? AND state=?",
                    (queue, topic, job_id, State.DEAD),
                ).fetchone()
                if row is not None:
                    seqs.append(int(row[0]))
            _delete_jobs(conn, seqs)
            _add_depth(conn, queue, topic, State.DEAD, -len(seqs))
            return len(seqs)

        return await self._writer.run(op)


# -- helpers run on the writer thread --------------------------------------------------------


def _plan_copies(
    job: NewJob, routes: Sequence[Route], now: float
) -> tuple[str, list[str], float, str]:
    """Decide, outside the writer thread, the id, topics, run time and trace of a job."""
    job_id = job.id or new_job_id(now)
    topics = [job.topic] if job.topic is not None else route(job.payload, routes)
    run_at = job.run_at if job.run_at is not None and job.run_at > now else now
    return job_id, topics, run_at, job.trace_id or new_trace_id()


_FINAL_STATE = {Outcome.DONE: State.DONE, Outcome.DEAD: State.DEAD}
_COUNTER = {Outcome.DONE: "done", Outcome.DEAD: "dead", Outcome.RETRY: "retried"}


def _finish_one(conn: sqlite3.Connection, item: Finish, now: float) -> State | None:
    """Record one outcome; the job's new state, or None if its lease was gone."""
    job, attempt = item.job, item.attempt
    seq = _leased_seq(conn, job)
    if seq is None:
        return None
    if item.outcome is Outcome.RETRY:
        state = State.DELAYED if item.run_at > now else State.READY
        conn.execute(
            "UPDATE jobs SET state=?, run_at=?, lease_until=NULL, lease=NULL, attempt=attempt-?,"
            " last_status=?, last_error=? WHERE seq=?",
            (
                state,
                item.run_at,
                0 if item.spend else 1,
                attempt.status,
                attempt.error or None,
                seq,
            ),
        )
    else:
        state = _FINAL_STATE[item.outcome]
        conn.execute(
            "UPDATE jobs SET state=?, finished_at=?, lease_until=NULL, lease=NULL, last_status=?,"
            " last_error=? WHERE seq=?",
            (state, now, attempt.status, attempt.error or None, seq),
        )
    _record_attempt(conn, seq, attempt)
    _add_depth(conn, job.queue, job.topic, State.LEASED, -1)
    _add_depth(conn, job.queue, job.topic, state, 1)
    _count(conn, job.queue, job.topic, _COUNTER[item.outcome], 1)
    return state


def _topic_stats(
    queue: str,
    topic: str,
    depths: Mapping[int, int],
    counters: Mapping[str, int],
    unmatched: int,
) -> TopicStats:
    return TopicStats(
        queue=queue,
        topic=topic,
        ready=depths.get(State.READY, 0),
        delayed=depths.get(State.DELAYED, 0),
        leased=depths.get(State.LEASED, 0),
        dead=depths.get(State.DEAD, 0),
        done=depths.get(State.DONE, 0),
        pushed_total=counters.get("pushed", 0),
        done_total=counters.get("done", 0),
        retried_total=counters.get("retried", 0),
        dead_total=counters.get("dead", 0),
        expired_total=counters.get("expired", 0),
        replayed_total=counters.get("replayed", 0),
        unmatched_total=unmatched,
    )


def _has_unfinished_copy(conn: sqlite3.Connection, queue: str, job_id: str) -> bool:
    """Whether a push of an explicit id is a duplicate: a copy is pending, or dead (a dead
    letter waits for an operator; the producer's retry must not replace it)."""
    row = conn.execute(
        "SELECT 1 FROM jobs WHERE id=? AND queue=? AND state IN (?,?,?,?) LIMIT 1",
        (job_id, queue, *_PENDING, State.DEAD),
    ).fetchone()
    return row is not None


def _forget_finished(
    conn: sqlite3.Connection,
    queue: str,
    topic: str,
    job_id: str,
    moves: dict[tuple[str, State], int],
) -> None:
    """An explicit id may be reused once its earlier job is done: drop the old history."""
    row = conn.execute(
        "SELECT seq, state FROM jobs WHERE queue=? AND topic=? AND id=?", (queue, topic, job_id)
    ).fetchone()
    if row is not None:
        _delete_jobs(conn, [row[0]])
        state = State(row[1])
        moves[topic, state] = moves.get((topic, state), 0) - 1


def _delete_jobs(conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
    for start in range(0, len(seqs), 500):
        chunk = seqs[start : start + 500]
        marks = ",".join("?" * len(chunk))
        conn.execute(f"DELETE FROM attempts WHERE job_seq IN ({marks})", chunk)
        conn.execute(f"DELETE FROM payloads WHERE seq IN ({marks})", chunk)
        conn.execute(f"DELETE FROM jobs WHERE seq IN ({marks})", chunk)


def _payloads(conn: sqlite3.Connection, seqs: Sequence[int]) -> dict[int, bytes]:
    payloads: dict[int, bytes] = {}
    for start in range(0, len(seqs), 500):
        chunk = seqs[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for seq, payload in conn.execute(
            f"SELECT seq, payload FROM payloads WHERE seq IN ({marks})", chunk
        ):
            payloads[seq] = bytes(payload)
    return payloads


def _leased_seq(conn: sqlite3.Connection, job: Job) -> int | None:
    row = conn.execute(
        "SELECT seq FROM jobs WHERE queue=? AND topic=? AND id=? AND state=? AND attempt=?"
        " AND lease=?",
        (job.queue, job.topic, job.id, State.LEASED, job.attempt, job.lease),
    ).fetchone()
    return None if row is None else int(row[0])


def _record_attempt(conn: sqlite3.Connection, seq: int, attempt: Attempt) -> None:
    conn.execute(
        "INSERT INTO attempts (job_seq, attempt, started_at, duration, outcome, status, error,"
        " body, stderr) VALUES (?,?,?,?,?,?,?,?,?)",
        (
            seq,
            attempt.attempt,
            attempt.started_at,
            attempt.duration,
            attempt.outcome.value,
            attempt.status,
            attempt.error or None,  # no error is None, as in the Redis store
            attempt.body,
            attempt.stderr,
        ),
    )


def _add_depth(conn: sqlite3.Connection, queue: str, topic: str, state: State, n: int) -> None:
    if n:
        conn.execute(
            "INSERT INTO depths (queue, topic, state, n) VALUES (?,?,?,?)"
            " ON CONFLICT (queue, topic, state) DO UPDATE SET n = n + excluded.n",
            (queue, topic, state, n),
        )


def _depth(conn: sqlite3.Connection, queue: str, topic: str, state: State) -> int:
    row = conn.execute(
        "SELECT n FROM depths WHERE queue=? AND topic=? AND state=?", (queue, topic, state)
    ).fetchone()
    return 0 if row is None else int(row[0])


def _count(conn: sqlite3.Connection, queue: str, topic: str, name: str, n: int) -> None:
    conn.execute(
        "INSERT INTO counters (queue, topic, name, n) VALUES (?,?,?,?)"
        " ON CONFLICT (queue, topic, name) DO UPDATE SET n = n + excluded.n",
        (queue, topic, name, n),
    )


def _attributes(text: str | None) -> Mapping[str, str]:
    return {} if text is None else dict(json.loads(text))


def _job(row: Sequence[Any], payload: bytes, lease: str) -> Job:
    (
        _seq,
        job_id,
        queue,
        topic,
        _state,
        priority,
        attributes,
        attempt,
        enqueued_at,
        run_at,
        lease_until,
        _finished_at,
        trace_id,
    ) = row
    return Job(
        id=job_id,
        queue=queue,
        topic=topic,
        payload=payload,
        attributes=_attributes(attributes),
        priority=Priority(priority),
        attempt=attempt,
        enqueued_at=enqueued_at,
        run_at=run_at,
        trace_id=trace_id,
        lease_until=lease_until or 0.0,
        lease=lease,
    )


def _job_record(conn: sqlite3.Connection, row: Sequence[Any], payload: bytes) -> JobRecord:
    (
        seq,
        job_id,
        queue,
        topic,
        state,
        priority,
        attributes,
        attempt,
        enqueued_at,
        run_at,
        _lease_until,
        finished_at,
        trace_id,
    ) = row
    attempts = tuple(
        Attempt(
            attempt=a[0],
            started_at=a[1],
            duration=a[2],
            outcome=Outcome(a[3]),
            status=a[4],
            error=a[5],
            body=bytes(a[6] or b""),
            stderr=bytes(a[7] or b""),
        )
        for a in conn.execute(
            "SELECT attempt, started_at, duration, outcome, status, error, body, stderr"
            " FROM attempts WHERE job_seq=? ORDER BY rowid",
            (seq,),
        )
    )
    return JobRecord(
        id=job_id,
        queue=queue,
        topic=topic,
        state=State(state),
        payload=payload,
        attributes=_attributes(attributes),
        priority=Priority(priority),
        attempt=attempt,
        enqueued_at=enqueued_at,
        run_at=run_at,
        trace_id=trace_id,
        finished_at=finished_at,
        attempts=attempts,
    )


# -- the writer thread -----------------------------------------------------------------------


_Item = tuple[Operation[Any], Callable[[outcome.Outcome[Any]], None], bool]


class _Writer:
    """Runs operations on the one writer connection, committing them in groups.

    Only a group holding a ``durable`` operation (a push: a producer is about to be told the
    job is safe) is synced to disk before it is answered (``synchronous=FULL``).  Leases,
    outcomes and maintenance commit without an fsync (``NORMAL``): WAL keeps them through a
    crash of the process; a power cut could lose the last of them, which redelivers a job —
    at-least-once still holds — and saves an fsync on every reserve and every batch of acks.

    With ``read_only`` the connection only reads (_connect_read_only), and each group is a
    plain (deferred) transaction: one snapshot, and no write lock to wait for or to hold.
    """

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self._read_only = read_only
        self._begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"
        self._queue: queue_module.SimpleQueue[_Item | None] = queue_module.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failed: StoreError | None = None
        self._synchronous = "FULL"
        self._identity: tuple[int, int] | None = None  # the open file's (device, inode)
        #: Why the last group that tried to write could not (disk full, I/O error, read-only);
        #: None once a group has written.  Set and cleared by the writer thread.
        self.write_failure: str | None = None

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="busgate-sqlite", daemon=True)
        self._thread.start()
        await self.run(_ready)  # raises the open/initialise error, naming the file

    async def stop(self) -> None:
        """Run what is queued, then close; give up after CLOSE_GRACE.

        What is still queued then belongs to callers that stopped waiting (their calls ran
        out of time, a locked file holding them): their outcome was already "maybe".  The
        thread is left to the interpreter's exit; a transaction it has not committed is
        rolled back by SQLite when the file is next opened.
        """
        if self._thread is None:
            return
        self._queue.put(None)
        thread, self._thread = self._thread, None
        await trio.to_thread.run_sync(thread.join, CLOSE_GRACE)
        if thread.is_alive():
            log.warning(
                "%s: the store's writer did not finish within %gs (the file locked by another"
                " process?): closing without the writes it still had",
                self.path,
                CLOSE_GRACE,
            )

    async def run(self, operation: Operation[T], *, durable: bool = False) -> T:
        if self._thread is None:
            raise StoreUnavailable(f"{self.path}: the store is closed")
        if self._failed is not None:
            raise self._failed
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[T]] = []

        def finish(result: outcome.Outcome[T]) -> None:
            box.append(result)
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # a writer left behind by stop(), answering after the daemon's end

        self._queue.put((operation, finish, durable))
        # If this task is cancelled the operation still runs (it may already be committed);
        # its result is dropped.  Callers treat an unanswered write as "maybe done".
        await done.wait()
        try:
            return box[0].unwrap()
        except sqlite3.Error as exc:
            raise _store_error(self.path, exc, read_only=self._read_only) from exc

    def _main(self) -> None:
        try:
            conn = _connect_read_only(self.path) if self._read_only else _connect(self.path)
            self._identity = _identity(self.path)
        except StoreError as exc:
            self._failed = exc
            conn = None
        except Exception as exc:  # sqlite3, OS, or a path it cannot take: start() says so
            # Were the thread to die here instead, start() would wait for _ready forever.
            self._failed = _store_error(self.path, exc, read_only=self._read_only)
            conn = None
        while True:
            item = self._queue.get()
            if item is None:
                break
            group = [item]
            stop = False
            while len(group) < _MAX_GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue_module.Empty:
                    break
                if more is None:
                    stop = True
                    break
                group.append(more)
            if conn is None:
                assert self._failed is not None
                for _, finish, _durable in group:
                    finish(outcome.Error(self._failed))
            else:
                try:
                    self._commit_group(conn, group)
                except Exception as exc:  # outside any operation: the thread must live on
                    self._answer_failed_group(conn, group, exc)
            if stop:
                break
        if conn is not None:
            conn.close()

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Item]) -> None:
        if self._identity is not None and _identity(self.path) != self._identity:
            # Written now, it would go to a file nobody can open again: a push would be
            # acknowledged and lost.  One stat() per group.
            gone = StoreUnavailable(
                f"{self.path}: the database file was deleted or replaced while busgate was"
                " running; nothing was stored (restart busgate)"
            )
            for _, finish, _ in group:
                finish(outcome.Error(gone))
            return
        synchronous = "FULL" if any(durable for _, _, durable in group) else "NORMAL"
        if synchronous != self._synchronous:  # outside a transaction, as SQLite requires
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            self._synchronous = synchronous
        try:
            results, changes = self._together(conn, group)
        except sqlite3.OperationalError:
            # BEGIN waited busy_timeout for the write lock another process holds (a backup,
            # an operator's sqlite3 shell), and nothing ran.  Once more, all together, which
            # waits out a lock held a little longer; then every caller hears it.  Trying
            # each alone waited busy_timeout once per operation: a group of k held its
            # callers, a stopping dispatcher's reserve among them, k+1 times as long.
            try:
                results, changes = self._together(conn, group)
            except sqlite3.OperationalError as exc:
                results, changes = [outcome.Error(exc) for _ in group], conn.total_changes
        no_room = next(
            (r.error for r in results if isinstance(r, outcome.Error) and _out_of_room(r.error)),
            None,
        )
        if no_room is not None:
            self.write_failure = str(no_room)
        elif conn.total_changes != changes:
            self.write_failure = None
        for (_, finish, _), result in zip(group, results, strict=True):
            finish(result)

    def _answer_failed_group(
        self, conn: sqlite3.Connection, group: list[_Item], exc: Exception
    ) -> None:
        """A group failed around its operations (the file's directory gone, a failed
        rollback): its callers get the error.  Were the thread to die instead, they and
        every later caller would wait forever, a dispatcher's shielded reserve with them."""
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the next group's BEGIN says what is wrong
        error = _store_error(self.path, exc, read_only=self._read_only)
        for _, finish, _ in group:
            finish(outcome.Error(error))

    def _together(
        self, conn: sqlite3.Connection, group: list[_Item]
    ) -> tuple[list[outcome.Outcome[Any]], int]:
        """The group's operations in one transaction, or each alone if one fails (it must not
        fail the others); with ``total_changes`` before what was kept.  Raises what BEGIN
        raised: then nothing ran."""
        conn.execute(self._begin)
        changes = conn.total_changes
        try:
            results: list[outcome.Outcome[Any]] = [
                outcome.Value(operation(conn)) for operation, _, _ in group
            ]
            conn.execute("COMMIT")
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            changes = conn.total_changes  # a rolled-back group counts its changes too
            return [self._alone(conn, operation) for operation, _, _ in group], changes
        return results, changes

    def _alone(self, conn: sqlite3.Connection, operation: Operation[Any]) -> outcome.Outcome[Any]:
        try:
            conn.execute(self._begin)
            value = operation(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return outcome.Error(exc)
        return outcome.Value(value)


def _connect(path: str) -> sqlite3.Connection:
    is_uri = path.startswith("file:")  # e.g. file:/srv/busgate.db?mode=ro
    if path != ":memory:" and not is_uri:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, uri=is_uri)
    try:
        conn.execute(f"PRAGMA busy_timeout = {round(BUSY_TIMEOUT * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal" and path != ":memory:":
            raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode})")
        # FULL until a group says otherwise (see _Writer).
        conn.execute("PRAGMA synchronous = FULL")
        # SQLite reuses the -wal from its start once a checkpoint has emptied it, and never
        # shrinks it by itself: one large group commit, or a long read holding checkpoints
        # back, would keep that much disk for as long as the daemon runs.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        # A plain path is written at once, so a file this user may not write stops the start
        # rather than every push; a URI may ask for a read-only store (mode=ro).
        _prepare_schema(conn, path, write=not is_uri)
        (check,) = conn.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_read_only(path: str) -> sqlite3.Connection:
    """Open the store only to read it: no write lock, no switch to WAL, no schema change,
    and no integrity check (the daemon checks the file when it opens it; reading all of it
    for one job would take about 20 s per 1.5 GB).  A user who may read the files, not
    write them or their directory (the unit's 0750 directory and UMask=0027 give the
    daemon's group just that), can open it.

    While busgate runs, the -wal and -shm files exist, and SQLite (3.22 and later) reads
    through them with read permission only, whatever the daemon writes meanwhile.  Once the
    last connection has closed, everything is in the file and SQLite has deleted them; a
    reader who may not create them cannot open a WAL file then, except as ``immutable``:
    read as it is, with no lock and no -wal (which it would miss: so only when there is
    none; a daemon starting meanwhile writes to a new -wal, not to the file, until its
    first checkpoint).
    """
    # The file itself, not a link to it: SQLite keeps the -wal beside the file a link names.
    absolute = os.path.realpath(path)
    options = "mode=ro" if os.path.exists(f"{absolute}-wal") else "mode=ro&immutable=1"
    # "file://" and an empty authority: a path POSIX lets start with "//" stays a path.
    uri = f"file://{urllib.parse.quote(absolute)}?{options}"
    conn = sqlite3.connect(uri, isolation_level=None, check_same_thread=False, uri=True)
    try:
        conn.execute(f"PRAGMA busy_timeout = {round(BUSY_TIMEOUT * 1000)}")
        conn.execute("BEGIN")
        try:
            application_id, version = _stamp(conn, path)
            if (application_id, version) != (_APPLICATION_ID, _SCHEMA_VERSION):
                # Only the daemon creates the tables or upgrades them, writing.
                raise StoreUnsupported(
                    f"{path}: store schema version {version}, not yet this busgate's"
                    f" {_SCHEMA_VERSION}: the daemon creates or upgrades the tables when it"
                    " starts on the file; start it, then look again"
                )
        finally:
            conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare_schema(conn: sqlite3.Connection, path: str, *, write: bool) -> None:
    """Refuse a file that is not a busgate store of a version we know; create or stamp it;
    upgrade an older store, with the file to itself."""
    try:
        _check_and_stamp(conn, path, write=write, alone=False)
    except _UpgradeNeeded as needed:
        old = needed.version
    else:
        return
    # A busgate of an older version still running on the file would fail on every call
    # once version 2 has moved the payloads, and would reuse an ended lease's token under
    # version 3 (its statements leave the column alone); one started afterwards refuses the
    # file.  In WAL mode every open connection holds a shared lock on the file, so an
    # exclusive lock is had only once every other process has let go of it.
    log.info("%s: upgrading the store from schema version %d to %d", path, old, _SCHEMA_VERSION)
    started = time.perf_counter()
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    upgrade = _check_and_stamp(conn, path, write=write, alone=True)
    if upgrade is not None and upgrade.moved:
        # The upgrade wrote about twice the payloads to the WAL: give that room back now,
        # while no reader can hold the checkpoint up, rather than when busgate stops.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA locking_mode = NORMAL")
    conn.execute("PRAGMA user_version")  # a read: the exclusive lock goes with it
    if upgrade is not None:  # else another busgate upgraded it in the meantime
        moved = (
            f": moved the payloads of {upgrade.moved} jobs to their own table"
            if upgrade.moved is not None
            else ""
        )
        log.info(
            "%s: store upgraded from schema version %d to %d%s in %.2fs",
            path,
            upgrade.version,
            _SCHEMA_VERSION,
            moved,
            time.perf_counter() - started,
        )


class _UpgradeNeeded(Exception):
    """A store of an older version, left as it was: the upgrade needs the file to itself."""

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.version = version


class _Upgrade(NamedTuple):
    version: int  # the file's schema version before
    moved: int | None  # jobs whose payload moved (from version 1)


def _check_and_stamp(
    conn: sqlite3.Connection, path: str, *, write: bool, alone: bool
) -> _Upgrade | None:
    """Check the file and create or stamp the schema, in one transaction; with ``alone``
    (under an exclusive lock) upgrade an older store too.  The upgrade made, if any.

    A crash or an error part way leaves the file as it was.
    """
    try:
        # IMMEDIATE: two daemons opening one new file create it once.
        conn.execute("BEGIN EXCLUSIVE" if alone else "BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if not alone or getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
            raise
        raise StoreUnavailable(
            f"{path}: this busgate upgrades the store to schema version {_SCHEMA_VERSION} on"
            " its first start, which needs the file to itself, and another process has it"
            " open (a busgate of the previous version still running, or another busgate"
            " upgrading it at the same moment?): stop it, then start this one"
        ) from exc
    upgrade: _Upgrade | None = None
    try:
        application_id, version = _stamp(conn, path)
        columns = _columns(conn, "jobs")
        # By the layout: files from before the stamp read version 0.
        move_payloads = version < 2 and "payload" in columns
        add_lease = bool(columns) and "lease" not in columns
        if move_payloads or add_lease:
            before = 1 if move_payloads else 2
            if not alone:
                raise _UpgradeNeeded(before)
            moved = _move_payloads(conn) if move_payloads else None
            if add_lease:
                _add_lease(conn)
            upgrade = _Upgrade(before, moved)
        if write or (application_id, version) != (_APPLICATION_ID, _SCHEMA_VERSION):
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return upgrade


def _stamp(conn: sqlite3.Connection, path: str) -> tuple[int, int]:
    """The file's application_id and schema version; raises StoreUnsupported for a file
    that is not a busgate store, or that a newer busgate wrote."""
    (application_id,) = conn.execute("PRAGMA application_id").fetchone()
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if (application_id == 0 and version != 0) or application_id not in (0, _APPLICATION_ID):
        raise StoreUnsupported(
            f"{path}: not a busgate store (SQLite application_id {application_id:#x},"
            f" user_version {version}): point store at a file of busgate's own"
        )
    if version > _SCHEMA_VERSION:
        raise StoreUnsupported(
            f"{path}: written by a newer busgate (store schema version {version}; this"
            f" busgate knows version {_SCHEMA_VERSION} and older): run that busgate or a"
            " newer one"
        )
    if application_id == 0:
        _check_unstamped(conn, path)
    return application_id, version


def _move_payloads(conn: sqlite3.Connection) -> int:
    """Schema version 1 to 2: every job's payload leaves its row for ``payloads``; how many.

    Runs in _check_and_stamp's transaction.  DROP COLUMN (SQLite 3.35, as RETURNING)
    rewrites each row once.
    """
    conn.execute(_PAYLOADS)
    moved = conn.execute("INSERT INTO payloads (seq, payload) SELECT seq, payload FROM jobs")
    conn.execute("ALTER TABLE jobs DROP COLUMN payload")
    return moved.rowcount


def _add_lease(conn: sqlite3.Connection) -> None:
    """Schema version 2 to 3: ``jobs.lease``.  ADD COLUMN writes no row.

    Runs in _check_and_stamp's transaction, under its exclusive lock: a busgate of version
    2 running on (its statements leave the column alone) would reserve a job and keep the
    token of a lease it ended, and a version 3 daemon that outlived that lease could then
    record its late outcome on the version 2 daemon's."""
    conn.execute("ALTER TABLE jobs ADD COLUMN lease TEXT")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The columns of ``table``; none if there is no such table."""
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _check_unstamped(conn: sqlite3.Connection, path: str) -> None:
    """A file without busgate's stamp is new, or a store from before the stamp: anything
    else belongs to someone else, and busgate must not add its tables to it."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    foreign = sorted(tables - _V1_TABLES)
    if foreign:
        raise StoreUnsupported(
            f"{path}: not a busgate store (it holds the tables {', '.join(foreign)}):"
            " point store at a file of busgate's own"
        )
    if "jobs" in tables and (missing := sorted(_V1_JOB_FIELDS - _columns(conn, "jobs"))):
        raise StoreUnsupported(
            f"{path}: not a busgate store this busgate can read (its jobs table has no"
            f" {', '.join(missing)})"
        )


def _identity(path: str) -> tuple[int, int] | None:
    """The (device, inode) at ``path``: None for an in-memory or URI database, or no file."""
    if path == ":memory:" or path.startswith("file:"):
        return None
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # the file, or its directory, is gone
        return (-1, -1)  # differs from any real file's
    return (info.st_dev, info.st_ino)


def _ready(conn: sqlite3.Connection) -> None:
    """A no-op: the writer answers it once the file is open and the schema in place."""


#: What a full disk, a failing disk or a file made read-only look like (primary codes).
_NO_ROOM = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY}


def _out_of_room(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _NO_ROOM


def _probe_write(conn: sqlite3.Connection) -> None:
    """Take a few pages, as a small push would, and give them back (committed: a full disk
    refuses the commit, not the insert)."""
    conn.execute("INSERT INTO probe (data) VALUES (zeroblob(16384))")
    conn.execute("DELETE FROM probe")


def _store_error(path: str, exc: BaseException, *, read_only: bool = False) -> StoreError:
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "integrity" in text
    ):
        return StoreCorrupt(f"{path}: the SQLite file is corrupt or not a database ({text})")
    code = getattr(exc, "sqlite_errorcode", None)
    denied = _read_only_mount(path, code) or _permission_problem(path, code, read_only=read_only)
    if denied is not None or (isinstance(exc, OSError) and exc.errno in _DENIED):
        # Stays so until an operator acts (a systemd unit's ReadWritePaths= forgotten, say):
        # starting again does not mend it, so `busgate run` exits 2 (see cli.main).
        return StoreRefused(f"{path}: {text}" + (f" ({denied})" if denied else ""))
    full = _full(path, code)
    return StoreUnavailable(f"{path}: {text}" + (f" ({full})" if full else ""))


#: Why a directory for the store could not be made (os.mkdir): permission, read-only mount.
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
#: Free space under which a failing write is put down to a full file system.
_NEARLY_FULL = 1 << 20


def _file_system(path: str, code: int | None) -> tuple[str, os.statvfs_result] | None:
    """The directory holding the store and its file system, for an error that a full or
    read-only-mounted one may explain (SQLite's error does not say so: on a full disk,
    opening the store fails as "disk I/O error", as the -shm file cannot grow, and on a
    read-only mount every file looks like one this user may not write)."""
    if code is None or code & 0xFF not in _NO_ROOM | {sqlite3.SQLITE_CANTOPEN}:
        return None
    if path == ":memory:":
        return None
    directory = os.path.dirname(os.path.abspath(path.removeprefix("file:").partition("?")[0]))
    try:
        return directory, os.statvfs(directory)
    except OSError:
        return None


def _read_only_mount(path: str, code: int | None) -> str | None:
    found = _file_system(path, code)
    if found is None or not found[1].f_flag & os.ST_RDONLY:
        return None
    return f"the file system holding {found[0]} is mounted read-only"


def _full(path: str, code: int | None) -> str | None:
    found = _file_system(path, code)
    if found is None or code is None:
        return None
    directory, vfs = found
    free = (vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail) * vfs.f_frsize
    if free < _NEARLY_FULL and code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        return f"the file system holding {directory} is full ({free // 1024} KiB free)"
    return None


def _permission_problem(path: str, code: int | None, *, read_only: bool = False) -> str | None:
    """What SQLite's "unable to open" or "readonly" means here, in the operator's terms.

    SQLite says "attempt to write a readonly database" when it is the directory that is
    read-only: WAL mode keeps two files beside the database and must be able to create them.
    Opened ``read_only`` (_connect_read_only), the files need only be readable.
    """
    if code is None or path == ":memory:" or path.startswith("file:"):
        return None
    if code & 0xFF == sqlite3.SQLITE_CANTOPEN and os.path.isdir(path):
        return "it is a directory: the store URL names the database file in it"
    user = f"user id {os.geteuid()}"
    directory = os.path.dirname(os.path.abspath(path))
    if code == sqlite3.SQLITE_READONLY_DIRECTORY:
        return (
            f"{user} may not create files in {directory}: SQLite's WAL mode keeps"
            f" {os.path.basename(path)}-wal and -shm beside the database"
        )
    if (
        code & 0xFF == sqlite3.SQLITE_CANTOPEN
        and not read_only  # which creates nothing
        and not os.path.exists(path)
        # A directory that cannot be looked at now (a network mount gone stale) is not one
        # this user may not write: that may pass, and the start is then retried (exit 1).
        and os.path.isdir(directory)
        and not os.access(directory, os.W_OK | os.X_OK)
    ):
        return f"{user} may not create files in {directory}"
    access, may = (os.R_OK, "read") if read_only else (os.R_OK | os.W_OK, "read and write")
    if code & 0xFF in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
        for name in (path, f"{path}-wal", f"{path}-shm"):
            if os.path.exists(name) and not os.access(name, access):
                return f"{user} may not {may} {name}"
    return None
