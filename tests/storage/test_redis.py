"""Redis-only behaviour against real servers: cluster redirections, wake-ups across hosts,
authentication, and Redis going away and coming back."""

from __future__ import annotations

import math
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio

from adapters.storage.errors import (
    StoreUnavailable,
    StoreUncertain,
    StoreUnsupported,
    store_error_text,
)
from adapters.storage.fanout import Filter
from adapters.storage.jobs import DeadFilter, NewJob, Priority, State
from adapters.storage.redis_client import RedisAddress, RedisClient, ServerError
from adapters.storage.redis_routing import SLOTS, Cluster, Router, Standalone, key_slot
from adapters.storage.redis_store import RedisStore, check_redis_version, prefix_of
from gateway.app import open_store
from gateway.config import parse_store
from tests.support.ports import free_port
from tests.support.redis import RedisCluster, RedisServer
from tests.support.stores import running_store

ROUTES = [("email", Filter())]


def opened(router: Router) -> AbstractAsyncContextManager[RedisStore]:
    return running_store(RedisStore(router))


@asynccontextmanager
async def two_hosts(server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """The stores of two daemons sharing one emptied redis-server."""
    server.cli("FLUSHALL")
    async with (
        opened(Standalone(RedisClient(server.address))) as host_a,
        opened(Standalone(RedisClient(server.address))) as host_b,
    ):
        yield host_a, host_b


def test_key_slot_matches_redis(redis_cluster: RedisCluster) -> None:
    node = redis_cluster.nodes[0]
    for key in (b"orders", b"bg:{orders}:n", b"{user1000}.following", b"foo{}{bar}", b"a{b"):
        assert key_slot(key) == int(node.cli("CLUSTER", "KEYSLOT", key.decode()))
    assert key_slot(b"bg:{orders}:n") == key_slot(b"bg:{orders}:j:email:x")


async def test_queues_spread_over_the_cluster(redis_cluster: RedisCluster) -> None:
    redis_cluster.flush()
    async with opened(Cluster(redis_cluster.seeds, RedisClient)) as store:
        for i in range(30):
            await store.push(f"queue{i}", ROUTES, [NewJob(b"x")])
        for i in range(30):
            (job,) = await store.reserve(f"queue{i}", "email", 1, 30)
            assert job.payload == b"x"
    sizes = [int(node.cli("DBSIZE")) for node in redis_cluster.nodes]
    assert all(size > 0 for size in sizes), sizes


async def test_moved_refreshes_a_stale_slot_map(redis_cluster: RedisCluster) -> None:
    redis_cluster.flush()
    cluster = Cluster(redis_cluster.seeds, RedisClient)
    async with opened(cluster) as store:
        await cluster.refresh()
        # Pretend every slot lives on the first node: most queues get MOVED.
        wrong = redis_cluster.seeds[0]
        cluster._slots = [wrong] * SLOTS
        for i in range(10):
            result = await store.push(f"moved{i}", ROUTES, [NewJob(b"m")])
            assert result.copies == 1
        assert len({cluster._slots[key_slot(prefix_of(f"moved{i}") + b"n")] for i in range(10)}) > 1


async def test_ask_during_slot_migration(redis_cluster: RedisCluster) -> None:
    redis_cluster.flush()
    queue = "migrating"
    slot = key_slot(prefix_of(queue) + b"n")
    ids = {n.port: n.cli("CLUSTER", "MYID").strip() for n in redis_cluster.nodes}
    owner = _owner(redis_cluster, slot)
    target = next(n for n in redis_cluster.nodes if n is not owner)
    target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[owner.port])
    owner.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target.port])
    try:
        async with opened(Cluster(redis_cluster.seeds, RedisClient)) as store:
            # The owner answers ASK while the slot migrates.  A script touches keys it does
            # not name, some of which may not have moved: it is not sent to the importing
            # node, but waits for the move to end (test_cluster_reshard.py: a busy queue).
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.push, queue, ROUTES, [NewJob(b"asked")])
                await trio.sleep(0.5)
                for node in (owner, target):  # run nowhere meanwhile
                    assert int(node.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot))) == 0
                for node in redis_cluster.nodes:
                    node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", ids[target.port])
            assert int(target.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot))) > 0  # MOVED there
            (job,) = await store.reserve(queue, "email", 1, 30)
            assert job.payload == b"asked"
    finally:
        for node in redis_cluster.nodes:
            node.cli("CLUSTER", "SETSLOT", str(slot), "STABLE")


async def test_readiness_waits_for_every_cluster_node_refusing_writes(
    redis_cluster: RedisCluster,
) -> None:
    # Readiness kept only the last refused queue: once its node took writes again, the
    # store said ready while the other masters still refused every push.
    redis_cluster.flush()
    queues = [f"refused{i}" for i in range(12)]
    async with opened(Cluster(redis_cluster.seeds, RedisClient)) as store:
        await store.check()
        try:
            for node in redis_cluster.nodes:
                node.cli("CONFIG", "SET", "min-replicas-to-write", "1")
            for queue in queues:
                with pytest.raises(StoreUnavailable, match="NOREPLICAS"):
                    await store.push(queue, ROUTES, [NewJob(b"x")])
            last = _owner(redis_cluster, key_slot(prefix_of(queues[-1]) + b"n"))
            last.cli("CONFIG", "SET", "min-replicas-to-write", "0")
            with pytest.raises(StoreUnavailable, match="NOREPLICAS"):
                await store.check()
        finally:
            for node in redis_cluster.nodes:
                node.cli("CONFIG", "SET", "min-replicas-to-write", "0")
        await store.check()
        for queue in queues:
            assert (await store.push(queue, ROUTES, [NewJob(b"x")])).copies == 1


def _owner(cluster: RedisCluster, slot: int) -> RedisServer:
    """The master serving ``slot``."""
    return next(
        node
        for node in cluster.nodes
        if any(
            "myself" in line and _serves(line, slot)
            for line in node.cli("CLUSTER", "NODES").splitlines()
        )
    )


def _serves(line: str, slot: int) -> bool:
    """Whether a CLUSTER NODES line lists ``slot`` among its ranges."""
    for part in line.split()[8:]:
        if part.startswith("["):
            continue
        start, _, end = part.partition("-")
        if int(start) <= slot <= int(end or start):
            return True
    return False


async def test_push_on_one_host_wakes_a_dispatcher_on_another(
    redis_server: RedisServer,
) -> None:
    async with two_hosts(redis_server) as (host_a, host_b):
        woke_after = math.inf

        async def dispatcher_on_b() -> None:
            nonlocal woke_after
            start = trio.current_time()
            assert await host_b.wait_for_jobs("orders", "email", start + 5)
            woke_after = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dispatcher_on_b)
            await trio.sleep(0.1)
            await host_a.push("orders", ROUTES, [NewJob(b"from a")])
        (job,) = await host_b.reserve("orders", "email", 1, 30)
    assert job.payload == b"from a"
    assert woke_after < 0.6  # pushed after 0.1 s; a wake-up, not a poll


async def test_reserve_takes_other_priorities_when_its_plan_runs_short(
    redis_server: RedisServer,
) -> None:
    # A plans from the ready counts its last reserve saw; B drains that priority meanwhile.
    async with two_hosts(redis_server) as (host_a, host_b):
        high = [NewJob(f"high{i}".encode(), priority=Priority.HIGH) for i in range(5)]
        await host_a.push("orders", ROUTES, high)
        assert len(await host_a.reserve("orders", "email", 1, 30)) == 1  # A saw 4 high left
        assert len(await host_b.reserve("orders", "email", 4, 30)) == 4
        low = [NewJob(f"low{i}".encode(), priority=Priority.LOW) for i in range(3)]
        await host_b.push("orders", ROUTES, low)
        jobs = await host_a.reserve("orders", "email", 4, 30)  # planned: four high
        assert [j.payload for j in jobs] == [b"low0", b"low1", b"low2"]
        assert all(j.attempt == 1 for j in jobs)
        assert (await host_a.stats("orders", "email")).leased == 8


async def test_an_explicit_id_is_found_in_a_topic_removed_before_the_topics_set(
    redis_server: RedisServer,
) -> None:
    # A busgate from before bg:{Q}:topics pushed order-9 to sms, and a reload then removed
    # sms: only the global registry names it (review).  The set is filled from it once.
    async with two_hosts(redis_server) as (old, new):
        await old.push("orders", [("sms", Filter())], [NewJob(b"a", id="order-9")])
        redis_server.cli("DEL", "bg:{orders}:topics")  # what the older version left
        again = await new.push("orders", ROUTES, [NewJob(b"b", id="order-9")])
        assert (again.copies, again.duplicates) == (0, 1)
        members = redis_server.cli("SMEMBERS", "bg:{orders}:topics").split()
        assert sorted(members) == ["email", "sms"]


async def test_redis_down_at_push_is_an_error_and_nothing_is_acknowledged() -> None:
    client = RedisClient(RedisAddress("127.0.0.1", free_port()), command_timeout=0.5)
    store = RedisStore(Standalone(client))
    with pytest.raises(StoreUnavailable, match=r"cannot connect: Connection refused"):
        await store.push("orders", ROUTES, [NewJob(b"lost?")])
    await store.aclose()


async def test_a_push_redis_read_but_did_not_answer_in_time_may_be_stored(tmp_path: Path) -> None:
    # Redis frozen past the command timeout: the push script was sent, and Redis runs it when
    # it wakes.  The producer must not be told that nothing was stored.
    server = RedisServer(tmp_path)
    server.start()
    assert server.process is not None
    try:
        store = RedisStore(Standalone(RedisClient(server.address, command_timeout=0.5)))
        await store.push("orders", ROUTES, [NewJob(b"warm-up")])  # connected, scripts loaded
        server.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(StoreUncertain, match=r"no answer within 0\.5s") as caught:
                await store.push("orders", ROUTES, [NewJob(b"late")])
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert "it may have been stored" in store_error_text(caught.value)
        with trio.fail_after(5):
            while await store.depth("orders", ["email"]) < 2:
                await trio.sleep(0.05)  # it was: Redis ran the script once it woke
        await store.aclose()
    finally:
        server.stop()


@asynccontextmanager
async def freezable(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, RedisStore]]:
    """A redis-server of the test's own, to freeze (SIGSTOP), and a store whose calls give
    up after 0.5 s."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server, RedisStore(Standalone(RedisClient(server.address, command_timeout=0.5)))
    finally:
        server.stop()


async def lose_a_reserve(
    server: RedisServer, store: RedisStore, queue: str, limit: int, *, thaw: bool = True
) -> None:
    """A reserve sent as Redis freezes past the store's timeout: no answer, and Redis runs it
    when it wakes (``thaw``: at once), leasing jobs under a token nobody holds."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(StoreUncertain, match=r"no answer within 0\.5s"):
            await store.reserve(queue, "email", limit, 30)
    finally:
        if thaw:
            server.process.send_signal(signal.SIGCONT)


async def leased_become(server: RedisServer, queue: str, count: int) -> None:
    with trio.fail_after(5):
        while server.cli("ZCARD", f"bg:{{{queue}}}:l:email").strip() != str(count):
            await trio.sleep(0.05)


async def test_the_jobs_of_a_reserve_whose_answer_was_lost_go_back_unspent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # They stayed leased until the lease ran out, then came back with an attempt spent: dead
    # at max_attempts: 1, never delivered.
    async with freezable(tmp_path) as (server, store):
        await store.push("orders", ROUTES, [NewJob(p) for p in (b"a", b"b", b"c", b"d")])
        (held,) = await store.reserve("orders", "email", 1, 30)  # ready counts now known
        await lose_a_reserve(server, store, "orders", 2)
        await leased_become(server, "orders", 3)  # Redis ran it once it woke
        jobs = await store.reserve("orders", "email", 3, 30)
        # Back at the front of the line (in id order: the lost answer had their order).
        assert sorted((job.payload, job.attempt) for job in jobs) == [
            (b"b", 1),
            (b"c", 1),
            (b"d", 1),
        ]
        assert jobs[-1].payload == b"d"
        assert "the answer to a reserve was lost; the 2 jobs it leased are back" in caplog.text
        # The lease a dispatcher holds is left alone.
        assert server.cli("ZCARD", "bg:{orders}:l:email").strip() == "4"
        assert await store.extend(held, 30)
        await store.aclose()


async def test_a_stop_gives_back_the_jobs_of_a_reserve_whose_answer_was_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The stop came before the topic's next reserve, which would have given them back.
    async with freezable(tmp_path) as (server, store):
        await store.push("orders", ROUTES, [NewJob(p) for p in (b"a", b"b", b"c")])
        await store.reserve("orders", "email", 1, 30)  # ready counts now known
        await lose_a_reserve(server, store, "orders", 2)
        await leased_become(server, "orders", 3)
        await store.aclose()
        assert server.cli("ZCARD", "bg:{orders}:l:email").strip() == "1"
        assert "the answer to a reserve was lost; the 2 jobs it leased are back" in caplog.text
        async with opened(Standalone(RedisClient(server.address))) as again:
            jobs = await again.reserve("orders", "email", 2, 30)
        assert sorted((job.payload, job.attempt) for job in jobs) == [(b"b", 1), (b"c", 1)]


async def test_a_stop_with_redis_away_leaves_the_jobs_of_a_lost_reserve_to_their_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with freezable(tmp_path) as (server, store):
        assert server.process is not None
        for queue in ("orders", "audit"):
            await store.push(queue, ROUTES, [NewJob(b"a"), NewJob(b"b")])
            await store.reserve(queue, "email", 1, 30)  # ready counts now known
        try:
            await lose_a_reserve(server, store, "orders", 1)
            await store.depth("audit", ["email"])  # connected again
            await lose_a_reserve(server, store, "audit", 1, thaw=False)
            with trio.fail_after(5):
                await store.aclose()
        finally:
            server.process.send_signal(signal.SIGCONT)
    # Once: the second topic does not wait its own timeout to learn the same.
    warning = "the jobs of 2 reserves whose answer was lost could not be given back"
    assert caplog.text.count(warning) == 1


async def test_a_job_record_busgate_did_not_write_is_dead_lettered_not_delivered(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Written outside busgate (or damaged): unpacking it raised out of reserve, which stopped
    # the daemon, and every restart reserved it again.
    async with two_hosts(redis_server) as (store, _):
        await store.push("orders", ROUTES, [NewJob(p, id=p.decode()) for p in (b"a", b"b", b"c")])
        redis_server.cli("HSET", "bg:{orders}:J:email", "b", "garbage")
        jobs = await store.reserve("orders", "email", 3, 30)
        assert [job.payload for job in jobs] == [b"a", b"c"]
        assert "queue orders topic email job b: its record in Redis is malformed" in caplog.text
        page = await store.list_dead("orders", "email", DeadFilter(), None, 10)
        (dead,) = page.jobs
        assert (dead.id, dead.payload) == ("b", b"garbage")
        assert dead.error is not None and "malformed" in dead.error
        (record,) = await store.get_job("b")
        assert (record.state, record.payload, record.attempt) == (State.DEAD, b"garbage", 1)
        assert await store.reserve("orders", "email", 3, 30) == []


async def test_error_replies_are_server_errors_at_any_depth(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = RedisClient(server.address)
    try:
        script = "return {1, redis.error_reply('BOOM inside'), {redis.error_reply('DEEP x')}}"
        replies = await client.pipeline([("EVAL", script, 0), ("NOSUCHCOMMAND",), ("PING",)])
        nested, unknown, pong = replies
        assert nested[0] == 1
        assert isinstance(nested[1], ServerError) and nested[1].code == "BOOM"
        assert isinstance(nested[2][0], ServerError) and str(nested[2][0]) == "DEEP x"
        assert isinstance(unknown, ServerError) and unknown.code == "ERR"
        assert pong == b"PONG"  # an error reply does not upset the replies after it
        with pytest.raises(ServerError, match="unknown command"):
            await client.execute("NOSUCHCOMMAND")
    finally:
        await client.aclose()
        server.stop()


async def test_authentication(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="hunter2")
    server.start()
    try:
        good = RedisStore(Standalone(RedisClient(server.address, password="hunter2")))
        assert (await good.push("orders", ROUTES, [NewJob(b"x")])).copies == 1
        await good.aclose()
        server.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all")
        user = RedisStore(
            Standalone(RedisClient(server.address, username="app", password="s3cret"))
        )
        assert await user.depth("orders", ["email"]) == 1
        await user.aclose()
        bad = RedisClient(server.address, password="wrong", command_timeout=0.5)
        with pytest.raises(StoreUnavailable, match="AUTH failed: WRONGPASS"):
            await bad.execute("PING")
        await bad.aclose()
    finally:
        server.stop()


async def test_redis_restart_with_aof_loses_no_acknowledged_job(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    try:
        client = RedisClient(server.address, command_timeout=10)
        async with opened(Standalone(client)) as store:
            pushed: set[str] = set()
            for i in range(50):
                pushed.update((await store.push("orders", ROUTES, [NewJob(b"%d" % i)])).ids)
            await trio.to_thread.run_sync(lambda: server.stop(hard=True))

            async def come_back() -> None:
                await trio.sleep(0.5)
                await trio.to_thread.run_sync(server.start)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(come_back)
                # Issued while Redis is down: the client reconnects with backoff by itself.
                for i in range(50, 100):
                    pushed.update((await store.push("orders", ROUTES, [NewJob(b"%d" % i)])).ids)
            reserved = await store.reserve("orders", "email", 200, 30)
        assert {job.id for job in reserved} == pushed
        assert len(pushed) == 100
    finally:
        server.stop()


@pytest.mark.parametrize("version", ["6.2.0", "7.0.15", "10.0.1"])
def test_a_recent_redis_is_accepted(version: str) -> None:
    check_redis_version(f"# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n")


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ("redis_version:6.0.16\r\n", "Redis 6.0.16 is too old: busgate needs Redis 6.2 or later"),
        ("redis_version:5.0.7\r\n", "Redis 5.0.7 is too old"),
        ("# Server\r\nredis_mode:standalone\r\n", "did not report a redis_version"),
    ],
)
def test_an_old_or_unknown_redis_is_refused(info: str, message: str) -> None:
    with pytest.raises(StoreUnsupported, match=message):
        check_redis_version(info)


async def test_the_real_server_passes_the_version_check(redis_server: RedisServer) -> None:
    check_redis_version(redis_server.cli("INFO", "server"))


async def test_the_daemon_opens_a_cluster_store_after_the_version_check(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    nodes = ",".join(f"127.0.0.1:{node.port}" for node in redis_cluster.nodes)
    store = await open_store(parse_store(f"redis+cluster://{nodes}", str(tmp_path)))
    try:
        await store.push("orders", ROUTES, [NewJob(b"x")])
    finally:
        await store.aclose()


async def test_jobs_pushed_after_redis_forgot_everything_are_found_by_id(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As after a restart without persistence: the registry of topics is gone too.
    monkeypatch.setattr("adapters.storage.redis_store.REGISTRY_REFRESH", 0.05)
    redis_server.cli("FLUSHALL")
    async with opened(Standalone(RedisClient(redis_server.address))) as store:
        await store.push("orders", ROUTES, [NewJob(b"before", id="before")])
        redis_server.cli("FLUSHALL")
        await trio.sleep(0.1)
        await store.push("orders", ROUTES, [NewJob(b"after", id="after")])
        (record,) = await store.get_job("after")
    assert (record.topic, record.payload) == ("email", b"after")


async def test_after_redis_forgot_everything_jobs_are_found_by_id_at_once(
    redis_server: RedisServer,
) -> None:
    # The registry is said again only every REGISTRY_REFRESH (a minute): until then both
    # the daemon that pushed a job and one delivering its topic answered "no such job".
    async with two_hosts(redis_server) as (pusher, deliverer):
        await pusher.push("orders", ROUTES, [NewJob(b"before", id="before")])
        await deliverer.reserve("orders", "email", 1, 30)
        redis_server.cli("FLUSHALL")  # as a restart without persistence
        await pusher.push("orders", ROUTES, [NewJob(b"after", id="after")])
        for store in (pusher, deliverer):
            (record,) = await store.get_job("after")
            assert (record.topic, record.payload) == ("email", b"after")
