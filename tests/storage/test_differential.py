"""Differential test: one random sequence of store operations, run against the SQLite store
and the Redis store (a real standalone redis-server), must give the same observable results.

Both stores share one ``FakeClock``, so every timestamp they record is the same.  What is
legitimately store-specific is normalised, each place saying why:

* generated job ids differ (random bits): each store's ids are mapped to logical keys by
  push order (``g0``, ``g1``, ...); explicit ids are their own key;
* times are compared to the millisecond (the Redis store keeps them as ``%.3f`` stamps);
* the order of ready jobs of one priority is FIFO by first push on both stores, but a job
  that comes back to ready (retry, release, recovery, promotion, replay) is placed by its
  original push in SQLite and at the end of the list in Redis (the front, for a release).
  When a topic holds such a job, a reserve takes every ready job and the two batches are
  compared as sets;
* jobs finished in the same instant tie in the finished order, which each store breaks its
  own way (Redis by id, SQLite by row): a prune's ``max_count`` is lowered so it does not cut
  through such a tie, and dead listings are compared as sets, each checked newest first;
* the Redis store plans a reserve from the ready counts its previous reserve returned (a
  round trip saved under load) and so lags a push; the test clears those counts so both
  stores plan from the same counts;
* ``get_job`` lists a job's topic copies in row order (SQLite) or topic order (Redis): both
  are sorted by topic;
* the last error in a dead listing (the state line of the Redis store) has its newlines
  turned into spaces, by design: the attempts follow that line (``RedisStore.finish``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import trio
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from adapters.storage.base import Due, Finish, Retention, Store
from adapters.storage.fanout import FieldCondition, Filter, route
from adapters.storage.jobs import (
    Attempt,
    DeadFilter,
    DeadJob,
    Job,
    JobRecord,
    NewJob,
    Outcome,
    Priority,
    Pushed,
    PushResult,
    State,
    TopicStats,
)
from adapters.storage.redis_client import RedisClient
from adapters.storage.redis_routing import Standalone
from adapters.storage.redis_store import RedisStore
from adapters.storage.sqlite import SQLiteStore
from tests.storage.conftest import FakeClock
from tests.support.redis import RedisServer

T = TypeVar("T")

QUEUE = "orders"
TOPICS = ("a", "b")
#: kind x goes to a, y to a and b, z to neither (unmatched).
ROUTES = [
    ("a", Filter((FieldCondition("kind", ("x", "y")),))),
    ("b", Filter((FieldCondition("kind", ("y",)),))),
]
EXPLICIT_IDS = ("k0", "k1", "k2")
ERRORS = (None, "", "boom", "a|b|c", "line one\nline two", 'upstream | said:\nline two\n{"n": 1}')
OUTCOMES = {"done": Outcome.DONE, "retry": Outcome.RETRY, "dead": Outcome.DEAD}


# -- operations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One job of a push."""

    kind: str
    key: str | None  # explicit id
    topic: str | None
    priority: Priority
    delay: float | None  # run_at = now + delay
    attributes: bool
    trace: bool


@dataclass(frozen=True)
class Push:
    jobs: tuple[Spec, ...]


@dataclass(frozen=True)
class Reserve:
    topic: str
    limit: int
    lease: float


@dataclass(frozen=True)
class Verdict:
    """One outcome of a finish; ``pick`` chooses a reserved job (newest first)."""

    pick: int
    kind: str  # done, retry, dead
    delay: float  # retry: run_at = now + delay
    spend: bool
    status: int | None
    error: str | None
    body: bytes


@dataclass(frozen=True)
class FinishMany:
    items: tuple[Verdict, ...]
    helper: bool  # one item through ack / retry / bury rather than finish


@dataclass(frozen=True)
class Extend:
    pick: int
    lease: float


@dataclass(frozen=True)
class Release:
    picks: tuple[int, ...]


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass(frozen=True)
class Recover:
    topic: str
    max_attempts: int


@dataclass(frozen=True)
class Promote:
    topic: str


@dataclass(frozen=True)
class Prune:
    topic: str
    done: Retention
    dead: Retention


@dataclass(frozen=True)
class Replay:
    topic: str
    picks: tuple[int, ...]  # indexes into the keys seen so far; -1 is an unknown id


@dataclass(frozen=True)
class Delete:
    topic: str
    picks: tuple[int, ...]


@dataclass(frozen=True)
class ListDead:
    topic: str
    limit: int
    status: int | None
    error: str | None


@dataclass(frozen=True)
class Check:
    pass


Op = (
    Push
    | Reserve
    | FinishMany
    | Extend
    | Release
    | Advance
    | Recover
    | Promote
    | Prune
    | Replay
    | Delete
    | ListDead
    | Check
)

topics = st.sampled_from(TOPICS)
specs = st.builds(
    Spec,
    kind=st.sampled_from(["x", "x", "y", "z"]),
    key=st.sampled_from([None, None, *EXPLICIT_IDS]),
    topic=st.sampled_from([None, None, None, "a", "b"]),
    priority=st.sampled_from(list(Priority)),
    delay=st.sampled_from([None, None, None, -5.0, 0.0, 10.0, 45.0]),
    attributes=st.booleans(),
    trace=st.booleans(),
)
outcomes = st.builds(
    Verdict,
    pick=st.integers(0, 9),
    kind=st.sampled_from(list(OUTCOMES)),
    delay=st.sampled_from([-1.0, 0.0, 0.0, 20.0]),
    spend=st.booleans(),
    status=st.sampled_from([None, 200, 404, 500, 503]),
    error=st.sampled_from(ERRORS),
    body=st.sampled_from([b"", b"oops"]),
)
retentions = st.builds(
    Retention, max_count=st.integers(0, 4), max_age=st.sampled_from([0.0, 5.0, 30.0, 3600.0])
)
picks = st.lists(st.integers(-1, 5), min_size=1, max_size=3).map(tuple)
pushes = st.builds(Push, st.lists(specs, min_size=1, max_size=4).map(tuple))
reserves = st.builds(Reserve, topics, st.integers(1, 4), st.sampled_from([5.0, 10.0, 30.0, 60.0]))
finishes = st.builds(
    FinishMany, st.lists(outcomes, min_size=1, max_size=3).map(tuple), st.booleans()
)
operations: st.SearchStrategy[Op] = st.one_of(
    # Weighted towards what moves jobs: one_of picks its branches about evenly.
    *[pushes] * 4,
    *[reserves] * 4,
    *[finishes] * 5,
    st.builds(Extend, st.integers(0, 9), st.sampled_from([5.0, 30.0])),
    st.builds(Release, st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple)),
    st.builds(Advance, st.sampled_from([0.5, 1.0, 5.0, 11.0, 31.0, 61.0, 3601.0])),
    st.builds(Recover, topics, st.integers(1, 3)),
    st.builds(Promote, topics),
    st.builds(Prune, topics, retentions, retentions),
    st.builds(Replay, topics, picks),
    st.builds(Delete, topics, picks),
    st.builds(
        ListDead,
        topics,
        st.integers(1, 3),
        st.sampled_from([None, None, 500, 404]),
        # No substring spanning a newline: the Redis store's dead listing sees it as a space.
        st.sampled_from([None, None, "boom", "LINE TWO", "|", "said"]),
    ),
    st.just(Check()),
)


# -- running one sequence on both stores -----------------------------------------------------


def ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def did_something(result: Any) -> bool:
    if isinstance(result, tuple) and result:  # Due, a push, a dead listing
        return did_something(result[0]) if len(result) == 2 else Pushed.STORED in result[1]
    if isinstance(result, list):  # reserve, finish, dead listing sizes, get_job
        return any(result)
    return bool(result)


@dataclass
class Side:
    """One store, with its ids mapped to the logical keys both stores share."""

    name: str
    store: Store
    key_of: dict[str, str] = field(default_factory=dict)  # store id -> logical key
    id_of: dict[str, str] = field(default_factory=dict)  # logical key -> store id

    def job(self, job: Job, traced: set[tuple[str, str]]) -> tuple[Any, ...]:
        key = self.key_of[job.id]
        return (
            key,
            job.queue,
            job.topic,
            job.payload,
            dict(job.attributes),
            job.priority,
            job.attempt,
            ms(job.enqueued_at),
            ms(job.run_at),
            ms(job.lease_until),
            job.trace_id if (key, job.topic) in traced else len(job.trace_id),
        )

    def record(self, record: JobRecord, traced: set[tuple[str, str]]) -> tuple[Any, ...]:
        key = self.key_of[record.id]
        return (
            key,
            record.queue,
            record.topic,
            record.state,
            record.payload,
            dict(record.attributes),
            record.priority,
            record.attempt,
            ms(record.enqueued_at),
            ms(record.run_at),
            record.trace_id if (key, record.topic) in traced else len(record.trace_id),
            ms(record.finished_at),
            tuple(
                (
                    a.attempt,
                    ms(a.started_at),
                    ms(a.duration),
                    a.outcome,
                    a.status,
                    a.error,
                    a.body,
                    a.stderr,
                )
                for a in record.attempts
            ),
        )

    def dead(self, job: DeadJob) -> tuple[Any, ...]:
        return (
            ms(job.died_at),
            self.key_of[job.id],
            job.queue,
            job.topic,
            job.payload,
            dict(job.attributes),
            job.attempt,
            job.status,
            # Newlines become spaces in the Redis store's state line, by design (see above).
            None if job.error is None else job.error.replace("\n", " "),
        )


class Differential:
    def __init__(self, clock: FakeClock, sqlite: SQLiteStore, redis: RedisStore) -> None:
        self.clock = clock
        self.redis = redis
        self.sides = (Side("sqlite", sqlite), Side("redis", redis))
        self.keys: dict[str, None] = {}  # every logical key pushed, in order
        # Copies (key, topic) pushed with an explicit trace id.  Per copy, not per key: an
        # explicit id pushed again to one topic leaves the finished copy in another topic
        # with the (random) trace id it had.
        self.traced: set[tuple[str, str]] = set()
        #: (key, topic) -> the copy has sat in ready since its push, never reserved/delayed.
        self.fresh: dict[tuple[str, str], bool] = {}
        self.held: list[tuple[Job, Job]] = []  # every reservation, stale ones too
        self.generated = 0
        self.payloads = 0
        self.step = ""

    async def both(self, call: Callable[[Side], Awaitable[T]]) -> tuple[T, T]:
        sqlite, redis = self.sides
        return await call(sqlite), await call(redis)

    def same(self, what: str, pair: tuple[Any, Any]) -> None:
        sqlite, redis = pair
        if currently_in_test_context():  # what the runs exercised (--hypothesis-show-statistics)
            event(f"{what}: {'yes' if did_something(sqlite) else 'no'}")
        assert sqlite == redis, (
            f"{what} differs after {self.step}\nsqlite: {sqlite}\nredis:  {redis}"
        )

    async def held_job(self, pick: int) -> tuple[Job, Job] | None:
        """A reservation: mostly one still leased (per SQLite), else any, stale ones too."""
        if not self.held:
            return None
        side = self.sides[0]
        leased = {
            (side.key_of[r.id], r.topic, r.attempt)
            for r in await self.sqlite_records()
            if r.state is State.LEASED
        }
        live = [p for p in self.held if (side.key_of[p[0].id], p[0].topic, p[0].attempt) in leased]
        pool = live if live and pick < 7 else self.held
        return pool[-1 - pick % len(pool)]

    async def sqlite_records(self) -> list[JobRecord]:
        side = self.sides[0]
        return [r for key in self.keys for r in await side.store.get_job(side.id_of[key])]

    async def apply(self, op: Op) -> None:
        self.step = repr(op)
        if isinstance(op, Push):
            await self.push(op)
        elif isinstance(op, Reserve):
            await self.reserve(op)
        elif isinstance(op, FinishMany):
            await self.finish(op)
        elif isinstance(op, Extend):
            held = await self.held_job(op.pick)
            if held is not None:
                pair = held
                self.same(
                    "extend",
                    await self.both(lambda s: s.store.extend(pair[self.index(s)], op.lease)),
                )
        elif isinstance(op, Release):
            chosen = [p for p in [await self.held_job(i) for i in op.picks] if p is not None]
            self.same(
                "release",
                await self.both(lambda s: s.store.release([p[self.index(s)] for p in chosen])),
            )
        elif isinstance(op, Advance):
            self.clock.advance(op.seconds)
        elif isinstance(op, Recover):
            self.same(
                "recover_expired",
                await self.due(lambda s: s.store.recover_expired(QUEUE, op.topic, op.max_attempts)),
            )
        elif isinstance(op, Promote):
            self.same("promote_due", await self.due(lambda s: s.store.promote_due(QUEUE, op.topic)))
        elif isinstance(op, Prune):
            await self.prune(op)
        elif isinstance(op, Replay | Delete):
            await self.replay_or_delete(op)
        elif isinstance(op, ListDead):
            await self.list_dead(op)
        else:
            await self.check()

    def index(self, side: Side) -> int:
        return 0 if side is self.sides[0] else 1

    async def due(self, call: Callable[[Side], Awaitable[Due]]) -> tuple[Any, Any]:
        sqlite, redis = await self.both(call)
        return (sqlite.count, ms(sqlite.next_at)), (redis.count, ms(redis.next_at))

    async def push(self, op: Push) -> None:
        now = self.clock.now
        jobs, keys = [], []
        for spec in op.jobs:
            self.payloads += 1
            payload = json.dumps({"kind": spec.kind, "n": self.payloads}).encode()
            if spec.key is None:
                key = f"g{self.generated}"
                self.generated += 1
            else:
                key = spec.key
            keys.append(key)
            jobs.append(
                NewJob(
                    payload,
                    id=spec.key,
                    topic=spec.topic,
                    priority=spec.priority,
                    run_at=None if spec.delay is None else now + spec.delay,
                    attributes={"kind": spec.kind, "n": str(self.payloads)}
                    if spec.attributes
                    else {},
                    trace_id=f"{self.payloads:032x}" if spec.trace else None,
                )
            )
        results = await self.both(lambda s: s.store.push(QUEUE, ROUTES, jobs))
        for side, result in zip(self.sides, results, strict=True):
            for key, job_id, outcome in zip(keys, result.ids, result.outcomes, strict=True):
                if outcome is Pushed.STORED:
                    side.key_of[job_id] = key
                    side.id_of[key] = job_id

        def shown(side: Side, result: PushResult) -> tuple[Any, ...]:
            ids = tuple(side.key_of.get(i, "?") for i in result.ids)  # "?": unmatched
            return ids, result.outcomes, result.copies_each

        self.same("push", (shown(self.sides[0], results[0]), shown(self.sides[1], results[1])))
        for spec, job, key, outcome in zip(op.jobs, jobs, keys, results[0].outcomes, strict=True):
            if outcome is not Pushed.STORED:
                continue
            self.keys[key] = None
            ready = spec.delay is None or spec.delay <= 0
            for topic in [spec.topic] if spec.topic else route(job.payload, ROUTES):
                self.fresh[key, topic] = ready
                (self.traced.add if spec.trace else self.traced.discard)((key, topic))

    async def reserve(self, op: Reserve) -> None:
        ready = [
            r for r in await self.sqlite_records() if r.topic == op.topic and r.state is State.READY
        ]
        # A job back in ready sits in a different place on each store: then take them all.
        key_of = self.sides[0].key_of
        mixed = any(not self.fresh.get((key_of[r.id], op.topic), False) for r in ready)
        limit = max(op.limit, len(ready)) if mixed else op.limit
        # The Redis store plans from its last reserve's ready counts: make it ask afresh.
        self.redis._ready_counts.clear()
        sqlite, redis = await self.both(lambda s: s.store.reserve(QUEUE, op.topic, limit, op.lease))
        if mixed:
            sqlite = sorted(sqlite, key=lambda j: self.sides[0].key_of[j.id])
            redis = sorted(redis, key=lambda j: self.sides[1].key_of[j.id])
        self.same(
            "reserve",
            (
                [self.sides[0].job(j, self.traced) for j in sqlite],
                [self.sides[1].job(j, self.traced) for j in redis],
            ),
        )
        for pair in zip(sqlite, redis, strict=True):
            self.held.append(pair)
            self.fresh[self.sides[0].key_of[pair[0].id], op.topic] = False

    async def finish(self, op: FinishMany) -> None:
        if not self.held:
            return
        now = self.clock.now
        chosen = [(item, await self.held_job(item.pick)) for item in op.items]

        def finishes(side: Side) -> list[Finish]:
            out = []
            for item, pair in chosen:
                assert pair is not None
                job = pair[self.index(side)]
                outcome = OUTCOMES[item.kind]
                attempt = Attempt(
                    job.attempt, now, 0.25, outcome, item.status, item.error, item.body
                )
                out.append(Finish(job, attempt, outcome, now + item.delay, item.spend))
            return out

        async def call(side: Side) -> list[bool]:
            items = finishes(side)
            if op.helper and len(items) == 1:
                (f,) = items
                if f.outcome is Outcome.DONE:
                    return [await side.store.ack(f.job, f.attempt)]
                if f.outcome is Outcome.DEAD:
                    return [await side.store.bury(f.job, f.attempt)]
                return [await side.store.retry(f.job, f.attempt, f.run_at, spend=f.spend)]
            return await side.store.finish(items)

        self.same("finish", await self.both(call))

    async def prune(self, op: Prune) -> None:
        now = self.clock.now
        records = [r for r in await self.sqlite_records() if r.topic == op.topic]

        def untied(state: State, keep: Retention) -> Retention:
            # Lower max_count until it does not cut between jobs finished at the same time.
            kept = sorted(
                (
                    r.finished_at or 0.0
                    for r in records
                    if r.state is state and not (r.finished_at or 0.0) < now - keep.max_age
                ),
                reverse=True,
            )
            count = keep.max_count
            while 0 < count < len(kept) and kept[count - 1] == kept[count]:
                count -= 1
            return Retention(count, keep.max_age)

        done, dead = untied(State.DONE, op.done), untied(State.DEAD, op.dead)
        self.same("prune", await self.both(lambda s: s.store.prune(QUEUE, op.topic, done, dead)))

    async def replay_or_delete(self, op: Replay | Delete) -> None:
        # Mostly dead jobs of the topic (as SQLite has them), then any job, or an unknown id.
        key_of = self.sides[0].key_of
        records = await self.sqlite_records()
        dead = [key_of[r.id] for r in records if r.topic == op.topic and r.state is State.DEAD]
        keys = dead + list(self.keys)
        chosen = ["nope" if i < 0 or not keys else keys[i % len(keys)] for i in op.picks]

        async def call(side: Side) -> int:
            ids = [side.id_of.get(key, key) for key in chosen]
            if isinstance(op, Replay):
                return await side.store.replay_dead(QUEUE, op.topic, ids)
            return await side.store.delete_dead(QUEUE, op.topic, ids)

        self.same(type(op).__name__, await self.both(call))

    async def list_dead(self, op: ListDead) -> None:
        where = DeadFilter(status=op.status, error=op.error)

        async def call(side: Side) -> tuple[list[int], list[tuple[Any, ...]]]:
            sizes: list[int] = []
            found: list[tuple[Any, ...]] = []
            cursor: str | None = None
            for _ in range(100):
                page = await side.store.list_dead(QUEUE, op.topic, where, cursor, op.limit)
                sizes.append(len(page.jobs))
                found += [side.dead(j) for j in page.jobs]
                cursor = page.cursor
                if cursor is None:
                    break
            died = [row[0] for row in found]
            assert died == sorted(died, reverse=True), f"{side.name}: not newest first"
            return sizes, sorted(found)

        self.same("list_dead", await self.both(call))

    async def check(self) -> None:
        for topic in TOPICS:
            self.same("stats", await self.both(partial(stats, topic=topic)))
            self.same("depth", await self.both(partial(depth, topic=topic)))
        self.same("depth", await self.both(lambda s: s.store.depth(QUEUE, list(TOPICS))))

        async def records(side: Side) -> list[tuple[Any, ...]]:
            out = []
            for key in self.keys:
                got = await side.store.get_job(side.id_of[key])
                out += sorted(side.record(r, self.traced) for r in got)
            return out

        self.same("get_job", await self.both(records))
        self.same("get_job", await self.both(lambda s: s.store.get_job("nope")))


async def stats(side: Side, topic: str) -> TopicStats:
    return await side.store.stats(QUEUE, topic)


async def depth(side: Side, topic: str) -> int:
    return await side.store.depth(QUEUE, [topic])


async def run(server: RedisServer, ops: Sequence[Op]) -> None:
    clock = FakeClock()
    sqlite = await SQLiteStore.open(":memory:", clock=clock)
    redis = RedisStore(Standalone(RedisClient(server.address)), clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(sqlite.run)
        await nursery.start(redis.run)
        try:
            differential = Differential(clock, sqlite, redis)
            for op in ops:
                await differential.apply(op)
            differential.step = "the last operation"
            await differential.check()
        finally:
            await sqlite.aclose()
            await redis.aclose()
            nursery.cancel_scope.cancel()


# derandomize: the same examples on every run, so CI cannot turn red by luck of the draw.
@settings(max_examples=200, deadline=None, derandomize=True)
@given(ops=st.lists(operations, min_size=15, max_size=50))
def test_sqlite_and_redis_agree(redis_server: RedisServer, ops: list[Op]) -> None:
    redis_server.cli("FLUSHALL")  # each example starts from empty stores
    trio.run(run, redis_server, ops)


# -- differences this test found, fixed in the SQLite store; kept as regressions ----------


async def test_an_empty_error_reads_back_as_no_error_on_both(redis_server: RedisServer) -> None:
    redis_server.cli("FLUSHALL")
    spec = Spec("x", None, None, Priority.NORMAL, None, False, False)
    empty = Verdict(0, "dead", 0.0, True, 500, "", b"")
    await run(
        redis_server,
        [
            Push((spec,)),
            Reserve("a", 1, 30.0),
            FinishMany((empty,), helper=False),
            ListDead("a", 3, None, None),
            Check(),
        ],
    )


async def test_an_id_deleted_twice_is_deleted_and_counted_once(redis_server: RedisServer) -> None:
    redis_server.cli("FLUSHALL")
    spec = Spec("x", None, None, Priority.NORMAL, None, False, False)
    bury = Verdict(0, "dead", 0.0, True, 500, "boom", b"")
    await run(
        redis_server,
        [
            Push((spec,)),
            Reserve("a", 1, 30.0),
            FinishMany((bury,), helper=False),
            Delete("a", (0, 0)),  # the dead job g0, twice
            Check(),
        ],
    )
