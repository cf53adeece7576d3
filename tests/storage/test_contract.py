"""The storage contract, run against every store."""

from __future__ import annotations

import math
import tracemalloc

import pytest
import trio

from adapters.storage import redis_store, sqlite
from adapters.storage.base import Expiry, Finish, Retention, Store
from adapters.storage.fanout import FieldCondition, Filter
from adapters.storage.jobs import (
    Attempt,
    DeadFilter,
    Job,
    NewJob,
    Outcome,
    Priority,
    Pushed,
    State,
)
from tests.storage.conftest import FakeClock

NO_FILTER = Filter()
ROUTES = [("email", NO_FILTER)]


def attempt_of(job: Job, outcome: Outcome = Outcome.DONE, status: int | None = 200) -> Attempt:
    return Attempt(job.attempt, 1.0, 0.01, outcome, status=status)


async def test_push_reserve_ack(store: Store) -> None:
    result = await store.push("orders", ROUTES, [NewJob(b'{"n":1}'), NewJob(b'{"n":2}')])
    assert len(result.ids) == 2 and result.copies == 2
    assert await store.depth("orders", ["email"]) == 2
    jobs = await store.reserve("orders", "email", 10, lease=30)
    assert [j.payload for j in jobs] == [b'{"n":1}', b'{"n":2}']
    assert [j.id for j in jobs] == list(result.ids)
    assert all(j.attempt == 1 and j.queue == "orders" and j.topic == "email" for j in jobs)
    assert len(jobs[0].trace_id) == 32
    assert await store.reserve("orders", "email", 10, lease=30) == []
    stats = await store.stats("orders", "email")
    assert (stats.ready, stats.leased) == (0, 2)
    assert await store.ack(jobs[0], attempt_of(jobs[0]))
    assert not await store.ack(jobs[0], attempt_of(jobs[0]))  # already acknowledged
    stats = await store.stats("orders", "email")
    assert (stats.leased, stats.done, stats.done_total, stats.pushed_total) == (1, 1, 1, 2)
    (record,) = await store.get_job(jobs[0].id)
    assert record.state is State.DONE
    assert record.attempts[0].outcome is Outcome.DONE and record.attempts[0].status == 200


async def test_each_job_has_its_own_outcome_in_a_batch(store: Store) -> None:
    # The Redis store's PUSH leaves the per-job outcomes out of its reply when every job went
    # to every topic; a batch where one did not must still say which.
    routes = [("email", NO_FILTER), ("sms", NO_FILTER)]
    plain = await store.push("orders", routes, [NewJob(b"a"), NewJob(b"b", id="k1")])
    assert plain.outcomes == (Pushed.STORED, Pushed.STORED) and plain.copies_each == (2, 2)
    mixed = await store.push(
        "orders",
        routes,
        [NewJob(b"c"), NewJob(b"d", topic="sms"), NewJob(b"e", id="k1"), NewJob(b"f")],
    )
    assert mixed.outcomes == (Pushed.STORED, Pushed.STORED, Pushed.DUPLICATE, Pushed.STORED)
    assert mixed.copies_each == (2, 1, 0, 2)
    assert await store.depth("orders", ["email"]) == 4
    assert await store.depth("orders", ["sms"]) == 5


async def test_a_reserve_takes_what_was_pushed_since_the_last_one(store: Store) -> None:
    # The Redis store plans a reserve from the counts the previous one returned: two low jobs
    # then, one of them taken, capped this one at the one left (model check, hunt 29).
    await store.push("orders", ROUTES, [NewJob(b"low", priority=Priority.LOW)] * 2)
    assert len(await store.reserve("orders", "email", 1, lease=30)) == 1
    await store.push("orders", ROUTES, [NewJob(b"normal")] * 5)
    taken = await store.reserve("orders", "email", 4, lease=30)
    assert len(taken) == 4
    assert sorted(job.priority for job in taken).count(Priority.NORMAL) >= 3


async def test_fan_out_with_filters_is_counted(store: Store) -> None:
    routes = [
        ("all", NO_FILTER),
        ("opened", Filter((FieldCondition("state", ("opened",)),))),
        (
            "eu",
            Filter((FieldCondition("country", ("fr", "de")), FieldCondition("vip", present=False))),
        ),
    ]
    result = await store.push(
        "orders",
        routes,
        [
            NewJob(b'{"state": "opened", "country": "fr"}'),
            NewJob(b'{"state": "closed", "country": "de", "vip": true}'),
            NewJob(b"not json"),
        ],
    )
    assert result.copies == 3 + 1 + 1
    assert await store.depth("orders", ["all"]) == 3
    assert await store.depth("orders", ["opened"]) == 1
    assert await store.depth("orders", ["eu"]) == 1
    assert await store.depth("orders", ["all", "opened", "eu"]) == 5
    only = await store.push("orders", routes[1:], [NewJob(b'{"state": "closed"}')])
    assert (only.copies, only.unmatched) == (0, 1)
    assert (await store.stats("orders", "opened")).unmatched_total == 1
    targeted = await store.push("orders", routes, [NewJob(b"x", topic="opened")])
    assert targeted.copies == 1
    assert await store.depth("orders", ["opened"]) == 2


async def test_explicit_id_is_an_idempotency_key(store: Store) -> None:
    first = await store.push("orders", ROUTES, [NewJob(b"a", id="order-42")])
    again = await store.push("orders", ROUTES, [NewJob(b"b", id="order-42")])
    assert first.ids == again.ids == ("order-42",)
    assert (again.copies, again.duplicates) == (0, 1)
    (job,) = await store.reserve("orders", "email", 5, lease=30)
    leased_again = await store.push("orders", ROUTES, [NewJob(b"c", id="order-42")])
    assert leased_again.duplicates == 1  # leased still counts as pending
    await store.ack(job, attempt_of(job))
    after = await store.push("orders", ROUTES, [NewJob(b"d", id="order-42")])
    assert after.copies == 1  # finished jobs do not block a new push with the same id
    (job,) = await store.reserve("orders", "email", 5, lease=30)
    assert job.payload == b"d" and job.attempt == 1
    stats = await store.stats("orders", "email")
    assert (stats.ready, stats.leased, stats.done) == (0, 1, 0)


async def test_an_explicit_id_is_a_duplicate_of_a_copy_in_a_topic_a_reload_removed(
    store: Store,
) -> None:
    # The Redis store once looked only in the topics the push named (model check, hunt 29).
    await store.push("orders", [("sms", NO_FILTER)], [NewJob(b"a", id="order-9")])
    again = await store.push("orders", ROUTES, [NewJob(b"b", id="order-9")])
    assert (again.copies, again.duplicates) == (0, 1)
    assert await store.depth("orders", ["email"]) == 0
    (job,) = await store.reserve("orders", "sms", 1, lease=30)
    await store.ack(job, attempt_of(job))
    assert (await store.push("orders", ROUTES, [NewJob(b"c", id="order-9")])).copies == 1


async def test_an_explicit_id_pushed_again_leaves_its_dead_letter_alone(store: Store) -> None:
    # A producer retrying with its idempotency key replaced the dead job: its payload,
    # attributes and attempts were gone before an operator saw them.
    await store.push(
        "orders", ROUTES, [NewJob(b"first", id="order-7", attributes={"tenant": "acme"})]
    )
    (job,) = await store.reserve("orders", "email", 1, lease=30)
    assert await store.bury(job, attempt_of(job, Outcome.DEAD, 404))
    again = await store.push("orders", ROUTES, [NewJob(b"second", id="order-7")])
    assert (again.ids, again.copies, again.duplicates) == (("order-7",), 0, 1)
    (record,) = await store.get_job("order-7")
    assert record.state is State.DEAD
    assert (record.payload, dict(record.attributes)) == (b"first", {"tenant": "acme"})
    assert [a.status for a in record.attempts] == [404]
    # Once the operator deletes it, the id may be used again.
    assert await store.delete_dead("orders", "email", ["order-7"]) == 1
    assert (await store.push("orders", ROUTES, [NewJob(b"third", id="order-7")])).copies == 1


async def test_delayed_jobs_wait_for_their_time(store: Store, clock: FakeClock) -> None:
    await store.push("orders", ROUTES, [NewJob(b"later", run_at=clock.now + 60), NewJob(b"now")])
    assert [j.payload for j in await store.reserve("orders", "email", 5, 30)] == [b"now"]
    due = await store.promote_due("orders", "email")
    assert (due.count, due.next_at) == (0, clock.now + 60)
    clock.advance(61)
    due = await store.promote_due("orders", "email")
    assert (due.count, due.next_at) == (1, None)
    assert [j.payload for j in await store.reserve("orders", "email", 5, 30)] == [b"later"]


async def test_errors_with_newlines_and_bars_keep_the_history_whole(
    store: Store, clock: FakeClock
) -> None:
    # Backends write anything into an error excerpt; the store's own separators must survive.
    error = 'upstream | said:\nline two\n{"n": 1}'
    await store.push("orders", ROUTES, [NewJob(b"x")])
    (job,) = await store.reserve("orders", "email", 1, 30)
    failed = Attempt(job.attempt, 1.0, 0.01, Outcome.RETRY, status=500, error=error)
    assert await store.retry(job, failed, clock.now)
    (job,) = await store.reserve("orders", "email", 1, 30)
    assert job.attempt == 2
    assert await store.bury(job, Attempt(2, 2.0, 0.01, Outcome.DEAD, status=502, error=error))
    (record,) = await store.get_job(job.id)
    assert record.state is State.DEAD and record.attempt == 2
    assert [(a.attempt, a.status, a.error) for a in record.attempts] == [
        (1, 500, error),
        (2, 502, error),
    ]
    (dead,) = (await store.list_dead("orders", "email", DeadFilter(), None, 10)).jobs
    assert (dead.attempt, dead.status) == (2, 502)
    assert dead.error is not None and "line two" in dead.error
    assert (await store.list_dead("orders", "email", DeadFilter(error="LINE TWO"), None, 10)).jobs


async def test_retry_spends_an_attempt_unless_told_not_to(store: Store, clock: FakeClock) -> None:
    await store.push("orders", ROUTES, [NewJob(b"x")])
    (job,) = await store.reserve("orders", "email", 1, 30)
    assert await store.retry(job, attempt_of(job, Outcome.RETRY, 500), clock.now)
    (job,) = await store.reserve("orders", "email", 1, 30)
    assert job.attempt == 2
    assert await store.retry(job, attempt_of(job, Outcome.RETRY, None), clock.now, spend=False)
    (job,) = await store.reserve("orders", "email", 1, 30)
    assert job.attempt == 2  # the overloaded attempt was given back
    assert await store.retry(job, attempt_of(job, Outcome.RETRY, 503), clock.now + 10)
    assert await store.reserve("orders", "email", 1, 30) == []
    assert (await store.stats("orders", "email")).delayed == 1
    clock.advance(10)
    await store.promote_due("orders", "email")
    (job,) = await store.reserve("orders", "email", 1, 30)
    assert job.attempt == 3
    assert await store.bury(job, attempt_of(job, Outcome.DEAD, 404))
    (record,) = await store.get_job(job.id)
    assert record.state is State.DEAD
    assert [(a.attempt, a.outcome, a.status) for a in record.attempts] == [
        (1, Outcome.RETRY, 500),
        (2, Outcome.RETRY, None),
        (2, Outcome.RETRY, 503),
        (3, Outcome.DEAD, 404),
    ]
    stats = await store.stats("orders", "email")
    assert (stats.dead, stats.dead_total, stats.retried_total) == (1, 1, 3)


async def test_one_finish_batch_records_each_outcome_once(store: Store, clock: FakeClock) -> None:
    await store.push("orders", ROUTES, [NewJob(b"a"), NewJob(b"b"), NewJob(b"c")])
    a, b, c = await store.reserve("orders", "email", 3, 30)
    assert await store.retry(c, attempt_of(c, Outcome.RETRY, 500), clock.now)
    (c,) = await store.reserve("orders", "email", 1, 30)
    done = Finish(a, attempt_of(a), Outcome.DONE)
    recorded = await store.finish(
        [
            done,
            Finish(b, attempt_of(b, Outcome.DEAD, 404), Outcome.DEAD),
            done,  # the same outcome twice in one batch: the lease is gone the second time
            Finish(c, attempt_of(c, Outcome.RETRY, 502), Outcome.RETRY, clock.now + 60),
        ]
    )
    assert recorded == [True, True, False, True]
    states = {job.id: (await store.get_job(job.id))[0] for job in (a, b, c)}
    assert [states[j.id].state for j in (a, b, c)] == [State.DONE, State.DEAD, State.DELAYED]
    assert [len(states[j.id].attempts) for j in (a, b, c)] == [1, 1, 2]
    assert [x.status for x in states[c.id].attempts] == [500, 502]
    stats = await store.stats("orders", "email")
    assert (stats.leased, stats.done, stats.dead, stats.delayed) == (0, 1, 1, 1)


async def test_batches_of_thousands_push_reserve_and_finish_whole(store: Store) -> None:
    # Past what one Lua unpack() or one SQL statement may carry: stores split such batches.
    count = 6000
    await store.push("orders", ROUTES, [NewJob(str(i).encode()) for i in range(count)])
    jobs = await store.reserve("orders", "email", count, 30)
    assert [j.payload for j in jobs] == [str(i).encode() for i in range(count)]
    finishes = [Finish(j, attempt_of(j), Outcome.DONE) for j in jobs]
    assert await store.finish(finishes) == [True] * count
    stats = await store.stats("orders", "email")
    assert (stats.ready, stats.leased, stats.done_total) == (0, 0, count)


async def test_maintenance_moves_a_batch_per_call_soonest_first(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite promoted every due job in one statement: 300k due at once held every push to
    # any queue up for 2.7 s behind it (hunt 31).  Each call now moves a batch, and says the
    # next is due already, so the scheduler calls again at once.
    monkeypatch.setattr(redis_store, "MAINTENANCE_BATCH", 3)
    monkeypatch.setattr(sqlite, "MAINTENANCE_BATCH", 3)
    start = clock.now
    await store.push(
        "orders", ROUTES, [NewJob(bytes([n]), run_at=start + 10 + n) for n in reversed(range(7))]
    )
    clock.advance(20)
    counts, batches = [], []
    while (due := await store.promote_due("orders", "email")).count:
        counts.append(due.count)
        assert due.next_at is None or due.next_at <= clock.now
        batches.append({j.payload[0] for j in await store.reserve("orders", "email", 10, 30)})
    assert counts == [3, 3, 1] and due.next_at is None
    assert batches == [{0, 1, 2}, {3, 4, 5}, {6}]  # the soonest due first
    clock.advance(31)
    counts = []
    while (expired := await store.recover_expired("orders", "email", 5)).count:
        counts.append(expired.count)
        assert expired.next_at is None or expired.next_at <= clock.now
    assert counts == [3, 3, 1] and expired.next_at is None
    assert (await store.stats("orders", "email")).ready == 7


async def test_expired_leases_come_back_then_die(store: Store, clock: FakeClock) -> None:
    await store.push("orders", ROUTES, [NewJob(b"x")])
    (job,) = await store.reserve("orders", "email", 1, lease=30)
    due = await store.recover_expired("orders", "email", max_attempts=2)
    assert (due.count, due.next_at) == (0, clock.now + 30)
    clock.advance(20)
    assert await store.extend(job, 30)  # now expires at +50
    clock.advance(20)
    assert (await store.recover_expired("orders", "email", 2)).count == 0
    clock.advance(11)
    due = await store.recover_expired("orders", "email", 2)
    assert (due.count, due.expired) == (1, (Expiry(job.id, 1, dead=False),))
    assert not await store.ack(job, attempt_of(job))  # the stale holder is refused
    (again,) = await store.reserve("orders", "email", 1, lease=30)
    assert again.attempt == 2
    clock.advance(31)
    due = await store.recover_expired("orders", "email", 2)
    assert (due.count, due.expired) == (1, (Expiry(job.id, 2, dead=True),))
    (record,) = await store.get_job(job.id)
    assert record.state is State.DEAD
    assert [a.outcome for a in record.attempts] == [Outcome.EXPIRED, Outcome.EXPIRED]
    stats = await store.stats("orders", "email")
    assert (stats.dead, stats.expired_total, stats.leased, stats.ready) == (1, 2, 0, 0)


async def test_a_stale_lease_never_stands_for_a_replayed_jobs_new_one(
    store: Store, clock: FakeClock
) -> None:
    """A holder that outlived its lease (frozen, partitioned) comes back after the job died
    and was replayed: the new delivery is attempt 1 again, as the stale one was.  Its late
    outcome, extension or release must not land on the new lease (hunt 27: a 400 from
    before the replay was recorded as the replayed attempt's)."""
    await store.push("orders", ROUTES, [NewJob(b"x")])
    (stale,) = await store.reserve("orders", "email", 1, lease=30)
    clock.advance(31)
    assert (await store.recover_expired("orders", "email", max_attempts=1)).count == 1
    assert await store.replay_dead("orders", "email", [stale.id]) == 1
    (fresh,) = await store.reserve("orders", "email", 1, lease=30)
    assert (fresh.id, fresh.attempt) == (stale.id, stale.attempt)
    assert not await store.extend(stale, 30)
    assert await store.release([stale]) == 0
    assert not await store.ack(stale, attempt_of(stale, Outcome.DEAD, 400))
    assert await store.ack(fresh, attempt_of(fresh))
    (record,) = await store.get_job(fresh.id)
    assert record.state is State.DONE
    assert [(a.outcome, a.status) for a in record.attempts] == [
        (Outcome.EXPIRED, None),
        (Outcome.DONE, 200),
    ]


async def test_a_stale_lease_never_stands_for_a_pushed_again_jobs_new_one(
    store: Store, clock: FakeClock
) -> None:
    """The same with an explicit id pushed again once its job was done: the stale holder's
    answer to the old payload must not finish the new job (it would never be delivered)."""
    await store.push("orders", ROUTES, [NewJob(b"old", id="order-7")])
    (stale,) = await store.reserve("orders", "email", 1, lease=30)
    clock.advance(31)
    assert (await store.recover_expired("orders", "email", max_attempts=3)).count == 1
    (second,) = await store.reserve("orders", "email", 1, lease=30)
    assert await store.ack(second, attempt_of(second))
    await store.push("orders", ROUTES, [NewJob(b"new", id="order-7")])
    (fresh,) = await store.reserve("orders", "email", 1, lease=30)
    assert (fresh.payload, fresh.attempt) == (b"new", stale.attempt)
    assert not await store.ack(stale, attempt_of(stale))
    (record,) = await store.get_job("order-7")
    assert (record.state, record.attempts) == (State.LEASED, ())


async def test_release_gives_jobs_back_without_an_attempt(store: Store) -> None:
    await store.push("orders", ROUTES, [NewJob(b"a"), NewJob(b"b")])
    jobs = await store.reserve("orders", "email", 2, 30)
    assert await store.release(jobs) == 2
    again = await store.reserve("orders", "email", 2, 30)
    assert [j.attempt for j in again] == [1, 1]
    assert sorted(j.payload for j in again) == [b"a", b"b"]


async def test_released_jobs_are_next_in_line_in_their_order(store: Store) -> None:
    # A shutdown, a pause or an open circuit gives back jobs reserved in order: they must
    # come out again in that order, ahead of the jobs behind them.
    await store.push("orders", ROUTES, [NewJob(b"%d" % n) for n in range(6)])
    assert await store.release(await store.reserve("orders", "email", 4, 30)) == 4
    again: list[Job] = []
    while len(again) < 6 and (more := await store.reserve("orders", "email", 6 - len(again), 30)):
        again += more
    assert [j.payload for j in again] == [b"%d" % n for n in range(6)]


async def test_priorities_share_three_two_one(store: Store) -> None:
    jobs = [NewJob(f"{p.name}{i}".encode(), priority=p) for p in Priority for i in range(60)]
    await store.push("orders", ROUTES, jobs)
    first = await store.reserve("orders", "email", 60, 30)
    counts = {p: sum(j.priority is p for j in first) for p in Priority}
    assert counts == {Priority.HIGH: 30, Priority.NORMAL: 20, Priority.LOW: 10}
    # One at a time, low still gets its share while high and normal are busy.
    singles = [(await store.reserve("orders", "email", 1, 30))[0].priority for _ in range(12)]
    assert singles.count(Priority.LOW) == 2
    # FIFO within a priority.
    assert [j.payload for j in first if j.priority is Priority.LOW][:3] == [
        b"LOW0",
        b"LOW1",
        b"LOW2",
    ]


async def test_push_wakes_a_waiting_dispatcher_at_once(store: Store) -> None:
    assert await store.reserve("orders", "email", 1, 30) == []
    woke_after = math.inf

    async def dispatcher() -> None:
        nonlocal woke_after
        start = trio.current_time()
        assert await store.wait_for_jobs("orders", "email", trio.current_time() + 5)
        woke_after = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher)
        await trio.sleep(0.05)
        await store.push("orders", ROUTES, [NewJob(b"x")])
    assert woke_after < 0.5
    # A ring with nobody waiting is remembered.
    await store.push("orders", ROUTES, [NewJob(b"y")])
    assert await store.wait_for_jobs("orders", "email", trio.current_time() + 5)


async def test_prune_keeps_history_bounded(store: Store, clock: FakeClock) -> None:
    await store.push("orders", ROUTES, [NewJob(str(i).encode()) for i in range(30)])
    for job in await store.reserve("orders", "email", 30, 30):
        if int(job.payload) % 3:
            await store.ack(job, attempt_of(job))
        else:
            await store.bury(job, attempt_of(job, Outcome.DEAD, 400))
    removed = await store.prune("orders", "email", Retention(5, 3600), Retention(100, 3600))
    assert removed == 20 - 5
    stats = await store.stats("orders", "email")
    assert (stats.done, stats.dead) == (5, 10)
    clock.advance(3601)
    await store.prune("orders", "email", Retention(5, 3600), Retention(100, 3600))
    stats = await store.stats("orders", "email")
    assert (stats.done, stats.dead, stats.done_total) == (0, 0, 20)


async def test_one_prune_removes_more_than_a_batch(store: Store, clock: FakeClock) -> None:
    # Redis removed at most 1,000 per state and rule per call, once a minute: a topic
    # finishing more than that a minute grew its history without bound.
    jobs = 3000
    await store.push("orders", ROUTES, [NewJob(b"x") for _ in range(jobs)])
    for job in await store.reserve("orders", "email", jobs, 30):
        await store.ack(job, attempt_of(job))
    removed = await store.prune("orders", "email", Retention(10, 3600), Retention(10, 3600))
    assert removed == jobs - 10
    assert (await store.stats("orders", "email")).done == 10
    clock.advance(3601)
    await store.push("orders", ROUTES, [NewJob(b"y") for _ in range(jobs)])
    for job in await store.reserve("orders", "email", jobs, 30):
        await store.bury(job, attempt_of(job, Outcome.DEAD, 400))
    clock.advance(3601)  # all past max_age: the rule by age, this time
    assert (
        await store.prune("orders", "email", Retention(10**6, 3600), Retention(10**6, 3600))
        == jobs + 10
    )


async def test_get_job_unknown_is_empty(store: Store) -> None:
    assert await store.get_job("nope") == []


@pytest.mark.parametrize("count", [1, 250])
async def test_concurrent_pushes_are_all_durable(store: Store, count: int) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(store.push, "orders", ROUTES, [NewJob(str(i).encode())])
    assert await store.depth("orders", ["email"]) == count


async def _kill(
    store: Store,
    payloads: list[bytes],
    status: int,
    clock: FakeClock,
    attributes: dict[str, str] | None = None,
) -> list[str]:
    await store.push("orders", ROUTES, [NewJob(p, attributes=attributes or {}) for p in payloads])
    jobs = await store.reserve("orders", "email", len(payloads), 30)
    for job in jobs:
        attempt = Attempt(
            job.attempt,
            clock.now,
            0.5,
            Outcome.DEAD,
            status=status,
            error=f"status {status} is in dead_on",
            body=b"nope",
        )
        assert await store.bury(job, attempt)
        clock.advance(1)
    return [job.id for job in jobs]


async def test_dead_jobs_are_listed_filtered_and_paged(store: Store, clock: FakeClock) -> None:

    first = clock.now
    gone = await _kill(store, [b"a", b"b", b"c"], 404, clock)
    bad = await _kill(store, [b"d", b"e"], 400, clock, {"tenant": "acme"})
    page = await store.list_dead("orders", "email", DeadFilter(), None, 10)
    assert [j.id for j in page.jobs] == list(reversed(gone + bad))  # newest first
    assert page.cursor is None
    assert page.jobs[0].payload == b"e" and page.jobs[0].status == 400
    assert page.jobs[0].attributes == {"tenant": "acme"}
    # Cursor paging walks every job exactly once.
    seen, cursor = [], None
    while True:
        page = await store.list_dead("orders", "email", DeadFilter(), cursor, 2)
        seen += [j.id for j in page.jobs]
        if page.cursor is None:
            break
        cursor = page.cursor
    assert seen == list(reversed(gone + bad))
    by_status = await store.list_dead("orders", "email", DeadFilter(status=404), None, 10)
    assert {j.id for j in by_status.jobs} == set(gone)
    by_text = await store.list_dead("orders", "email", DeadFilter(error="IN DEAD_ON"), None, 10)
    assert len(by_text.jobs) == 5
    by_attr = await store.list_dead(
        "orders", "email", DeadFilter(attribute=("tenant", "acme")), None, 10
    )
    assert {j.id for j in by_attr.jobs} == set(bad)
    window = await store.list_dead(
        "orders", "email", DeadFilter(since=first + 1, until=first + 3), None, 10
    )
    assert [j.id for j in window.jobs] == [gone[2], gone[1]]


async def test_paging_walks_dead_jobs_that_died_in_one_instant(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A page reads at most DEAD_SCAN_LIMIT dead jobs.  Redis once found the next page's start
    # by score and dropped the ties already seen from the scan: with more jobs dead in one
    # millisecond than that, a scan held only those ties and paging stopped (hunt 29).
    monkeypatch.setattr(redis_store, "DEAD_SCAN_LIMIT", 4)
    monkeypatch.setattr(sqlite, "DEAD_SCAN_LIMIT", 4)
    await store.push("orders", ROUTES, [NewJob(bytes([n])) for n in range(11)])
    jobs = await store.reserve("orders", "email", 11, 30)
    for job in jobs:
        assert await store.bury(job, Attempt(job.attempt, 1.0, 0.01, Outcome.DEAD, status=400))
    newest_first = sorted((job.id for job in jobs), reverse=True)
    seen: list[str] = []
    cursor = None
    for _ in range(20):
        page = await store.list_dead("orders", "email", DeadFilter(), cursor, 3)
        seen += [job.id for job in page.jobs]
        if page.cursor is None:
            break
        cursor = page.cursor
        if len(seen) == 6:
            # The job a cursor names may be gone by the next page (replayed here).
            assert await store.replay_dead("orders", "email", [seen[-1]]) == 1
    assert seen == newest_first
    # The same with a filter, past the replayed one.
    seen, cursor = [], None
    for _ in range(20):
        page = await store.list_dead("orders", "email", DeadFilter(status=400), cursor, 2)
        seen += [job.id for job in page.jobs]
        if page.cursor is None:
            break
        cursor = page.cursor
    assert seen == newest_first[:5] + newest_first[6:]


async def test_listing_dead_jobs_holds_the_payloads_of_the_page_only(store: Store) -> None:
    # A page scans up to DEAD_SCAN_LIMIT dead jobs, of up to max_payload each: reading every
    # scanned payload would hold gigabytes for one page of the dead-letter browser.
    big = 1024 * 1024
    for n in range(40):
        await store.push("orders", ROUTES, [NewJob(bytes([n]) * big)])
        (job,) = await store.reserve("orders", "email", 1, lease=30)
        await store.bury(job, Attempt(job.attempt, 1.0, 0.01, Outcome.DEAD, status=400))
    tracemalloc.start()
    try:
        # A filter matching nothing scans all 40: none of their payloads is needed.
        nothing = await store.list_dead("orders", "email", DeadFilter(status=500), None, 10)
        _, scanning = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        page = await store.list_dead("orders", "email", DeadFilter(), None, 2)
        _, paging = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        # An attribute is only in the record: those are read a few at a time.
        by_attribute = await store.list_dead(
            "orders", "email", DeadFilter(attribute=("tenant", "none")), None, 10
        )
        _, filtering = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert nothing.jobs == () and nothing.cursor is None and by_attribute.jobs == ()
    assert [len(job.payload) for job in page.jobs] == [big, big]
    assert scanning < 4 * big, f"a scan of 40 dead jobs held {scanning / big:.0f} MiB"
    assert paging < 8 * big, f"a page of 2 dead jobs held {paging / big:.0f} MiB"
    assert filtering < 16 * big, f"a filtered scan of 40 held {filtering / big:.0f} MiB"


async def test_replay_and_delete_dead_jobs(store: Store, clock: FakeClock) -> None:
    ids = await _kill(store, [b"a", b"b", b"c"], 404, clock)
    assert await store.replay_dead("orders", "email", [ids[0], ids[1], "unknown"]) == 2
    assert await store.replay_dead("orders", "email", [ids[0]]) == 0  # no longer dead
    again = await store.reserve("orders", "email", 5, 30)
    assert sorted(j.id for j in again) == sorted(ids[:2])
    assert all(j.attempt == 1 for j in again)  # a fresh set of attempts
    (record,) = await store.get_job(ids[0])
    assert [a.outcome for a in record.attempts] == [Outcome.DEAD]  # history kept
    assert await store.delete_dead("orders", "email", [ids[2], ids[0]]) == 1
    assert await store.get_job(ids[2]) == []
    stats = await store.stats("orders", "email")
    assert (stats.dead, stats.leased, stats.replayed_total) == (0, 2, 2)


async def test_bulk_replay_by_filter_at_a_rate_and_delete_all(
    store: Store, clock: FakeClock
) -> None:
    from adapters.storage.bulk import delete_where, replay_where

    gone = await _kill(store, [b"%d" % i for i in range(30)], 404, clock)
    bad = await _kill(store, [b"x%d" % i for i in range(5)], 400, clock)
    seen: list[tuple[int, int]] = []
    started = trio.current_time()
    replayed = await replay_where(
        store,
        "orders",
        "email",
        DeadFilter(status=404),
        rate=100.0,
        progress=lambda done, total: seen.append((done, total)),
    )
    elapsed = trio.current_time() - started
    assert replayed == 30
    assert seen[-1] == (30, 30) and len(seen) == 1  # 100/s: one chunk of 30
    assert elapsed >= 0.29  # paced: 30 jobs at 100 per second
    assert {j.id for j in await store.reserve("orders", "email", 100, 30)} == set(gone)
    assert await replay_where(store, "orders", "email", DeadFilter(status=500)) == 0
    assert await delete_where(store, "orders", "email", DeadFilter()) == len(bad)
    assert (await store.stats("orders", "email")).dead == 0
