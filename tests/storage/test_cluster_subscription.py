"""A Redis Cluster store's wake-up subscription is not tied to its first seed node.

A plain PUBLISH (what the store's scripts send) is broadcast over the cluster bus to every
node, so a subscription on any reachable node hears pushes made through any other.  When the
node under the subscription dies, goes silent or is down at the start, the subscription moves
to another node; waiting dispatchers are woken by the next push within a fraction of a second,
not at their recheck.  Against real 3-master clusters of the tests' own (nodes are killed and
frozen), in which a master keeps serving its slots while another is down
(``cluster-require-full-coverage no``: there are no replicas here to take over).
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from adapters.storage.redis_client import RedisClient
from adapters.storage.redis_routing import Cluster, key_slot
from adapters.storage.redis_store import RedisStore, prefix_of
from gateway.dispatcher import RECHECK
from tests.storage.test_redis_subscription import opened, subscribed, until
from tests.support.redis import RedisCluster, RedisServer

ROUTES = [("email", Filter())]
HEARTBEAT = 0.5
TIMEOUT = 0.5
#: A wake-up that takes longer than this came from the recheck, not from the subscription.
PROMPT = 1.5
assert PROMPT < RECHECK


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    own = RedisCluster(tmp_path / "cluster")
    own.start()
    try:
        for node in own.nodes:
            node.cli("CONFIG", "SET", "cluster-require-full-coverage", "no")
        yield own
    finally:
        own.stop()  # frozen nodes too


def host_a(cluster: RedisCluster) -> Cluster:
    """The listening host: every seed given, the first one first."""
    client = partial(RedisClient, command_timeout=TIMEOUT, connect_timeout=TIMEOUT)
    return Cluster(cluster.seeds, client, heartbeat=HEARTBEAT)


def host_b(cluster: RedisCluster) -> Cluster:
    """The pushing host: it never uses the first node, so it is not what breaks."""
    return Cluster(cluster.seeds[1:], RedisClient)


def queue_on(node: RedisServer) -> str:
    """A queue whose keys (all under the hash tag ``{queue}``) live on ``node``."""
    myself = next(line for line in node.cli("CLUSTER", "NODES").splitlines() if "myself" in line)
    ranges = [part.partition("-") for part in myself.split()[8:]]
    for i in itertools.count():
        queue = f"orders{i}"
        slot = key_slot(prefix_of(queue) + b"n")
        if any(int(start) <= slot <= int(end or start) for start, _, end in ranges):
            return queue
    raise AssertionError("unreachable")


def subscribers(node: RedisServer) -> int:
    """Connections subscribed on ``node`` (PUBSUB NUMPAT counts distinct patterns)."""
    return len(node.cli("CLIENT", "LIST", "TYPE", "pubsub").splitlines())


async def woken_within(
    listener: RedisStore, pusher: RedisStore, queue: str, seconds: float
) -> float | None:
    """Push through ``pusher`` every 0.1 s until ``listener``'s wait returns: how long that
    took, or None if it did not within ``seconds``."""
    async with trio.open_nursery() as nursery:

        async def push_until_heard() -> None:
            while True:
                await pusher.push(queue, ROUTES, [NewJob(b"after")])
                await trio.sleep(0.1)

        nursery.start_soon(push_until_heard)
        started = trio.current_time()
        heard = await listener.wait_for_jobs(queue, "email", started + seconds)
        nursery.cancel_scope.cancel()
    return trio.current_time() - started if heard else None


async def a_single_push_wakes(listener: RedisStore, pusher: RedisStore, queue: str) -> float:
    """One push, once earlier rings have been taken: the time its wake-up took.

    After a resubscription every doorbell rings anyway (pushes may have been missed), so this
    is what shows the new subscription itself hears pushes."""
    await trio.sleep(0.2)
    await listener.wait_for_jobs(queue, "email", trio.current_time())  # take any ring
    started = trio.current_time()
    await pusher.push(queue, ROUTES, [NewJob(b"one")])
    assert await listener.wait_for_jobs(queue, "email", started + RECHECK - 1)
    return trio.current_time() - started


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_the_subscription_moves_off_a_seed_node_that_dies(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    first, second, third = cluster.nodes
    queue = queue_on(third)  # pushed on the third node, heard on whichever A listens on
    async with opened(host_a(cluster)) as a, opened(host_b(cluster)) as b:
        await b.push(queue, ROUTES, [NewJob(b"before")])
        with trio.fail_after(2):
            assert await a.wait_for_jobs(queue, "email")
        assert subscribers(first) == 1  # A's; B's is on the second node

        first.stop(hard=True)
        waited = await woken_within(a, b, queue, RECHECK - 1)
        assert waited is not None, "no push woke host A: its subscription stayed on a dead node"
        assert waited < PROMPT
        await until(lambda: subscribers(second) + subscribers(third) == 2, 2)
        assert await a_single_push_wakes(a, b, queue) < PROMPT

    moved = logged(caplog, "wake-up subscription moved")
    assert moved == [f"wake-up subscription moved from {first.address} to {second.address}"]


async def test_the_subscription_moves_off_a_seed_node_that_goes_silent(
    cluster: RedisCluster,
) -> None:
    # Frozen (SIGSTOP): connections stay open and nothing answers; only the heartbeat sees it.
    first, _, third = cluster.nodes
    assert first.process is not None
    queue = queue_on(third)
    async with opened(host_a(cluster)) as a, opened(host_b(cluster)) as b:
        await b.push(queue, ROUTES, [NewJob(b"before")])
        with trio.fail_after(2):
            assert await a.wait_for_jobs(queue, "email")

        first.process.send_signal(signal.SIGSTOP)
        waited = await woken_within(a, b, queue, RECHECK - 1)
        assert waited is not None, "no push woke host A: its subscription stayed on a frozen node"
        # One heartbeat of silence, then the PING's timeout, then the next node.
        assert waited < HEARTBEAT + TIMEOUT + PROMPT
        assert await a_single_push_wakes(a, b, queue) < PROMPT


async def test_a_seed_node_down_at_the_start_is_skipped(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    first, second, third = cluster.nodes
    first.stop(hard=True)
    queue = queue_on(third)
    with trio.fail_after(3):  # the store starts (it failed: "cannot connect" to the first)
        async with opened(host_a(cluster)) as a, opened(host_b(cluster)) as b:
            assert await a_single_push_wakes(a, b, queue) < PROMPT
    (skipped,) = logged(caplog, "wake-up subscription on")
    assert skipped.startswith(f"wake-up subscription on {second.address} (could not use ")
    assert f"redis://{first.address}: cannot connect" in skipped


async def test_with_every_node_down_it_backs_off_and_comes_back(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    second = cluster.nodes[1]
    async with subscribed(host_a(cluster)) as subscriber:
        # Usually the first seed; another if the first was still coming back from an
        # earlier test's stop (the cluster is shared), as it once was in CI.
        (on,) = [node for node in cluster.nodes if subscribers(node) == 1]
        # All at once for the listener: stop() blocks the event loop until each is gone.
        for node in cluster.nodes:
            node.stop(hard=True)
        caplog.clear()
        await trio.sleep(3)
        # A round tries each node once, then waits (0.05 s doubling to 2 s): a busy loop
        # would try thousands of times.
        rounds = len(logged(caplog, "wake-up subscription: retrying in"))
        assert 3 <= rounds <= 8, f"{rounds} rounds over the three nodes in 3 s"
        assert subscriber.subscriptions == 1

        second.start()  # back alone: no cluster majority, but PUBLISH works on any node
        await until(lambda: subscriber.subscriptions == 2, 3)
        assert subscribers(second) == 1
        second.cli("PUBLISH", "bg:{orders}:wake", "email")
        await until(lambda: subscriber.messages == [(b"bg:{orders}:wake", b"email")], 1)
    # Said once, not once a round.
    if on is second:
        assert logged(caplog, "wake-up subscription back on") == [
            f"wake-up subscription back on {second.address}"
        ]
    else:
        (moved,) = logged(caplog, "wake-up subscription moved")
        assert moved.startswith(f"wake-up subscription moved from {on.address} to {second.address}")
