"""One dispatcher per topic: reserve jobs, deliver them, record what happened.

    reserve loop   waits on the topic's doorbell (rung by every push), reserves as many jobs
                   as there are free delivery slots, and starts one task per job;
    delivery       calls the backend under the topic's timeout, decides the outcome, and
                   records it (shielded, so a shutdown cannot lose a finished attempt);
    scheduler      promotes delayed jobs when due, recovers expired leases, prunes history;
                   it sleeps until the next due time or until a delayed push rings its timer.

A lease is short (so a crashed daemon's jobs come back quickly) and is extended while a long
delivery runs.  On shutdown ``stop()`` stops reserving; in-flight deliveries may finish until
the deadline, after which they are cancelled and their jobs released without spending an
attempt.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from adapters.delivery.base import Backend, Delivery
from adapters.storage.base import Retention, Store
from adapters.storage.errors import StoreError
from adapters.storage.jobs import EXCERPT_BYTES, Attempt, Job, Outcome
from gateway.circuit import CircuitBreaker, CircuitStatistics
from gateway.config import TopicConfig
from gateway.policy import Backoff, Decision, decide
from gateway.ratelimit import TokenBucket

log = logging.getLogger("busgate.dispatch")

#: Leases are at most this long plus a margin; longer deliveries get them extended.
MAX_LEASE = 60.0
LEASE_MARGIN = 15.0
#: The scheduler looks at leases and due jobs at least this often (other daemons sharing a
#: Redis store do not ring our timers).
SCHEDULER_INTERVAL = 1.0
PRUNE_INTERVAL = 60.0
#: An idle dispatcher reserves at least this often even if no doorbell rang.
RECHECK = 5.0
#: Recording an outcome may take this long after shutdown began.
RECORD_GRACE = 10.0
STORE_ERROR_PAUSE = 1.0


@dataclass(frozen=True, slots=True)
class DispatcherStatistics:
    queue: str
    topic: str
    concurrency: int
    in_flight: int
    delivered_total: int  # attempts that got a response or a failure
    done_total: int
    retried_total: int
    dead_total: int
    store_errors_total: int
    stopping: bool
    paused: bool
    circuit: CircuitStatistics
    rate_limit: float | None  # deliveries per second, when limited


AttemptListener = Callable[[Job, Attempt, Decision, Delivery], None]


class Dispatcher:
    def __init__(
        self,
        store: Store,
        topic: TopicConfig,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        listeners: tuple[AttemptListener, ...] = (),
    ) -> None:
        self.store = store
        self.topic = topic
        self.backend = backend
        self._clock = clock
        self._rng = rng or random.Random()
        self._listeners = listeners
        self._backoff = Backoff(topic.retry.backoff, topic.retry.max_backoff)
        self.lease = topic.lease or min(topic.timeout, MAX_LEASE) + LEASE_MARGIN
        self._in_flight: dict[str, Job] = {}
        self._slot_freed = trio.Event()
        self._paused = topic.paused
        self._resumed = trio.Event()
        self.circuit = CircuitBreaker(
            failures=topic.circuit_failures,
            cooldown=topic.circuit_cooldown,
            clock=trio.current_time,
        )
        self._bucket = (
            None
            if topic.rate_limit is None
            else TokenBucket(topic.rate_limit.per_second, clock=trio.current_time)
        )
        self._stopping = False
        self._deliveries: trio.CancelScope | None = None
        #: Set once run() has returned: deliveries drained, unfinished jobs released.
        self.finished = trio.Event()
        self._delivered = self._done = self._retried = self._dead = self._store_errors = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.topic.queue, self.topic.name

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(
            queue=self.topic.queue,
            topic=self.topic.name,
            concurrency=self.topic.concurrency,
            in_flight=len(self._in_flight),
            delivered_total=self._delivered,
            done_total=self._done,
            retried_total=self._retried,
            dead_total=self._dead,
            store_errors_total=self._store_errors,
            stopping=self._stopping,
            paused=self._paused,
            circuit=self.circuit.statistics(),
            rate_limit=None if self._bucket is None else self._bucket.rate,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as upkeep:
                await upkeep.start(self.backend.run)
                upkeep.start_soon(self._schedule)
                task_status.started()
                async with trio.open_nursery() as deliveries:
                    self._deliveries = deliveries.cancel_scope
                    await self._reserve_loop(deliveries)
                upkeep.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._release_unfinished()
                await self.backend.aclose()
            self.finished.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop reserving; deliveries in flight finish.  Producers can still push."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._resumed.set()

    def stop(self, deadline: float = math.inf) -> None:
        """Stop reserving; cancel deliveries still running at ``deadline`` (trio time)."""
        self._stopping = True
        self.store.doorbells.ring(*self.key)
        self._slot_freed.set()
        self._resumed.set()
        if self._deliveries is not None:
            self._deliveries.deadline = min(self._deliveries.deadline, deadline)

    async def _release_unfinished(self) -> None:
        if not self._in_flight:
            return
        jobs = list(self._in_flight.values())
        with trio.move_on_after(RECORD_GRACE):
            try:
                released = await self.store.release(jobs)
            except StoreError as exc:
                # Their leases will expire and they will be redelivered: nothing is lost.
                log.error(
                    "release failed queue=%s topic=%s jobs=%d error=%s", *self.key, len(jobs), exc
                )
            else:
                log.info("released queue=%s topic=%s jobs=%d", *self.key, released)
        self._in_flight.clear()

    # -- reserving ----------------------------------------------------------------------------

    async def _reserve_loop(self, deliveries: trio.Nursery) -> None:
        queue, topic = self.key
        concurrency = self.topic.concurrency
        while not self._stopping:
            if self._paused:
                self._resumed = trio.Event()
                await self._resumed.wait()
                continue
            limit = concurrency - len(self._in_flight)
            allowance = self.circuit.allowance()
            if allowance is not None:
                limit = min(limit, allowance)
            if self._bucket is not None and limit > 0:
                tokens = self._bucket.available()
                if tokens == 0:
                    await self._wait_for_slot(trio.current_time() + self._bucket.wait_time())
                    continue
                limit = min(limit, tokens)
            if limit <= 0:
                # Full, or the circuit is open: a finished delivery, the probe time or a
                # stop wakes us.
                await self._wait_for_slot(self.circuit.reopen_at)
                continue
            try:
                jobs = await self.store.reserve(queue, topic, limit, self.lease)
            except StoreError as exc:
                self._store_errors += 1
                log.error("reserve failed queue=%s topic=%s error=%s", queue, topic, exc)
                await trio.sleep(STORE_ERROR_PAUSE)
                continue
            if not jobs:
                # The doorbell rings on every push; the recheck covers a missed notification
                # (a Redis subscription reconnecting), so a job is never stuck for long.
                await self.store.wait_for_jobs(queue, topic, trio.current_time() + RECHECK)
                continue
            if self._bucket is not None:
                self._bucket.take(len(jobs))
            for job in jobs:
                self.circuit.started()
                self._in_flight[job.id] = job
                deliveries.start_soon(self._deliver, job)

    async def _wait_for_slot(self, deadline: float) -> None:
        self._slot_freed = trio.Event()
        with trio.move_on_at(deadline):
            await self._slot_freed.wait()

    # -- delivering ---------------------------------------------------------------------------

    async def _deliver(self, job: Job) -> None:
        started_at = self._clock()
        async with trio.open_nursery() as nursery:
            if self.topic.timeout + LEASE_MARGIN > self.lease:
                nursery.start_soon(self._keep_leased, job)
            delivery = await self.backend.deliver(job)
            nursery.cancel_scope.cancel()
        self.circuit.record(delivery)
        decision = decide(
            delivery,
            attempt=job.attempt,
            max_attempts=self.topic.retry.max_attempts,
            backoff=self._backoff,
            dead_on=self.topic.dead_on,
            now=self._clock(),
            rng=self._rng,
        )
        attempt = Attempt(
            attempt=job.attempt,
            started_at=started_at,
            duration=delivery.duration,
            outcome=decision.outcome,
            status=delivery.status,
            error=None if decision.outcome is Outcome.DONE else decision.reason,
            body=delivery.body[:EXCERPT_BYTES],
            stderr=delivery.stderr[:EXCERPT_BYTES],
        )
        # The attempt happened; record it even if shutdown is cancelling us.
        with trio.CancelScope(shield=True), trio.move_on_after(RECORD_GRACE):
            await self._record(job, attempt, decision)
        self._delivered += 1
        for listener in self._listeners:
            listener(job, attempt, decision, delivery)
        _log_attempt(job, attempt, decision, delivery)

    async def _record(self, job: Job, attempt: Attempt, decision: Decision) -> None:
        try:
            if decision.outcome is Outcome.DONE:
                recorded = await self.store.ack(job, attempt)
                self._done += 1
            elif decision.outcome is Outcome.RETRY:
                assert decision.run_at is not None
                recorded = await self.store.retry(
                    job, attempt, decision.run_at, spend=decision.spend
                )
                self._retried += 1
            else:
                recorded = await self.store.bury(job, attempt)
                self._dead += 1
        except StoreError as exc:
            # The job stays leased; when the lease expires it is delivered again.
            self._store_errors += 1
            log.error(
                "recording failed job=%s queue=%s topic=%s attempt=%d error=%s",
                job.id,
                job.queue,
                job.topic,
                job.attempt,
                exc,
            )
        else:
            if not recorded:
                log.warning(
                    "outcome not recorded job=%s queue=%s topic=%s attempt=%d: the lease had"
                    " expired and the job was handed out again",
                    job.id,
                    job.queue,
                    job.topic,
                    job.attempt,
                )
        finally:
            self._in_flight.pop(job.id, None)
            self._slot_freed.set()

    async def _keep_leased(self, job: Job) -> None:
        while True:
            await trio.sleep(self.lease / 3)
            try:
                await self.store.extend(job, self.lease)
            except StoreError as exc:
                log.warning("lease extension failed job=%s error=%s", job.id, exc)

    # -- scheduling ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        queue, topic = self.key
        timer = self.store.timers[queue, topic]
        topic_config = self.topic
        done_keep = Retention(topic_config.completed_max_count, topic_config.completed_max_age)
        dead_keep = Retention(topic_config.dead_max_count, topic_config.dead_max_age)
        next_prune = trio.current_time()
        while True:
            next_at = math.inf
            try:
                due = await self.store.promote_due(queue, topic)
                expired = await self.store.recover_expired(
                    queue, topic, topic_config.retry.max_attempts
                )
                if trio.current_time() >= next_prune:
                    await self.store.prune(queue, topic, done_keep, dead_keep)
                    next_prune = trio.current_time() + PRUNE_INTERVAL
            except StoreError as exc:
                self._store_errors += 1
                log.error("scheduler failed queue=%s topic=%s error=%s", queue, topic, exc)
            else:
                for when in (due.next_at, expired.next_at):
                    if when is not None:
                        next_at = min(next_at, when)
            wake = trio.current_time() + SCHEDULER_INTERVAL
            if next_at != math.inf:
                wake = min(wake, trio.current_time() + max(next_at - self._clock(), 0.0))
            await timer.wait(wake)


def _log_attempt(job: Job, attempt: Attempt, decision: Decision, delivery: Delivery) -> None:
    level = logging.INFO if decision.outcome is Outcome.DONE else logging.WARNING
    if not log.isEnabledFor(level):
        return
    log.log(
        level,
        "job=%s queue=%s topic=%s attempt=%d outcome=%s status=%s duration_ms=%.1f trace=%s%s",
        job.id,
        job.queue,
        job.topic,
        job.attempt,
        decision.outcome.value,
        "-" if delivery.status is None else delivery.status,
        delivery.duration * 1000,
        job.trace_id,
        "" if decision.outcome is Outcome.DONE else f" reason={decision.reason!r}",
    )
