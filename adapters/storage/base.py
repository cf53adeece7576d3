"""The storage contract: one async interface, implemented by the SQLite and Redis adapters.

At-least-once is the rule every method keeps: a job leaves the store only when its outcome
is recorded, and every step that moves a job between states is atomic.  Leases are guarded
by the attempt number: an ``ack`` (or retry, bury, extend) for an attempt the store no
longer has leased — because the lease expired and the job went back to ready — changes
nothing and returns False.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from adapters.storage.doorbell import Doorbells
from adapters.storage.fanout import Filter
from adapters.storage.jobs import (
    Attempt,
    DeadFilter,
    DeadPage,
    Job,
    JobRecord,
    NewJob,
    Outcome,
    PushResult,
    TopicStats,
)

#: (topic name, its fan-out filter), in configuration order.
Route = tuple[str, Filter]


@dataclass(frozen=True, slots=True)
class Expiry:
    """A job whose lease ran out before an outcome was recorded (``recover_expired``)."""

    id: str
    attempt: int  # the attempt it spent
    dead: bool  # that was its last: dead, not ready again


@dataclass(frozen=True, slots=True)
class Due:
    """What a maintenance step did, and when (unix seconds) it has work again."""

    count: int
    next_at: float | None
    expired: tuple[Expiry, ...] = ()  # recover_expired: which jobs, in lease order


#: By value: an Enum hashes through a Python-level __hash__, and this runs once per job.
_FINISHING = frozenset({Outcome.DONE.value, Outcome.RETRY.value, Outcome.DEAD.value})


@dataclass(slots=True)  # not frozen: built once per job (see ``jobs``); a value all the same
class Finish:
    """The outcome of one delivery attempt, to be recorded."""

    job: Job
    attempt: Attempt
    outcome: Outcome  # DONE, RETRY or DEAD
    run_at: float = 0.0  # RETRY: when to deliver again (unix seconds)
    spend: bool = True  # RETRY: whether the attempt counts against max_attempts

    def __post_init__(self) -> None:
        if self.outcome._value_ not in _FINISHING:
            raise ValueError(f"cannot finish a job as {self.outcome.value}")


@dataclass(frozen=True, slots=True)
class Retention:
    """How much finished history (done or dead jobs) a topic keeps."""

    max_count: int
    max_age: float  # seconds

    def __post_init__(self) -> None:
        if self.max_count < 0 or self.max_age < 0:
            raise ValueError("retention limits must not be negative")


class Store(abc.ABC):
    """A job store.  Methods raise ``StoreError`` subclasses; nothing else on purpose."""

    #: Whether a delayed push or a retry made by another process sharing the store rings this
    #: one's ``timers`` (Redis publishes them; SQLite has no way to), so that a scheduler may
    #: sleep until what the store said is next.
    hears_other_processes = False

    def __init__(self) -> None:
        #: Rung when a topic gets ready jobs (its dispatcher reserves).
        self.doorbells = Doorbells()
        #: Rung when a topic gets a delayed job (its scheduler recomputes when to wake).
        self.timers = Doorbells()

    # -- producers ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def push(self, queue: str, routes: Sequence[Route], jobs: Sequence[NewJob]) -> PushResult:
        """Store ``jobs`` atomically, each copied to every route whose filter matches.

        A job with ``topic`` set goes to that topic only.  A job with an explicit ``id`` that
        still has an unfinished (ready, delayed, leased or dead) copy in the queue is skipped
        and counted as a duplicate: a dead letter waits for an operator.  That copy may be in
        any topic of the queue, one a reload removed too.  Returns only after the jobs are
        durable.
        """

    @abc.abstractmethod
    async def depth(self, queue: str, topics: Sequence[str]) -> int:
        """Ready jobs across ``topics`` of ``queue`` (``LLEN``)."""

    # -- dispatchers --------------------------------------------------------------------------

    @abc.abstractmethod
    async def reserve(self, queue: str, topic: str, limit: int, lease: float) -> list[Job]:
        """Lease up to ``limit`` ready jobs for ``lease`` seconds; high > normal > low, 3:2:1."""

    async def wait_for_jobs(self, queue: str, topic: str, deadline: float = math.inf) -> bool:
        """Wait (trio time ``deadline``) until a push may have made jobs ready."""
        return await self.doorbells[queue, topic].wait(deadline)

    @abc.abstractmethod
    async def finish(self, items: Sequence[Finish]) -> list[bool]:
        """Record outcomes of leased jobs, many at once; True where the lease still held.

        Dispatchers batch outcomes through this (one store round trip for many jobs);
        ``ack``, ``retry`` and ``bury`` are the one-job forms.
        """

    async def ack(self, job: Job, attempt: Attempt) -> bool:
        """The job is done: keep it in the completed history."""
        (recorded,) = await self.finish([Finish(job, attempt, Outcome.DONE)])
        return recorded

    async def retry(self, job: Job, attempt: Attempt, run_at: float, *, spend: bool = True) -> bool:
        """Deliver again at ``run_at``; ``spend=False`` gives the attempt back (overloaded)."""
        (recorded,) = await self.finish([Finish(job, attempt, Outcome.RETRY, run_at, spend)])
        return recorded

    async def bury(self, job: Job, attempt: Attempt) -> bool:
        """The job is dead: keep it, with its history, in the dead-letter list."""
        (recorded,) = await self.finish([Finish(job, attempt, Outcome.DEAD)])
        return recorded

    @abc.abstractmethod
    async def extend(self, job: Job, lease: float) -> bool:
        """Push the lease of a job still being delivered ``lease`` seconds past now."""

    @abc.abstractmethod
    async def release(self, jobs: Sequence[Job]) -> int:
        """Give leased jobs back to ready without spending their attempt (shutdown)."""

    # -- maintenance --------------------------------------------------------------------------

    @abc.abstractmethod
    async def recover_expired(self, queue: str, topic: str, max_attempts: int) -> Due:
        """Return jobs whose lease ran out to ready (an attempt spent), or dead past the limit:
        at most ``MAINTENANCE_BATCH``, the soonest expired first."""

    @abc.abstractmethod
    async def promote_due(self, queue: str, topic: str) -> Due:
        """Make delayed jobs whose time has come ready: at most ``MAINTENANCE_BATCH``, the
        soonest due first."""

    async def prune(self, queue: str, topic: str, done: Retention, dead: Retention) -> int:
        """Drop finished history beyond the retention limits; returns rows removed.

        In store calls of at most ``MAINTENANCE_BATCH`` rows per state and rule, as many as it
        takes: one call for all would hold pushes up behind it (a second for 100k rows on
        SQLite), and one call a minute of a batch would let the history of a topic finishing
        more than that grow without bound.
        """
        removed = 0
        while True:
            some = await self._prune_some(queue, topic, done, dead, MAINTENANCE_BATCH)
            removed += some
            if some < MAINTENANCE_BATCH:  # no rule had more than a batch left
                return removed

    @abc.abstractmethod
    async def _prune_some(
        self, queue: str, topic: str, done: Retention, dead: Retention, limit: int
    ) -> int:
        """What ``prune`` drops, at most ``limit`` rows per state and rule; rows removed."""

    # -- operators ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def stats(self, queue: str, topic: str) -> TopicStats:
        """Depths by state and lifetime counters of one topic."""

    async def stats_many(self, topics: Sequence[tuple[str, str]]) -> list[TopicStats]:
        """``stats`` for many (queue, topic) pairs; stores answer in one round trip."""
        return [await self.stats(queue, topic) for queue, topic in topics]

    @abc.abstractmethod
    async def topics(self) -> list[tuple[str, str]]:
        """Every (queue, topic) the store holds or has held jobs of, sorted, whatever the
        configuration says now: a reload may have removed a topic whose jobs are still here.

        It may name a topic that never got a job (Redis remembers every topic a push was
        routed to, filter aside); ``stats`` tells what each holds.
        """

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> list[JobRecord]:
        """Every topic copy of a job, with its attempts (empty if unknown or pruned)."""

    @abc.abstractmethod
    async def list_dead(
        self, queue: str, topic: str, where: DeadFilter, cursor: str | None, limit: int
    ) -> DeadPage:
        """Dead jobs matching ``where``, newest first, ``limit`` at most per page.

        A page may hold fewer than ``limit`` jobs while ``cursor`` is not None: the store
        examines a bounded number of dead jobs per call so a selective filter cannot stall it.
        """

    @abc.abstractmethod
    async def replay_dead(self, queue: str, topic: str, ids: Sequence[str]) -> int:
        """Make these dead jobs ready again with a fresh set of attempts; history is kept."""

    @abc.abstractmethod
    async def delete_dead(self, queue: str, topic: str, ids: Sequence[str]) -> int:
        """Forget these dead jobs."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise ``StoreError`` unless the store answers now (readiness)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background upkeep the store needs while open (connections, notifications)."""
        task_status.started()

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Flush and close; the store is unusable afterwards."""


#: Jobs one maintenance store call moves at most: delayed ones made ready, expired leases
#: recovered, finished ones pruned (per state and rule, age and count).  One call for all
#: would hold every other call up behind it (on SQLite, a second for 100k rows): the
#: scheduler calls again at once while there is more (``Due.next_at`` already past).
MAINTENANCE_BATCH = 1000

#: Dead jobs examined per ``list_dead`` call, whatever the filter.
DEAD_SCAN_LIMIT = 5000


def dead_cursor(died_at: float, job_id: str) -> str:
    return f"{died_at!r}/{job_id}"


def parse_dead_cursor(cursor: str) -> tuple[float, str]:
    """Raises ``ValueError`` for a cursor this store did not hand out."""
    died_at, slash, job_id = cursor.partition("/")
    if not slash or not job_id:
        raise ValueError(f"invalid cursor {cursor!r}")
    return float(died_at), job_id
