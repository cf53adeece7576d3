"""``Store.topics()``: every (queue, topic) a store holds or has held jobs of, whatever the
configuration says, so a topic a reload removed can still be found with its jobs.  Run
against every store (SQLite, Redis, Redis Cluster)."""

from __future__ import annotations

from adapters.storage.base import Store
from adapters.storage.fanout import Filter
from adapters.storage.jobs import Attempt, DeadFilter, NewJob, Outcome
from tests.storage.conftest import FakeClock

EVERY_JOB = Filter()


async def test_an_empty_store_holds_no_topic(store: Store) -> None:
    assert await store.topics() == []


async def test_every_topic_a_job_went_to_sorted_and_kept_once_emptied(store: Store) -> None:
    await store.push("orders", [("sms", EVERY_JOB), ("email", EVERY_JOB)], [NewJob(b"1")])
    await store.push("audit", [("all", EVERY_JOB)], [NewJob(b"2"), NewJob(b"3")])
    await store.push("orders", [("email", EVERY_JOB)], [NewJob(b"4")])
    expected = [("audit", "all"), ("orders", "email"), ("orders", "sms")]
    assert await store.topics() == expected

    # Emptied (delivered, or died and deleted), a topic is still one the store has held:
    # its counters remain, and stats tells that it holds nothing.
    for job in await store.reserve("audit", "all", 10, lease=30):
        assert await store.ack(job, Attempt(job.attempt, 1.0, 0.01, Outcome.DONE, status=200))
    (job,) = await store.reserve("orders", "sms", 10, lease=30)
    assert await store.bury(job, Attempt(job.attempt, 1.0, 0.01, Outcome.DEAD, status=400))
    dead = await store.list_dead("orders", "sms", DeadFilter(), None, 10)
    assert await store.delete_dead("orders", "sms", [j.id for j in dead.jobs]) == 1
    assert await store.topics() == expected
    audit, email, sms = await store.stats_many(expected)
    assert (audit.ready, audit.done, audit.done_total) == (0, 2, 2)
    assert (email.ready, email.pushed_total) == (2, 2)
    assert (sms.ready, sms.dead, sms.dead_total) == (0, 0, 1)


async def test_a_delayed_or_leased_topic_is_listed(store: Store, clock: FakeClock) -> None:
    later = [NewJob(b"x", run_at=clock() + 3600)]
    await store.push("later", [("reminder", EVERY_JOB)], later)
    await store.push("busy", [("work", EVERY_JOB)], [NewJob(b"y")])
    assert len(await store.reserve("busy", "work", 10, lease=30)) == 1
    assert await store.topics() == [("busy", "work"), ("later", "reminder")]
    work, reminder = await store.stats_many(await store.topics())
    assert (work.leased, reminder.delayed) == (1, 1)
