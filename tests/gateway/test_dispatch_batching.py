"""How a dispatcher sizes its store calls: large batches for a busy topic, few leases for a
slow one; and a backend that raises.  A unit test of the dispatcher over a real SQLite store,
with an in-process backend so the delivery rate is whatever the test makes it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from adapters.delivery.base import Delivery
from adapters.storage.base import Finish
from adapters.storage.fanout import Filter
from adapters.storage.jobs import Job, NewJob, State
from adapters.storage.sqlite import SQLiteStore
from gateway import dispatcher as dispatch
from gateway.config import RetryPolicy, TopicConfig


class InstantBackend:
    """Answers 200 to every job, after ``pause`` seconds."""

    description = "in-process"

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause
        self.delivered: list[str] = []

    async def deliver(self, job: Job) -> Delivery:
        if self.pause:
            await trio.sleep(self.pause)
        else:
            await trio.lowlevel.checkpoint()
        self.delivered.append(job.id)
        return Delivery(duration=self.pause, status=200)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def aclose(self) -> None:
        pass

    def statistics(self) -> Any:
        return None


class CountingStore(SQLiteStore):
    """The SQLite store, remembering the size of every reserve and finish call, and the
    jobs whose lease it was asked to extend."""

    reserves: list[int]
    finishes: list[int]
    extends: list[str]

    async def reserve(self, queue: str, topic: str, limit: int, lease: float) -> list[Job]:
        self.reserves.append(limit)
        return await super().reserve(queue, topic, limit, lease)

    async def finish(self, items: Sequence[Finish]) -> list[bool]:
        self.finishes.append(len(items))
        return await super().finish(items)

    async def extend(self, job: Job, lease: float) -> bool:
        self.extends.append(job.id)
        return await super().extend(job, lease)


async def run_topic(
    tmp_path: Path, jobs: int, concurrency: int, pause: float, timeout: float = 30.0
) -> CountingStore:
    store = await CountingStore.open(str(tmp_path / "jobs.db"))
    store.reserves, store.finishes, store.extends = [], [], []
    topic = TopicConfig(
        queue="q",
        name="t",
        backend="http://127.0.0.1:9/",
        kind="http",
        concurrency=concurrency,
        timeout=timeout,
    )
    backend = InstantBackend(pause)
    for start in range(0, jobs, 500):
        await store.push("q", [("t", Filter())], [NewJob(b"{}")] * min(500, jobs - start))
    worker = dispatch.Dispatcher(store, topic, backend)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            with trio.fail_after(60):
                while (await store.stats("q", "t")).done_total < jobs:
                    await trio.sleep(0.01)
            worker.stop()
    finally:
        await store.aclose()
    assert len(backend.delivered) == len(set(backend.delivered)) == jobs
    return store


async def test_a_busy_topic_reserves_and_records_in_large_batches(tmp_path: Path) -> None:
    store = await run_topic(tmp_path, jobs=6000, concurrency=4, pause=0.0)
    least = 2 * 4
    # The buffer grew with the delivery rate, and never past its cap.
    assert max(store.reserves) > least
    assert max(store.reserves) <= dispatch.MAX_BUFFER
    # Outcomes were gathered: far fewer finish calls than jobs.
    assert sum(store.finishes) == 6000
    assert len(store.finishes) < 6000 / 8


async def test_a_topic_whose_timeout_outlasts_its_lease_extends_no_lease_per_job(
    tmp_path: Path,
) -> None:
    # A 5-minute timeout outlasts the default lease (75 s): a delivery may need its lease
    # extended while it runs.  Every job used to have its lease extended before it started,
    # and a task of its own to extend it meanwhile: a store call, a task and a nursery per
    # job, a fifth of the rate of a topic with a 30 s timeout.
    store = await run_topic(tmp_path, jobs=2000, concurrency=4, pause=0.0, timeout=300.0)
    assert store.extends == []
    assert len(store.finishes) < 2000 / 8


async def test_a_slow_topic_holds_few_leases(tmp_path: Path) -> None:
    # 20 jobs/s at most: BUFFER_SECONDS of that is less than a job, so the buffer stays at
    # its floor of two jobs per worker.
    store = await run_topic(tmp_path, jobs=30, concurrency=2, pause=0.1)
    assert max(store.reserves) <= 2 * 2


@pytest.mark.parametrize("linger", [0.0, dispatch.RECORD_LINGER])
async def test_every_outcome_is_recorded_whatever_the_linger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linger: float
) -> None:
    monkeypatch.setattr(dispatch, "RECORD_LINGER", linger)
    store = await run_topic(tmp_path, jobs=500, concurrency=3, pause=0.0)
    assert sum(store.finishes) == 500


class BrokenBackend(InstantBackend):
    """Raises what no adapter should: a bug, or a value its protocol library refuses."""

    async def deliver(self, job: Job) -> Delivery:
        await trio.lowlevel.checkpoint()
        self.delivered.append(job.id)
        raise UnicodeEncodeError("ascii", "é", 0, 1, "ordinal not in range(128)")


async def test_a_bug_in_a_delivery_fails_the_attempt_not_the_daemon(tmp_path: Path) -> None:
    store = await SQLiteStore.open(str(tmp_path / "jobs.db"))
    topic = TopicConfig(
        queue="q",
        name="t",
        backend="http://127.0.0.1:9/",
        kind="http",
        retry=RetryPolicy(max_attempts=2, backoff=0.01, max_backoff=0.01),
    )
    backend = BrokenBackend()
    (job_id,) = (await store.push("q", [("t", Filter())], [NewJob(b"{}")])).ids
    worker = dispatch.Dispatcher(store, topic, backend)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            with trio.fail_after(10):
                while (record := (await store.get_job(job_id))[0]).state is not State.DEAD:
                    await trio.sleep(0.01)
            worker.stop()
    finally:
        await store.aclose()
    assert backend.delivered == [job_id, job_id]
    assert len(record.attempts) == 2
    for attempt in record.attempts:
        assert attempt.error is not None
        assert attempt.error.startswith(
            "internal: busgate could not make the request: UnicodeEncodeError: 'ascii' codec"
        )


class SlowAnswers(SQLiteStore):
    """The SQLite store, whose reserve answers ``delay`` seconds after leasing the jobs:
    the way a reserve cut short by a deadline is still carried out by the store."""

    delay = 0.3
    reserving: trio.Event

    async def reserve(self, queue: str, topic: str, limit: int, lease: float) -> list[Job]:
        jobs = await super().reserve(queue, topic, limit, lease)
        if jobs:
            self.reserving.set()
            await trio.sleep(self.delay)
        return jobs


async def test_a_stop_deadline_during_a_reserve_leaves_no_job_leased(tmp_path: Path) -> None:
    store = await SlowAnswers.open(str(tmp_path / "jobs.db"))
    store.reserving = trio.Event()
    topic = TopicConfig(queue="q", name="t", backend="http://127.0.0.1:9/", kind="http")
    await store.push("q", [("t", Filter())], [NewJob(b"{}")] * 20)
    worker = dispatch.Dispatcher(store, topic, InstantBackend(pause=1.0))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await store.reserving.wait()
            worker.stop(trio.current_time())  # shutdown_timeout: 0s
            with trio.fail_after(5):
                await worker.finished.wait()
        stats = await store.stats("q", "t")
    finally:
        await store.aclose()
    assert (stats.leased, stats.ready) == (0, 20)
