"""A Redis Cluster store follows a failover: once a master is gone and a replica has taken its
slots, the calls for those slots go to the replica, without a restart of the daemon.

Against real clusters of the tests' own.  The failover one has three masters with a replica
each, the cluster's node timeout of tests/support/redis.py (2 s) and
``cluster-replica-validity-factor 0`` (a replica takes over however long ago it last heard
from its master); its master is killed with SIGKILL, as a crashed redis-server.  A call that
could not reach its node (nothing sent) asks the cluster where the slot is now and goes
there, waiting within its deadline while the cluster has not promoted anyone yet (as do
calls that other masters refuse with CLUSTERDOWN meanwhile); a call that may have reached the
dead master is never sent again.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from adapters.storage.errors import StoreUnavailable, StoreUncertain
from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from adapters.storage.redis_client import RedisAddress, RedisClient
from adapters.storage.redis_routing import Cluster
from adapters.storage.redis_store import RedisStore

# The fixture `cluster`: three masters, no replicas, a master down leaves the others serving.
from tests.storage.test_cluster_subscription import cluster as cluster
from tests.storage.test_cluster_subscription import queue_on
from tests.storage.test_redis_subscription import opened
from tests.support.ports import unanswered_port
from tests.support.redis import RedisCluster, RedisServer
from tests.support.stores import running_store

ROUTES = [("email", Filter())]


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[RedisCluster]:
    """Three masters, a replica each, every replica ready to take over at once."""
    own = RedisCluster(tmp_path / "cluster", replicas=1)
    own.start()
    try:
        for node in own.nodes:
            node.cli("CONFIG", "SET", "cluster-replica-validity-factor", "0")
        yield own
    finally:
        own.stop()  # frozen nodes too


def replica_of(own: RedisCluster, master: RedisServer) -> RedisServer:
    return next(
        node
        for node in own.replicas_now()
        if f"master_port:{master.port}" in node.cli("INFO", "replication").split()
    )


async def test_a_failover_is_followed_without_a_restart(
    replicated: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    victim = replicated.masters()[0]
    replica = replica_of(replicated, victim)
    assert victim.process is not None
    queue = queue_on(victim)
    elsewhere = queue_on(replicated.masters()[1])
    (served,) = [
        line.split()[8:] for line in victim.cli("CLUSTER", "NODES").splitlines() if "myself" in line
    ]
    (victim_slots,) = served  # redis-cli gives each master one range
    before = [f"before{i}".encode() for i in range(20)]
    # Three daemons' stores, each with the slot map and connections of before the failover:
    # A pushes and reserves (scripts, pipelines), B reads stats (one pipeline per node), C
    # answers /readyz (a PING to every master).
    async with (
        opened(Cluster(replicated.seeds, RedisClient)) as a,
        opened(Cluster(replicated.seeds, RedisClient)) as b,
        opened(Cluster(replicated.seeds, RedisClient)) as c,
    ):
        await a.push(queue, ROUTES, [NewJob(payload) for payload in before])
        # Acknowledged and in the replica too: what a failover must not lose.
        assert victim.cli("WAIT", "1", "2000").strip() == "1"
        assert (await b.stats(queue, "email")).ready == 20
        await c.check()

        # A push the master may have read when it died is not sent anywhere else: it may
        # have been stored (here it was not: the master was frozen, then killed).
        victim.process.send_signal(signal.SIGSTOP)
        await trio.sleep(0.05)
        lost: list[StoreUnavailable] = []

        async def push_in_flight() -> None:
            try:
                await a.push(queue, ROUTES, [NewJob(b"in flight")])
            except StoreUnavailable as exc:
                lost.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(push_in_flight)
            await trio.sleep(0.3)
            victim.stop(hard=True)
            killed = trio.current_time()
        assert trio.current_time() - killed < 1  # at once, not after the failover
        (in_flight,) = lost
        assert isinstance(in_flight, StoreUncertain), in_flight
        assert "connection lost" in str(in_flight)

        # Pushed at once: the call waits (within its 10 s deadline) for the cluster to promote
        # the replica, then goes there.  Before, it failed after 10 s ("cannot connect"), and so
        # did every call for these slots afterwards, until a restart.
        # Meanwhile pushes to a queue of a master still up go on: while the cluster fails the
        # master over (from declaring it failed to promoting its replica), every master
        # answers CLUSTERDOWN, and those calls wait for it to end too.
        pushed_elsewhere = 0

        async def push_elsewhere() -> None:
            nonlocal pushed_elsewhere
            while True:
                await a.push(elsewhere, ROUTES, [NewJob(b"elsewhere")])
                pushed_elsewhere += 1
                await trio.sleep(0.05)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(push_elsewhere)
            with trio.fail_after(12):
                await a.push(queue, ROUTES, [NewJob(b"during")])
            during = trio.current_time() - started
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        assert replica.cli("ROLE").startswith("master")

        # Once the replica is master, a call costs one refused connect and one CLUSTER SLOTS.
        with trio.fail_after(1):
            await a.push(queue, ROUTES, [NewJob(b"after")])
        with trio.fail_after(1):
            assert (await b.stats(queue, "email")).ready == 22
        with trio.fail_after(1):
            await c.check()
        with trio.fail_after(2):
            jobs = await a.reserve(queue, "email", 50, 30)
    assert sorted(job.payload for job in jobs) == sorted([*before, b"during", b"after"])
    assert during < 10
    assert pushed_elsewhere >= 10  # it went on throughout, and no push failed

    # Logged once per daemon (each has its slot map), not once per call, with what made it
    # look: its call to the dead master, or a CLUSTERDOWN.
    refreshed = [r for r in caplog.records if r.getMessage().startswith("slot map refreshed")]
    assert len(refreshed) == 3, [r.getMessage() for r in refreshed]  # A, B, C
    moved = f"): slots {victim_slots} moved from {victim.address} to {replica.address}"
    for record in refreshed:
        message = record.getMessage()
        assert record.levelno == logging.WARNING
        assert message.endswith(moved), message
        assert (
            f": redis://{victim.address}: cannot connect: Connection refused{moved}" in message
            or f"CLUSTERDOWN The cluster is down{moved}" in message
        ), message


async def test_the_slot_map_is_read_past_a_seed_that_never_answers(
    redis_cluster: RedisCluster,
) -> None:
    # The first seed is a host that drops packets: one connect attempt, cut at the connect
    # timeout, then the next seed.  Before, the connect was retried until the call's deadline
    # (10 s) before the next seed was asked.
    with unanswered_port() as port:
        silent = RedisAddress("127.0.0.1", port)
        router = Cluster([silent, *redis_cluster.seeds], partial(RedisClient, connect_timeout=0.2))
        try:
            with trio.fail_after(5):
                started = trio.current_time()
                await router.refresh()
            assert trio.current_time() - started < 1
            with trio.fail_after(5):
                assert len(await router.execute_everywhere("PING")) == 3
        finally:
            await router.aclose()


async def test_a_node_that_stopped_answering_is_asked_last_for_the_slot_map(
    cluster: RedisCluster,
) -> None:
    # A master frozen (SIGSTOP: connections open, nothing answered) as a host that hangs.
    router = Cluster(cluster.seeds, partial(RedisClient, connect_timeout=0.2))
    try:
        await router.refresh()
        first_asked = next(n for n in cluster.nodes if n.address == router._slots[0])
        assert first_asked.process is not None
        first_asked.process.send_signal(signal.SIGSTOP)
        with trio.fail_after(5):
            started = trio.current_time()
            await router.refresh()  # asks it first: cut at the connect timeout, not 10 s
            assert 0.2 <= trio.current_time() - started < 1
            started = trio.current_time()
            await router.refresh()  # now it is asked last, after a node that answers
            assert trio.current_time() - started < 0.15
    finally:
        await router.aclose()


async def test_a_reply_redis_garbled_may_have_been_stored() -> None:
    # The commands went out, so Redis may have run them: StoreUncertain, which the cluster
    # router never sends again.  A server that logs in and then answers a bad RESP byte.
    async def garbling(stream: trio.SocketStream) -> None:
        await stream.receive_some()  # CLIENT SETNAME
        await stream.send_all(b"+OK\r\n")
        await stream.receive_some()
        await stream.send_all(b"?what\r\n")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), garbling, 0)
        port = listener.socket.getsockname()[1]
        client = RedisClient(RedisAddress("127.0.0.1", port), command_timeout=2)
        with trio.fail_after(3), pytest.raises(StoreUncertain, match="protocol error"):
            await client.pipeline([("PING",)])
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_seed_outside_the_cluster_is_not_taken_for_the_slot_map(tmp_path: Path) -> None:
    # `redis-cli --cluster del-node` resets the node it removes and leaves it running: it
    # answers CLUSTER SLOTS with [].  Listed first in the store URL, it was believed: no slot
    # had a node, every push failed, /readyz said ready (no master to check), for good.
    cluster = RedisCluster(tmp_path / "cluster")
    lone = RedisServer(tmp_path / "lone", cluster=True)
    cluster.start()
    lone.start()
    try:
        store = RedisStore(Cluster([lone.address, *cluster.seeds], RedisClient))
        async with running_store(store):
            await store.check()
            result = await store.push("orders", ROUTES, [NewJob(b"x")])
            assert len(result.ids) == 1
    finally:
        lone.stop()
        cluster.stop()
