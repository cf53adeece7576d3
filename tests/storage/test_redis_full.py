"""A full Redis (``maxmemory`` reached, ``noeviction``) refuses pushes, explicit ids too,
and still takes what drains it or keeps a delivery's lease: reserves, outcomes, lease
extensions, releases.

Redis refuses a script for a full memory only at its first write, and only if that write is
one that may grow memory: the order of each script's writes decides which it is."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from adapters.storage.base import Finish, Store
from adapters.storage.errors import StoreError
from adapters.storage.fanout import Filter
from adapters.storage.jobs import Attempt, Job, NewJob, Outcome, State
from tests.storage.test_redis_timeouts import store_at
from tests.support.redis import RedisServer

pytestmark = pytest.mark.trio

ROUTES = [("email", Filter())]
LATER = 4e9  # a retry's run_at: delayed


@asynccontextmanager
async def opened(redis: RedisServer, tmp_path: Path) -> AsyncIterator[Store]:
    async with store_at(f"redis://127.0.0.1:{redis.port}/0", tmp_path) as store:
        yield store


@asynccontextmanager
async def full(redis: RedisServer) -> AsyncIterator[None]:
    redis.cli("CONFIG", "SET", "maxmemory", "1")  # every write that may grow memory: OOM
    try:
        yield
    finally:
        redis.cli("CONFIG", "SET", "maxmemory", "0")


def finish(job: Job, outcome: Outcome, run_at: float = 0.0) -> Finish:
    status = 200 if outcome is Outcome.DONE else 500
    return Finish(job, Attempt(job.attempt, 1.0, 0.01, outcome, status=status), outcome, run_at)


async def test_a_push_with_the_producers_own_id_is_refused_too(
    noeviction_redis: RedisServer, tmp_path: Path
) -> None:
    # Its id is looked for first, and what a done job of that id left was deleted before the
    # new one was written: Redis took the HDEL as the script's first write, and let every
    # later one through.  300 pushes of 20 KB each went past a 3 MB maxmemory.
    async with opened(noeviction_redis, tmp_path) as store:
        await store.push("orders", ROUTES, [NewJob(b"first", id="order-1")])
        (job,) = await store.reserve("orders", "email", 1, 60)
        await store.finish([finish(job, Outcome.DONE)])  # done: its id may be pushed again
        async with full(noeviction_redis):
            for new in (NewJob(b"x"), NewJob(b"y", id="order-42"), NewJob(b"z", id="order-1")):
                with pytest.raises(StoreError, match="OOM"):
                    await store.push("orders", ROUTES, [new])
        (record,) = await store.get_job("order-1")
        assert (record.state, record.payload) == (State.DONE, b"first")
        assert await store.get_job("order-42") == []
        assert await store.depth("orders", ["email"]) == 0
        # With room again, the done job is replaced, and nothing of it is left.
        await store.push("orders", ROUTES, [NewJob(b"again", id="order-1")])
        (record,) = await store.get_job("order-1")
        assert (record.state, record.payload, record.attempts) == (State.READY, b"again", ())
        assert (await store.stats("orders", "email")).done == 0


async def test_outcomes_leases_and_releases_are_taken_by_a_full_redis(
    noeviction_redis: RedisServer, tmp_path: Path
) -> None:
    # Refused, a finished job was delivered again when its lease ran out (a batch holding a
    # retry was refused whole, the done outcomes beside it too), and a long delivery's lease
    # ran out while it ran.
    async with opened(noeviction_redis, tmp_path) as store:
        payloads = [b"done", b"later", b"now", b"dead", b"long", b"back"]
        await store.push("orders", ROUTES, [NewJob(p) for p in payloads])
        async with full(noeviction_redis):
            jobs = {job.payload: job for job in await store.reserve("orders", "email", 6, 60)}
            assert list(jobs) == payloads
            recorded = await store.finish(
                [
                    finish(jobs[b"later"], Outcome.RETRY, LATER),
                    finish(jobs[b"done"], Outcome.DONE),
                    finish(jobs[b"now"], Outcome.RETRY, 1.0),
                    finish(jobs[b"dead"], Outcome.DEAD),
                ]
            )
            assert recorded == [True] * 4
            assert await store.extend(jobs[b"long"], 600)
            assert await store.release([jobs[b"back"]]) == 1
        stats = await store.stats("orders", "email")
        assert (stats.ready, stats.delayed, stats.leased, stats.dead, stats.done) == (2, 1, 1, 1, 1)
        again = await store.reserve("orders", "email", 2, 60)
        assert sorted((job.payload, job.attempt) for job in again) == [(b"back", 1), (b"now", 2)]
        (long,) = await store.get_job(jobs[b"long"].id)
        assert long.state is State.LEASED
        lease_until = float(noeviction_redis.cli("ZSCORE", "bg:{orders}:l:email", long.id))
        assert lease_until > time.time() + 500
