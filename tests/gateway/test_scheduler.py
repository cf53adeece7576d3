"""The scheduler of an idle topic: it sleeps until something is due, yet misses nothing
another daemon sharing the store does (a lease it takes, a delayed push, a retry).

A unit test of the dispatcher over real stores (SQLite, and redis-server with a second
RedisStore standing in for the other daemon), with an in-process backend."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from adapters.storage.base import Due, Finish, Store
from adapters.storage.fanout import Filter
from adapters.storage.jobs import Attempt, NewJob, Outcome, State
from adapters.storage.redis_client import RedisClient
from adapters.storage.redis_routing import Standalone
from adapters.storage.redis_store import RedisStore
from adapters.storage.sqlite import SQLiteStore
from gateway import dispatcher as dispatch
from gateway.config import TopicConfig
from tests.gateway.test_dispatch_batching import InstantBackend
from tests.support.redis import RedisServer
from tests.support.stores import running_store


class CountingRedis(RedisStore):
    promotes: int = 0

    async def promote_due(self, queue: str, topic: str) -> Due:
        self.promotes += 1
        return await super().promote_due(queue, topic)


def topic_config(*, lease: float | None = None, paused: bool = False) -> TopicConfig:
    return TopicConfig(
        queue="q", name="t", backend="http://127.0.0.1:9/", kind="http", lease=lease, paused=paused
    )


@asynccontextmanager
async def dispatching(store: Store, topic: TopicConfig) -> AsyncIterator[InstantBackend]:
    backend = InstantBackend()
    worker = dispatch.Dispatcher(store, topic, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        try:
            yield backend
        finally:
            worker.stop()


@asynccontextmanager
async def two_daemons(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """The dispatcher's store, and the other daemon's: the same SQLite store (one daemon
    per file), or a second client of the same redis-server."""
    if kind == "sqlite":
        async with running_store(await SQLiteStore.open(str(tmp_path / "jobs.db"))) as store:
            yield store, store
        return
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        async with (
            running_store(RedisStore(Standalone(RedisClient(server.address)))) as ours,
            running_store(RedisStore(Standalone(RedisClient(server.address)))) as theirs,
        ):
            yield ours, theirs
    finally:
        server.stop()


async def test_an_idle_topic_does_not_look_every_second(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        counting = CountingRedis(Standalone(RedisClient(server.address)))
        async with (
            running_store(counting) as store,
            dispatching(store, topic_config()),  # lease 45 s: a look every 10 s
        ):
            await trio.sleep(3)
    finally:
        server.stop()
    assert store.promotes == 1  # at start; every second, 3 or 4


async def test_a_delayed_push_by_another_daemon_on_the_sqlite_file_is_not_late(
    tmp_path: Path,
) -> None:
    # Nothing rings our timer for the other daemon's push: we look every second.
    path = str(tmp_path / "jobs.db")
    async with (
        running_store(await SQLiteStore.open(path)) as ours,
        running_store(await SQLiteStore.open(path)) as theirs,
        dispatching(ours, topic_config()) as backend,
    ):
        await trio.sleep(0.3)  # our scheduler has looked: nothing due
        due = time.time() + 1.0
        await theirs.push("q", [("t", Filter())], [NewJob(b"delayed", id="d", run_at=due)])
        with trio.fail_after(15):
            while not backend.delivered:
                await trio.sleep(0.02)
        late = time.time() - due
    assert late < 1.3  # a look a second, not one every 10 s


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_lease_another_daemon_takes_is_recovered_when_it_ends(
    kind: str, tmp_path: Path
) -> None:
    async with two_daemons(kind, tmp_path) as (ours, theirs):
        await theirs.push("q", [("t", Filter())], [NewJob(b"{}")])
        # Paused: only the other daemon reserves.  A 4 s lease: we look every 2 s.
        async with dispatching(ours, topic_config(lease=4.0, paused=True)):
            await trio.sleep(0.3)  # our scheduler has looked: nothing leased
            (job,) = await theirs.reserve("q", "t", 1, 4.0)  # ... and that daemon dies
            taken = time.monotonic()
            with trio.fail_after(10):
                while (await ours.stats("q", "t")).ready == 0:
                    await trio.sleep(0.02)
            late = time.monotonic() - taken - 4.0
        (record,) = await ours.get_job(job.id)
    assert record.state is State.READY
    assert [a.outcome for a in record.attempts] == [Outcome.EXPIRED]
    assert -0.05 < late < 0.5  # at its end, not at the next half-lease look


async def test_another_daemons_delayed_push_and_retry_ring_our_timer(tmp_path: Path) -> None:
    async with two_daemons("redis", tmp_path) as (ours, theirs):
        await theirs.push("q", [("t", Filter())], [NewJob(b"retried", id="r")])
        (job,) = await theirs.reserve("q", "t", 1, 60.0)
        async with dispatching(ours, topic_config()) as backend:  # a look every 10 s
            await trio.sleep(0.3)  # our scheduler has looked: nothing due, one lease
            due = time.time() + 1.0
            await theirs.push("q", [("t", Filter())], [NewJob(b"delayed", id="d", run_at=due)])
            attempt = Attempt(1, time.time(), 0.01, Outcome.RETRY, status=503)
            # That daemon records a retry, due in 1.5 s, then stops before its scheduler
            # makes the job ready.
            await theirs.finish([Finish(job, attempt, Outcome.RETRY, run_at=due + 0.5)])
            with trio.fail_after(10):
                while len(backend.delivered) < 2:
                    await trio.sleep(0.02)
            late = time.time() - due - 0.5
    assert backend.delivered == ["d", "r"]
    assert late < 0.5  # rung, not the next look 10 s later
