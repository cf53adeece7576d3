"""A queue's slot moved to another master while it is busy (a live resharding).

Real redis-server cluster; the slot is moved by hand as ``redis-cli --cluster reshard`` moves
it (IMPORTING/MIGRATING, MIGRATE key by key, SETSLOT NODE) while a store pushes, reserves
and acks without a pause.  A script names one key and touches the queue's others: had it
followed the old node's ASK, it would run on the new node before the queue's data is there
(jobs lost, acks refused, and MIGRATE stopped by keys the new node already has).
"""

from __future__ import annotations

import time
from collections import Counter

import trio

from adapters.storage.base import Finish
from adapters.storage.fanout import Filter
from adapters.storage.jobs import Attempt, NewJob, Outcome
from adapters.storage.redis_client import RedisClient
from adapters.storage.redis_routing import Cluster, key_slot
from adapters.storage.redis_store import RedisStore, prefix_of
from tests.storage.test_cluster_subscription import cluster as cluster
from tests.storage.test_cluster_subscription import queue_on
from tests.support.redis import RedisCluster, RedisServer
from tests.support.stores import running_store

ROUTES = [("email", Filter())]


def move_slot(
    slot: int, source: RedisServer, target: RedisServer, others: list[RedisServer]
) -> None:
    """As redis-cli --cluster reshard does, one key per MIGRATE, a pause between keys."""
    source_id, target_id = (
        source.cli("CLUSTER", "MYID").strip(),
        target.cli("CLUSTER", "MYID").strip(),
    )
    target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    deadline = time.monotonic() + 20
    while keys := source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split():
        for key in keys:
            moved = source.cli(
                "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", key
            )
            # BUSYKEY: the target has the key already, written by a script sent there.
            assert moved.strip() in ("OK", "NOKEY"), (key, moved)
            time.sleep(0.1)
        assert time.monotonic() < deadline, keys
    for node in [target, source, *others]:
        node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)


async def test_a_busy_queue_moved_to_another_master_loses_and_repeats_nothing(
    cluster: RedisCluster,
) -> None:
    source, target, other = cluster.masters()
    queue = queue_on(source)
    pushed: list[bytes] = []
    reserved: Counter[bytes] = Counter()
    refused_acks: list[bytes] = []
    pushing = True
    produced = trio.Event()  # the producer's last push answered (it may outlast ``pushing``)

    async with running_store(RedisStore(Cluster(cluster.seeds, RedisClient))) as store:

        async def produce() -> None:
            count = 0
            while pushing:
                batch = [f"job{count + i}".encode() for i in range(3)]
                await store.push(queue, ROUTES, [NewJob(payload) for payload in batch])
                pushed.extend(batch)
                count += 3
                await trio.sleep(0.01)
            produced.set()

        async def consume() -> None:
            while not produced.is_set() or len(reserved) < len(pushed):
                jobs = await store.reserve(queue, "email", 5, 60)
                if not jobs:
                    await trio.sleep(0.01)
                    continue
                reserved.update(job.payload for job in jobs)
                now = time.time()
                finished = await store.finish(
                    [
                        Finish(
                            job,
                            Attempt(job.attempt, now, 0.001, Outcome.DONE, status=200),
                            Outcome.DONE,
                        )
                        for job in jobs
                    ]
                )
                refused_acks.extend(
                    job.payload for job, ok in zip(jobs, finished, strict=True) if not ok
                )

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                nursery.start_soon(consume)
                await trio.sleep(0.5)  # jobs in every state of the queue before it moves
                slot = key_slot(prefix_of(queue))
                await trio.to_thread.run_sync(move_slot, slot, source, target, [other])
                await trio.sleep(0.5)
                pushing = False
        stats = await store.stats(queue, "email")

    assert len(pushed) > 100
    assert sorted(reserved) == sorted(pushed)  # none lost
    assert [payload for payload, n in reserved.items() if n > 1] == []  # none twice
    assert refused_acks == []
    assert (stats.pushed_total, stats.done_total, stats.ready) == (len(pushed), len(pushed), 0)
    assert source.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot)).strip() == "0"
