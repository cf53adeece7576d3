"""One dispatcher per topic: reserve jobs, deliver them, record what happened.

    fetcher     waits on the topic's doorbell (rung by every push) and keeps a buffer of leased
                jobs topped up, reserving in batches: one store call for many jobs.  The
                buffer holds about BUFFER_SECONDS of the topic's recent delivery rate (at
                least two jobs per worker), so a fast topic reserves in large batches and a
                slow one holds few leases;
    workers     ``concurrency`` tasks, each delivering one job at a time under the topic's
                timeout and deciding its outcome;
    recorder    writes outcomes to the store in batches: one call for every outcome that
                arrived while the previous call ran or within RECORD_LINGER of the first,
                shielded so a shutdown cannot lose a finished attempt;
    scheduler   promotes delayed jobs when due, recovers expired leases, prunes history; it
                sleeps until the next due time or lease end, or until a delayed push or a
                retry rings its timer, and looks again at least every half lease.

Batching is what makes the store cheap per job: SQLite commits (and fsyncs) once per batch,
Redis runs one script per batch.  A lease is short, so a crashed daemon's jobs come back
quickly; it is extended while a long delivery runs, and before a buffered job starts if its
wait ate into it.  The circuit breaker and the rate limit gate the fetcher.  On shutdown
``stop()`` ends reserving; buffered jobs are released at once (until then their leases are
kept), in-flight deliveries may finish until the deadline, then they are cancelled and their
jobs released without spending an attempt.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from adapters.delivery.base import Backend, Delivery, Failure
from adapters.storage.base import Expiry, Finish, Retention, Store
from adapters.storage.errors import StoreError, StoreUncertain
from adapters.storage.jobs import EXCERPT_BYTES, Attempt, Job, Outcome
from gateway import logs
from gateway.circuit import CircuitBreaker, CircuitState, CircuitStatistics
from gateway.config import LEASE_MARGIN, TopicConfig
from gateway.policy import Backoff, Decision, decide
from gateway.ratelimit import TokenBucket
from gateway.wallclock import STEP, WallClock

log = logging.getLogger("busgate.dispatch")

#: The scheduler looks at leases and due jobs at least this often, and at least every half
#: lease (see ``_schedule``): an idle topic costs two store calls per look.
SCHEDULER_INTERVAL = 10.0
#: ... and every second on a store whose other users do not ring its timers.
SHARED_FILE_INTERVAL = 1.0
PRUNE_INTERVAL = 60.0
#: An idle dispatcher reserves at least this often even if no doorbell rang.
RECHECK = 5.0
#: A store call recording outcomes may take this long.  Once the deliveries are over, the
#: last outcomes and the release of unfinished jobs share one such grace between them, so a
#: store that hangs holds a shutdown at most this long past its deliveries (systemd's
#: TimeoutStopSec allows for it: see systemd/busgate.service).
RECORD_GRACE = 10.0
#: A store call has a fixed cost several times that of a job in it (a Redis script call
#: costs ~100k instructions before its first job), so batches should be large.  The
#: fetcher keeps this much of the recent delivery rate leased and buffered, up to
#: MAX_BUFFER jobs; the recorder waits this long for more outcomes before it writes.
BUFFER_SECONDS = 0.02
MAX_BUFFER = 256
RATE_WINDOW = 0.25
RECORD_LINGER = 0.005
RECORD_BATCH = 256
STORE_ERROR_PAUSE = 1.0


@dataclass(frozen=True, slots=True)
class DispatcherStatistics:
    queue: str
    topic: str
    concurrency: int
    in_flight: int  # deliveries running now
    buffered: int  # leased, waiting for a worker
    delivered_total: int  # attempts that got a response or a failure
    # Outcomes of those attempts that the store recorded (not one whose recording failed).
    done_total: int
    retried_total: int
    dead_total: int
    store_errors_total: int
    stopping: bool
    paused: bool
    circuit: CircuitStatistics
    rate_limit: float | None  # deliveries per second, when limited


AttemptListener = Callable[[Job, Attempt, Decision, Delivery], None]


@dataclass(slots=True)  # not frozen: one per attempt (see Delivery)
class _Outcome:
    job: Job
    attempt: Attempt
    decision: Decision
    delivery: Delivery
    lease_until: float  # when the job's lease ends, as last extended
    #: A call to record it went unanswered: it may have been recorded, even if the store
    #: says so no longer (``_record``).
    uncertain: bool = False


class Dispatcher:
    def __init__(
        self,
        store: Store,
        topic: TopicConfig,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        wallclock: WallClock | None = None,
        rng: random.Random | None = None,
        listeners: tuple[AttemptListener, ...] = (),
    ) -> None:
        """``clock`` is the wall clock; ``wallclock`` watches it for steps, one for the whole
        daemon (the dispatchers of a reload measure from the daemon's start)."""
        self.store = store
        self.topic = topic
        self.backend = backend
        self._clock = clock
        self._wallclock = wallclock or WallClock(clock)
        self._rng = rng or random.Random()
        self._listeners = listeners
        self._backoff = Backoff(topic.retry.backoff, topic.retry.max_backoff)
        self.lease = topic.effective_lease
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
        # Every job we hold a lease on and have not recorded: buffered, in flight, or with
        # its outcome on the way to the store.  What is left at the end is released.
        self._held: dict[str, Job] = {}
        #: When the lease of each held job waiting in the buffer for a worker ends: a slow
        #: topic may keep one waiting longer than its lease (``_keep_leased``).
        self._buffered_leases: dict[str, float] = {}
        #: The same for jobs being delivered, on a topic whose attempts may outlast the lease.
        self._outlasts_lease = topic.timeout + LEASE_MARGIN > self.lease
        self._running_leases: dict[str, float] = {}
        self._jobs_in, self._jobs_out = trio.open_memory_channel[Job](math.inf)
        self._in_flight = 0
        self._started = 0  # deliveries begun, for the rate that sizes the buffer
        self._capacity = trio.Event()  # set when a held job is let go
        self._outcomes: list[_Outcome] = []
        self._outcome_ready = trio.Event()
        self._flush_now = trio.Event()  # the recorder stops lingering: a stop, a full batch
        self._paused = topic.paused
        self._resumed = trio.Event()
        self._stopping = False
        self._workers_done = False
        #: When the last store calls give up (set once the deliveries are over).
        self._store_deadline = math.inf
        self._deliveries: trio.CancelScope | None = None
        #: The id of the half-open circuit's probe until a worker delivers it.
        self._probe: str | None = None
        self._probe_number = 0  # its number from circuit.started(), for circuit.record()
        #: Set once run() has returned: deliveries drained, unfinished jobs released.
        self.finished = trio.Event()
        self._delivered = self._done = self._retried = self._dead = self._store_errors = 0
        #: Store failures (reserve, scheduler, record) and attempt-listener bugs repeat every
        #: second while they last: logged the first time, then once a minute.  Each its own:
        #: on a full disk the scheduler's calls, which write nothing, succeed, and each
        #: success ended the reserve's repeat (two lines a second for every topic).
        self._store_failures = logs.Repeating(log)
        self._scheduler_failures = logs.Repeating(log)
        self._record_failures = logs.Repeating(log)  # apart: they concern finished attempts
        self._listener_failures = logs.Repeating(log)
        #: trio's clock; run() binds its own reader, without the three calls behind
        #: trio.current_time(): every delivery reads it.
        self._now: Callable[[], float] = trio.current_time

    @property
    def key(self) -> tuple[str, str]:
        return self.topic.queue, self.topic.name

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(
            queue=self.topic.queue,
            topic=self.topic.name,
            concurrency=self.topic.concurrency,
            in_flight=self._in_flight,
            buffered=self._jobs_out.statistics().current_buffer_used,
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
        self._now = trio.lowlevel.current_clock().current_time
        try:
            async with trio.open_nursery() as upkeep:
                await upkeep.start(self.backend.run)
                upkeep.start_soon(self._schedule)
                upkeep.start_soon(self._keep_leased)
                recorder_done = trio.Event()
                upkeep.start_soon(self._record_loop, recorder_done)
                task_status.started()
                async with trio.open_nursery() as workers:
                    self._deliveries = workers.cancel_scope
                    for _ in range(self.topic.concurrency):
                        workers.start_soon(self._work)
                    await self._fetch_loop()
                    self._jobs_in.close()  # workers finish what they hold, then leave
                    # What waits in the buffer goes back now, not after the deliveries (a
                    # long one may run until shutdown_timeout): in a task of its own, so a
                    # store that does not answer holds the stop no longer than they do.
                    # What it has not given back by then goes with the final release.
                    if buffered := self._drain_buffer():
                        upkeep.start_soon(self._give_back, buffered)
                self._workers_done = True
                self._store_deadline = trio.current_time() + RECORD_GRACE
                # The recorder flushes the last outcomes at once and ends.
                self._outcome_ready.set()
                self._flush_now.set()
                await recorder_done.wait()
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
        """Stop reserving and starting deliveries: in-flight ones finish, buffered jobs go
        back to the store unspent.  Producers can push."""
        self._paused = True
        # The fetcher gives the buffer back now: with every worker in a long delivery, none
        # would take a buffered job (and give it back) until its delivery ended.
        self.store.doorbells.ring(*self.key)
        self._capacity.set()

    def resume(self) -> None:
        self._paused = False
        self._resumed.set()

    def stop(self, deadline: float = math.inf) -> None:
        """Stop reserving; cancel deliveries still running at ``deadline`` (trio time)."""
        self._stopping = True
        self.store.doorbells.ring(*self.key)
        self._capacity.set()
        self._resumed.set()
        if self._deliveries is not None:
            self._deliveries.deadline = min(self._deliveries.deadline, deadline)

    async def _release_unfinished(self) -> None:
        if not self._held:
            return
        jobs = list(self._held.values())
        self._held.clear()
        error: object = f"the store did not answer within the stop's {RECORD_GRACE:g}s grace"
        with trio.move_on_at(self._grace_end()):
            try:
                released = await self.store.release(jobs)
            except StoreError as exc:
                error = exc
            else:
                log.info("released queue=%s topic=%s jobs=%d", *self.key, released)
                return
        # Their leases will expire and they will be redelivered (an attempt spent): nothing
        # is lost, but an operator wonders why they wait.
        log.error(
            "release failed queue=%s topic=%s jobs=%d error=%s",
            *self.key,
            len(jobs),
            logs.quoted(error),
        )

    def _grace_end(self) -> float:
        """The deadline of a store call recording outcomes or releasing jobs."""
        return min(trio.current_time() + RECORD_GRACE, self._store_deadline)

    # -- fetching -----------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        queue, topic = self.key
        concurrency = self.topic.concurrency
        # Keep every worker busy and a buffer of jobs ready next.  Jobs whose outcome is on
        # its way to the store do not count against that (the recorder's round trip must not
        # starve the workers), but their backlog is bounded too, should the store slow down.
        most = least = 2 * concurrency
        window_start, window_count = trio.current_time(), self._started
        while not self._stopping:
            if self._paused:
                if buffered := self._drain_buffer():
                    await self._give_back(buffered)
                    continue
                self._resumed = trio.Event()
                await self._resumed.wait()
                continue
            now = trio.current_time()
            if now - window_start >= RATE_WINDOW:
                rate = (self._started - window_count) / (now - window_start)
                most = max(least, min(MAX_BUFFER, int(rate * BUFFER_SECONDS)))
                window_start, window_count = now, self._started
            active = self._in_flight + self._buffered()
            recording = len(self._held) - active
            room = most - active
            # Refill in batches of at least half the buffer, but never keep an idle worker
            # waiting for a batch to form.  Each store call also wakes the store's process:
            # on a busy host that costs the gateway more than the call itself.
            if recording > 2 * most or (room < max(1, most // 2) and active >= concurrency):
                await self._wait_for_capacity(math.inf)
                continue
            limit = room
            circuit_was = self.circuit.state
            allowance = self.circuit.allowance()
            if allowance is not None:
                limit = min(limit, allowance)
                if self.circuit.state is not circuit_was:  # its cooldown is over
                    log.info("circuit half-open queue=%s topic=%s: one probe delivery", *self.key)
            if self._bucket is not None and limit > 0:
                tokens = self._bucket.available()
                if tokens == 0:
                    await self._wait_for_capacity(trio.current_time() + self._bucket.wait_time())
                    continue
                limit = min(limit, tokens)
            if limit <= 0:
                # The circuit is open (or its probe is out): its reopen time, a finished
                # delivery or a stop wakes us.
                await self._wait_for_capacity(self.circuit.reopen_at)
                continue
            try:
                # Shielded from a stop's deadline: a reserve cut short is still carried out
                # by the store, and jobs leased that we never held would never be released.
                # Their leases would expire, each spending an attempt: a job could go dead
                # without reaching its backend.  The store's own timeouts bound the wait.
                with trio.CancelScope(shield=True):
                    jobs = await self.store.reserve(queue, topic, limit, self.lease)
            except StoreError as exc:
                self._store_errors += 1
                self._store_failures.failed(
                    logging.ERROR,
                    "reserve failed queue=%s topic=%s error=%s",
                    queue,
                    topic,
                    logs.quoted(exc),
                )
                await trio.sleep(STORE_ERROR_PAUSE)
                continue
            if self._store_failures.failing:
                self._store_failures.recovered(
                    "the store answers again queue=%s topic=%s", *self.key
                )
            if not jobs:
                # The doorbell rings on every push; the recheck covers a missed notification
                # (a Redis subscription reconnecting), so a job is never stuck for long.
                await self.store.wait_for_jobs(queue, topic, trio.current_time() + RECHECK)
                continue
            if self._bucket is not None:
                self._bucket.take(len(jobs))
            for job in jobs:
                if probe := self.circuit.started():
                    self._probe, self._probe_number = job.id, probe
                self._held[job.id] = job
                self._buffered_leases[job.id] = job.lease_until
                self._jobs_in.send_nowait(job)

    def _buffered(self) -> int:
        return self._jobs_out.statistics().current_buffer_used

    async def _wait_for_capacity(self, deadline: float) -> None:
        self._capacity = trio.Event()
        if deadline == math.inf:
            # A busy topic waits here every few jobs, for a worker to finish: entering and
            # leaving a cancel scope would cost more than the wait itself.
            await self._capacity.wait()
            return
        with trio.move_on_at(deadline):
            await self._capacity.wait()

    def _let_go(self, job: Job) -> None:
        self._held.pop(job.id, None)
        self._capacity.set()

    def _not_delivered(self, job: Job) -> None:
        """``job`` leaves us without an attempt: if it was the probe, another must go; the
        token its reservation took goes back, or the topic would lose that delivery slot (at
        12/m, a job given back by a pause or an open circuit would wait up to 5 s more)."""
        if job.id == self._probe:
            self._probe = None
            self.circuit.probe_withdrawn()
        if self._bucket is not None:
            self._bucket.give_back(1)
        self._let_go(job)

    # -- delivering ---------------------------------------------------------------------------

    async def _work(self) -> None:
        jobs = self._jobs_out
        while True:
            # A buffered job is taken without a trip through the scheduler (receive() would
            # yield even with one ready): the delivery that follows yields anyway.
            try:
                try:
                    job = jobs.receive_nowait()
                except trio.WouldBlock:
                    job = await jobs.receive()
            except trio.EndOfChannel:
                return
            if self._stopping:
                # Taken before the buffer was given back: released at the end, no attempt
                # spent, and its lease kept until then (``_keep_leased``), as in the buffer.
                continue
            lease_until = self._buffered_leases.pop(job.id, job.lease_until)
            if self._paused or self.circuit.state is CircuitState.OPEN:
                # Reserved before a pause or before the circuit opened: give it back rather
                # than start a delivery the operator stopped (a slow topic's buffer would go
                # on delivering for rounds after a pause), or burn an attempt on a backend
                # known to be down.  The rest of the buffer goes back with it, in one store
                # call and in the order it was reserved.
                await self._give_back([job, *self._drain_buffer()])
                continue
            if self._lease_may_run_out(lease_until):
                covered = await self._extend_for_an_attempt(job, lease_until)
                if covered is None:
                    continue
                lease_until = covered
            probe = 0
            if job.id == self._probe:
                probe = self._probe_number
                self._probe = None  # on its way: its outcome decides
            self._in_flight += 1
            self._started += 1
            if self._outlasts_lease:
                self._running_leases[job.id] = lease_until
            try:
                await self._deliver(job, lease_until, probe)
            finally:
                self._running_leases.pop(job.id, None)
                self._in_flight -= 1
                self._capacity.set()  # a worker is free: the fetcher may refill

    def _lease_may_run_out(self, lease_until: float) -> bool:
        """Whether a lease ending at ``lease_until`` might run out before an attempt begun
        now ends, or before ``_keep_leased`` extends it (on a topic whose attempts may outlast
        the lease, it does so every lease/3).

        With half of LEASE_MARGIN to spare at the end of the attempt: leases are in each
        host's wall-clock time, and another daemon whose clock runs ahead takes a lease back
        that much sooner (README, Stores: Redis).  A job that waited in the buffer for
        seconds started with barely its timeout left, and one 3 s ahead delivered it again.
        A job just reserved has the whole margin: the extension costs only jobs that waited.
        """
        needed = self.lease / 3 if self._outlasts_lease else self.topic.timeout + LEASE_MARGIN / 2
        return lease_until - self._clock() <= needed + 1

    async def _extend_for_an_attempt(self, job: Job, lease_until: float) -> float | None:
        """The new end of ``job``'s lease, extended for an attempt (``_lease_may_run_out``);
        ``lease_until`` if it could not be extended, None if the lease was lost.

        Only then a coroutine: a job nearly always starts well within its lease, and an
        ``await`` of one costs more than the check.
        """
        now = self._clock()
        try:
            if await self.store.extend(job, self.lease):
                return now + self.lease
        except StoreError as exc:
            log.warning("lease extension failed job=%s error=%s", job.id, logs.quoted(exc))
            return lease_until  # deliver anyway: at worst the job is delivered twice, never lost
        self._not_delivered(job)  # the lease was lost: the job belongs to someone else now
        return None

    def _drain_buffer(self) -> list[Job]:
        """Every job waiting in the buffer, taken out of it."""
        drained: list[Job] = []
        while True:
            try:
                job = self._jobs_out.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return drained
            self._buffered_leases.pop(job.id, None)
            drained.append(job)

    async def _give_back(self, jobs: list[Job]) -> None:
        """Release ``jobs``, taken from the buffer undelivered.  Until the store has them
        they stay held, their leases kept as in the buffer: let go, they stayed leased until
        the lease ran out, an attempt spent (dead at the last one without reaching the
        backend).  A paused or broken topic asks again; a stop leaves them to its final
        release."""
        while True:
            try:
                await self.store.release(jobs)
            except StoreError as exc:
                log.warning(
                    "release failed queue=%s topic=%s jobs=%d error=%s",
                    *self.key,
                    len(jobs),
                    logs.quoted(exc),
                )
                for job in jobs:  # _keep_leased extends them from the lease they had
                    self._buffered_leases.setdefault(job.id, job.lease_until)
                if self._stopping:
                    return  # _release_unfinished tries again
                await trio.sleep(STORE_ERROR_PAUSE)
                continue
            break
        for job in jobs:
            self._buffered_leases.pop(job.id, None)
            self._not_delivered(job)

    async def _deliver(self, job: Job, lease_until: float, probe: int) -> None:
        started_at = self._clock()
        started = self._now()
        try:
            delivery = await self.backend.deliver(job)
        except trio.Cancelled:
            # A stop's deadline (shutdown_timeout): the job is released unspent, but the
            # backend may have run it already, and it will run it again.
            log.warning(
                "delivery cancelled unfinished job=%s queue=%s topic=%s attempt=%d trace=%s"
                " after_ms=%.1f: released, to be delivered again; the backend may have run it",
                job.id,
                job.queue,
                job.topic,
                job.attempt,
                job.trace_id,
                (self._now() - started) * 1000,
            )
            raise
        except Exception as exc:
            # A bug in the backend's delivery fails this attempt, not the daemon: such a job
            # spends its attempts like any other failure and ends dead, with the error in its
            # history, rather than stopping every topic each time it comes round.
            delivery = _internal_failure(
                job, self._now() - started, exc, "delivery", "make the request"
            )
        try:
            decision, attempt = self._judge(job, delivery, started_at)
        except Exception as exc:
            # A bug in judging the answer fails this attempt, not the daemon (as above).
            delivery = _internal_failure(
                job, delivery.duration, exc, "judging a delivery", "judge the response"
            )
            decision, attempt = self._judge(job, delivery, started_at)
        circuit_was = self.circuit.state
        self.circuit.record(delivery, probe=probe)
        if self.circuit.state is not circuit_was:
            self._log_circuit(circuit_was, delivery)
        if self._outlasts_lease:  # extended while it ran (_keep_leased)
            lease_until = self._running_leases.get(job.id, lease_until)
        # Handed over without an await: a cancellation from here on cannot lose the attempt.
        self._outcomes.append(_Outcome(job, attempt, decision, delivery, lease_until))
        self._outcome_ready.set()
        if len(self._outcomes) >= RECORD_BATCH:
            self._flush_now.set()

    def _log_circuit(self, was: CircuitState, delivery: Delivery) -> None:
        """The circuit changed state on ``delivery``'s outcome: opened, or closed."""
        if self.circuit.state is CircuitState.CLOSED:
            log.info("circuit closed queue=%s topic=%s: the backend answers again", *self.key)
            return
        statistics = self.circuit.statistics()
        assert statistics.reopen_at is not None  # open
        log.warning(
            "circuit opened queue=%s topic=%s %s status=%s error=%s: nothing is delivered"
            " for %.3gs, then one probe",
            *self.key,
            "probe=failed"
            if was is CircuitState.HALF_OPEN
            else f"failures={statistics.consecutive_failures}",
            "-" if delivery.status is None else delivery.status,
            logs.quoted(delivery.message or (delivery.failure and delivery.failure.value) or ""),
            statistics.reopen_at - trio.current_time(),
        )

    def _judge(self, job: Job, delivery: Delivery, started_at: float) -> tuple[Decision, Attempt]:
        """What becomes of ``job`` after ``delivery``, and the attempt its history keeps."""
        decision = decide(
            delivery,
            attempt=job.attempt,
            max_attempts=self.topic.retry.max_attempts,
            backoff=self._backoff,
            dead_on=self.topic.dead_on,
            now=self._clock(),
            rng=self._rng,
        )
        # Positional, in Attempt's field order (attempt, started_at, duration, outcome,
        # status, error, body, stderr): keywords cost more to bind, once per job.
        attempt = Attempt(
            job.attempt,
            started_at,
            delivery.duration,
            decision.outcome,
            delivery.status,
            None if decision.outcome is Outcome.DONE else decision.reason,
            delivery.body[:EXCERPT_BYTES],
            delivery.stderr[:EXCERPT_BYTES],
        )
        return decision, attempt

    async def _keep_leased(self) -> None:
        """Extend the leases of held jobs before they run out.

        Jobs waiting in the buffer: a topic whose deliveries are slow (a minute each, one at
        a time) can hold one there longer than its lease; expired there, it would be handed
        out again, its attempt spent without ever reaching the backend, and dead at the last
        one.  Jobs being delivered, on a topic whose timeout outlasts the lease.  One task for
        all of them, rather than one per delivery: that cost a task, a nursery and a store
        call per job (a topic with a 5-minute timeout ran at a fifth of the rate).
        """
        while True:
            await trio.sleep(self.lease / 3)
            now = self._clock()
            # A job due now, if not extended, has at least lease/3 left at the next round.
            soon = now + self.lease * 2 / 3
            due = [
                (job_id, leases)
                for leases in (self._buffered_leases, self._running_leases)
                for job_id, until in leases.items()
                if until <= soon and job_id in self._held
            ]
            for job_id, leases in due:
                if job_id in leases:  # else delivered, or moved from the buffer to a worker
                    await self._extend_held(job_id, now)

    async def _extend_held(self, job_id: str, now: float) -> None:
        """Extend the lease of held job ``job_id`` from ``now``, and note its new end where
        the buffer or a worker keeps one.  A failure is logged: the job goes on, and at worst
        it is delivered twice, never lost."""
        job = self._held.get(job_id)
        if job is None:
            return  # recorded meanwhile
        try:
            extended = await self.store.extend(job, self.lease)
        except StoreError as exc:
            log.warning("lease extension failed job=%s error=%s", job_id, logs.quoted(exc))
            return
        for leases in (self._buffered_leases, self._running_leases):
            if extended and job_id in leases:
                leases[job_id] = now + self.lease

    async def _after_a_step(self, stepped: float) -> None:
        """The wall clock has just been stepped ``stepped`` seconds forward: the leases of
        the jobs held here, written before, look that much nearer their end, or past it.
        Extended now, before this daemon's own scheduler or another's takes them back while
        they are delivered.  (A step back needs nothing: leases only look longer.)"""
        log.warning(
            "wall clock stepped forward queue=%s topic=%s seconds=%.1f: extending the leases"
            " of the %d jobs held",
            *self.key,
            stepped,
            len(self._held),
        )
        now = self._clock()
        for job_id in list(self._held):
            await self._extend_held(job_id, now)

    # -- recording ----------------------------------------------------------------------------

    async def _record_loop(self, done: trio.Event) -> None:
        while True:
            await self._outcome_ready.wait()
            if len(self._outcomes) < RECORD_BATCH and not self._workers_done:
                # Let a busy topic's outcomes gather: the attempts are safe in memory (and
                # the jobs leased) meanwhile, and a stop cuts the wait short.
                with trio.move_on_after(RECORD_LINGER):
                    await self._flush_now.wait()
            self._outcome_ready = trio.Event()
            self._flush_now = trio.Event()
            batch, self._outcomes = self._outcomes, []
            if batch and (again := await self._record(batch)):
                # The store did not take them: once more after a pause (a stop cuts it
                # short), ahead of what came meanwhile.  Dropped, they would come back when
                # their leases ran out, an attempt spent: a job done at its last attempt
                # would go dead.
                with trio.move_on_after(STORE_ERROR_PAUSE):
                    await self._flush_now.wait()
                self._outcomes[:0] = again
                self._outcome_ready.set()
            if self._workers_done and not self._outcomes:
                done.set()
                return

    async def _record(self, batch: list[_Outcome]) -> list[_Outcome]:
        """Record ``batch`` in one store call; what to try again if the store failed."""
        items = [
            Finish(o.job, o.attempt, o.decision.outcome, o.decision.run_at or 0.0, o.decision.spend)
            for o in batch
        ]
        began, grace_end = trio.current_time(), self._grace_end()
        answer: list[bool] | None = None
        error = ""
        uncertain = True  # cut short by the grace: the call may have been carried out
        # Shielded, so that a shutdown cannot lose a finished attempt, and bounded by the
        # grace instead: one cancel scope for both (a scope costs more than a job's outcome).
        with trio.CancelScope(deadline=grace_end, shield=True):
            try:
                answer = await self.store.finish(items)
            except StoreError as exc:
                error, uncertain = str(exc), isinstance(exc, StoreUncertain)
        answered = answer is not None
        again: list[_Outcome] = []
        if answer is None:
            error = error or f"no answer within {grace_end - began:.3g}s"
            self._store_errors += 1
            again, batch = self._try_again(batch, uncertain)
            self._record_failures.failed(
                logging.ERROR,
                "recording %d outcomes failed queue=%s topic=%s error=%s%s",
                len(again) + len(batch),
                *self.key,
                logs.quoted(error),
                f" (trying again in {STORE_ERROR_PAUSE:g}s)" if again else "",
            )
        elif self._record_failures.failing:
            self._record_failures.recovered("outcomes recorded again queue=%s topic=%s", *self.key)
        held = self._held
        for index, outcome in enumerate(batch):
            ok = answer is not None and answer[index]
            job, decision = outcome.job, outcome.decision
            # _let_go, with the capacity set once for the batch (below): nothing can wait
            # on it before this returns, and that is a call fewer per job.
            held.pop(job.id, None)
            self._delivered += 1
            # Counted as done, retried or dead only once the store says so: an unrecorded
            # outcome leaves the job leased there, to be delivered again when that runs out.
            if ok and decision.outcome is Outcome.DONE:
                self._done += 1
            elif ok and decision.outcome is Outcome.RETRY:
                self._retried += 1
            elif ok:
                self._dead += 1
            if answered and not ok:
                log.warning(
                    "outcome not recorded job=%s queue=%s topic=%s attempt=%d: the store no"
                    " longer held the job's lease (%s)",
                    job.id,
                    job.queue,
                    job.topic,
                    job.attempt,
                    "an earlier call to record it went unanswered, and may have recorded it"
                    if outcome.uncertain
                    else "it expired and the job was handed out again, or the job is gone"
                    " from the store, as after a FLUSHALL or a Redis restart without"
                    " persistence",
                )
            for listener in self._listeners:
                try:
                    listener(job, outcome.attempt, decision, outcome.delivery)
                except Exception:
                    # Telemetry is a listener: a bug there must cost its figures, not every
                    # topic's deliveries (the outcome is recorded already).
                    self._listener_failed(listener)
            recorded = None if not ok and outcome.uncertain else ok
            _log_attempt(job, outcome.attempt, decision, outcome.delivery, recorded=recorded)
        self._capacity.set()
        return again

    def _try_again(
        self, failed: list[_Outcome], uncertain: bool
    ) -> tuple[list[_Outcome], list[_Outcome]]:
        """Outcomes the store did not take: those to record again after STORE_ERROR_PAUSE,
        and those given up (the jobs stay leased there, and are delivered again when their
        leases run out).  A lease that ends before the next try would have the job handed out
        again; after a stop's grace, nothing is tried again."""
        if uncertain:
            for outcome in failed:
                outcome.uncertain = True
        if trio.current_time() + STORE_ERROR_PAUSE >= self._store_deadline:
            return [], failed
        # The next try's own call may take the store's timeout too: a lease about to end is
        # as good as gone.
        enough = self._clock() + 2 * STORE_ERROR_PAUSE
        again = [outcome for outcome in failed if outcome.lease_until > enough]
        return again, [outcome for outcome in failed if outcome.lease_until <= enough]

    def _listener_failed(self, listener: AttemptListener) -> None:
        """Log a listener's exception (the one being handled): it would fail for every job."""
        self._listener_failures.failed(
            logging.ERROR,
            "an attempt listener failed inside busgate queue=%s topic=%s listener=%s",
            *self.key,
            getattr(listener, "__qualname__", repr(listener)),
            exc_info=True,
        )

    # -- scheduling ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        queue, topic = self.key
        timer = self.store.timers[queue, topic]
        topic_config = self.topic
        next_prune = trio.current_time()
        # The store says when the next delayed job is due and the next lease ends, and a
        # delayed push or a retry rings the timer, here or (Redis publishes it) in any daemon
        # sharing the store.  Unheard of is a lease another daemon takes after a look: it
        # ends a lease after it was taken at the soonest (the daemons share queue files), so
        # looking every half lease recovers it on time.  Waking every second instead cost
        # 1,200 store calls a second for 600 idle topics.  A store that does not hear other
        # processes (a SQLite file two daemons share) is looked at every second.
        interval = (
            min(SCHEDULER_INTERVAL, self.lease / 2)
            if self.store.hears_other_processes
            else SHARED_FILE_INTERVAL
        )
        offset = self._wallclock.offset()
        while True:
            next_at = math.inf
            look_again = interval
            try:
                if (stepped := self._wallclock.offset() - offset) > STEP:
                    await self._after_a_step(stepped)  # before the leases are looked at
                offset += stepped
                due = await self.store.promote_due(queue, topic)
                expired = await self.store.recover_expired(
                    queue, topic, topic_config.retry.max_attempts
                )
                for expiry in expired.expired:
                    _log_expiry(queue, topic, expiry)
                if trio.current_time() >= next_prune:
                    # History finished before a step forward looks older than it is: kept
                    # that much longer (see gateway/wallclock.py).
                    ahead = self._wallclock.ahead()
                    done_keep = Retention(
                        topic_config.completed_max_count, topic_config.completed_max_age + ahead
                    )
                    dead_keep = Retention(
                        topic_config.dead_max_count, topic_config.dead_max_age + ahead
                    )
                    if pruned := await self.store.prune(queue, topic, done_keep, dead_keep):
                        log.info(
                            "pruned queue=%s topic=%s jobs=%d: done and dead jobs past retention",
                            queue,
                            topic,
                            pruned,
                        )
                    next_prune = trio.current_time() + PRUNE_INTERVAL
            except StoreError as exc:
                self._store_errors += 1
                look_again = STORE_ERROR_PAUSE
                self._scheduler_failures.failed(
                    logging.ERROR,
                    "scheduler failed queue=%s topic=%s error=%s",
                    queue,
                    topic,
                    logs.quoted(exc),
                )
            else:
                if self._scheduler_failures.failing:
                    self._scheduler_failures.recovered(
                        "the store answers again queue=%s topic=%s", queue, topic
                    )
                for when in (due.next_at, expired.next_at):
                    if when is not None:
                        next_at = min(next_at, when)
                look_again = min(look_again, next_prune - trio.current_time())
            wake = trio.current_time() + look_again
            if next_at != math.inf:
                wake = min(wake, trio.current_time() + max(next_at - self._clock(), 0.0))
            await timer.wait(wake)


def _internal_failure(
    job: Job, duration: float, exc: Exception, what: str, could_not: str
) -> Delivery:
    """A bug of busgate's own in ``what``, logged with its traceback, as the attempt's failure:
    the job is retried, and dead in the end, with the error in its history, rather than
    stopping every topic each time it comes round."""
    log.exception(
        "%s failed inside busgate job=%s queue=%s topic=%s attempt=%d",
        what,
        job.id,
        job.queue,
        job.topic,
        job.attempt,
    )
    return Delivery(
        duration,
        failure=Failure.INTERNAL,
        message=f"busgate could not {could_not}: {type(exc).__name__}: {exc}",
    )


def _log_expiry(queue: str, topic: str, expiry: Expiry) -> None:
    """The line of an attempt whose lease ran out (a daemon died or lost the store while it
    held the job): in the attempt lines' form, so ``grep job=ID`` finds it."""
    logs.log_line(
        log,
        logging.WARNING,
        "job=%s queue=%s topic=%s attempt=%d outcome=expired status=- reason=%s",
        expiry.id,
        queue,
        topic,
        expiry.attempt,
        '"lease expired before an outcome was recorded: dead at max_attempts"'
        if expiry.dead
        else '"lease expired before an outcome was recorded: ready again"',
    )


def _log_attempt(
    job: Job, attempt: Attempt, decision: Decision, delivery: Delivery, *, recorded: bool | None
) -> None:
    """The attempt's line.  ``recorded=no`` marks an outcome the store did not take: the job
    is still leased there and comes back when the lease runs out, whatever ``outcome`` says.
    ``recorded=unknown`` (``recorded`` None): a call to record it went unanswered, and may
    have recorded it."""
    done = decision.outcome is Outcome.DONE
    level = logging.INFO if done and recorded else logging.WARNING
    if not log.isEnabledFor(level):
        return
    logs.log_line(
        log,
        level,
        "job=%s queue=%s topic=%s attempt=%d outcome=%s status=%s duration_ms=%.1f trace=%s%s%s",
        job.id,
        job.queue,
        job.topic,
        job.attempt,
        decision.outcome._value_,  # the plain attribute behind ``value``, a property
        "-" if delivery.status is None else delivery.status,
        delivery.duration * 1000,
        job.trace_id,
        "" if recorded else " recorded=no" if recorded is False else " recorded=unknown",
        "" if done else f" reason={logs.quoted(decision.reason)}",
    )
