"""Pushes confirmed by replicas: the store URL's ``?replicas=N&replica_timeout=…``.

Redis replicates asynchronously, so a push acknowledged just before its master dies may never
reach the replica that takes over.  With ``replicas=N`` the PUSH script is followed, in the
same pipeline and on the same connection, by ``WAIT N ms``; a push fewer replicas confirmed is
answered as uncertain (``StoreUncertain``: the producer hears it may have been stored), with
a rate-limited warning.  Without the option nothing is sent but the script.

Against real redis-servers: a standalone master with a ``--replicaof`` replica, and a Redis
Cluster with a replica per master; a replica is frozen with SIGSTOP, so its master still
counts it as connected but hears no acknowledgement from it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py
import trio

from adapters.storage.errors import StoreRefused, StoreUncertain
from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from adapters.storage.redis_routing import Cluster, key_slot
from adapters.storage.redis_store import RedisStore, prefix_of
from gateway.app import open_store
from gateway.config import MAX_REPLICAS, parse_store
from tests.gateway.test_config import assert_error, error_of
from tests.gateway.test_producer_http import call
from tests.gateway.test_startup_errors import check_config
from tests.storage.test_cluster_failover import replica_of
from tests.storage.test_cluster_failover import replicated as replicated
from tests.storage.test_cluster_subscription import queue_on
from tests.storage.test_redis_timeouts import frozen, store_at
from tests.support.daemon import running_daemon, write_config
from tests.support.redis import RedisCluster, RedisServer, start_replica

ROUTES = [("email", Filter())]
UNCONFIRMED = "push not confirmed by replicas"


@pytest.fixture
def replica(redis: RedisServer, tmp_path: Path) -> Iterator[RedisServer]:
    """A replica of the test's own redis-server, in sync."""
    server = start_replica(redis, tmp_path / "replica")
    try:
        yield server
    finally:
        server.stop()


def waits(server: RedisServer) -> int:
    """How many WAIT commands ``server`` has run."""
    for line in server.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_wait:"):
            return int(line.partition("calls=")[2].partition(",")[0])
    return 0


async def test_a_push_no_replica_confirmed_is_uncertain_and_kept(
    redis: RedisServer, replica: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{redis.port}/0?replicas=1&replica_timeout=300ms"
    async with store_at(url, tmp_path) as store:
        assert isinstance(store, RedisStore)
        await store.push("orders", ROUTES, [NewJob(b"confirmed")])  # the replica keeps up
        assert replica.cli("HLEN", "bg:{orders}:J:email").strip() == "1"  # WAIT waited for it
        sent = waits(redis)  # one WAIT per push, in the script's pipeline

        with frozen(replica), trio.fail_after(5):
            started = trio.current_time()
            # A WAIT on a connection of its own (no write of its own to wait for) would count
            # the frozen replica at once: this one waits for the script's write.
            with pytest.raises(StoreUncertain) as unconfirmed:
                await store.push("orders", ROUTES, [NewJob(b"on the master only")])
            assert 0.3 <= trio.current_time() - started < 1.5  # replica_timeout, not timeout
            assert str(unconfirmed.value) == (
                "queue orders: stored on the master, but only 0 of 1 replicas confirmed it"
                " within 0.3s (WAIT); a failover now could lose it"
            )
            assert (await store.stats("orders", "email")).ready == 2  # the master has it
            # While the replica is down every push is unconfirmed: one warning, not one each.
            for _ in range(3):
                with pytest.raises(StoreUncertain):
                    await store.push("orders", ROUTES, [NewJob(b"more")])
        assert waits(redis) == sent + 4
        warnings = [r for r in caplog.records if r.getMessage().startswith(UNCONFIRMED)]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert warnings[0].levelno == logging.WARNING
        assert "only 0 of 1 replicas confirmed it within 0.3s" in warnings[0].getMessage()

        # The replica back: pushes are confirmed again, and it has every job the master has.
        await store.push("orders", ROUTES, [NewJob(b"confirmed again")])
        assert replica.cli("HLEN", "bg:{orders}:J:email").strip() == "6"
        assert (await store.stats("orders", "email")).pushed_total == 6  # each one once


async def test_the_first_push_with_the_replica_down_waits_for_it_once(
    redis: RedisServer, replica: RedisServer, tmp_path: Path
) -> None:
    # The first push sends the script's source (EVAL), not its SHA to be told NOSCRIPT: a
    # WAIT behind that would hold the push for replica_timeout with nothing written.
    url = f"redis://127.0.0.1:{redis.port}/0?replicas=1&replica_timeout=400ms"
    async with store_at(url, tmp_path) as store:
        sent = waits(redis)
        with frozen(replica), trio.fail_after(5):
            started = trio.current_time()
            with pytest.raises(StoreUncertain):
                await store.push("orders", ROUTES, [NewJob(b"first")])
            assert 0.4 <= trio.current_time() - started < 0.75
        assert waits(redis) == sent + 1
        assert (await store.stats("orders", "email")).pushed_total == 1


async def test_pushes_waiting_for_a_frozen_replica_leave_connections_for_the_rest(
    redis: RedisServer, replica: RedisServer, tmp_path: Path
) -> None:
    # Each such push holds its connection for replica_timeout.  Forty queues pushing at
    # once held all 32 of the pool's: reserves, outcomes and reads queued behind them, and
    # deliveries on every topic fell to a few a second (hunt 31).
    url = f"redis://127.0.0.1:{redis.port}/0?replicas=1&replica_timeout=2s"
    async with store_at(url, tmp_path) as store:
        await store.push("held", ROUTES, [NewJob(b"ready")] * 5)
        for n in range(40):
            await store.push(f"q{n}", ROUTES, [NewJob(b"warm-up")])  # scripts cached

        async def push(queue: str) -> None:
            with pytest.raises(StoreUncertain):
                await store.push(queue, ROUTES, [NewJob(b"unconfirmed")])

        with frozen(replica):
            async with trio.open_nursery() as pushes:
                for n in range(40):
                    pushes.start_soon(push, f"q{n}")
                await trio.sleep(0.3)  # every push is under way, many waiting in WAIT
                with trio.fail_after(0.5):
                    assert len(await store.reserve("held", "email", 2, lease=30)) == 2
                    assert (await store.stats("held", "email")).ready == 3
        for n in range(40):  # each stored on the master all the same
            assert (await store.stats(f"q{n}", "email")).ready == 2


async def test_a_replicated_push_redis_never_answers_may_have_been_stored(
    redis: RedisServer, replica: RedisServer, tmp_path: Path
) -> None:
    # Such a push waits for its turn under a deadline of its own: that deadline, not the
    # call's, once caught the call's end, and a push Redis had read was answered "nothing
    # was acknowledged" (review).
    url = f"redis://127.0.0.1:{redis.port}/0?replicas=1&replica_timeout=200ms&timeout=500ms"
    async with store_at(url, tmp_path) as store:
        await store.push("orders", ROUTES, [NewJob(b"confirmed")])
        unanswered = pytest.raises(StoreUncertain, match=r"no answer within 0\.5s")
        with frozen(redis), trio.fail_after(5), unanswered:
            await store.push("orders", ROUTES, [NewJob(b"sent")])
        assert (await store.stats("orders", "email")).ready == 2  # it was


async def test_without_the_option_nothing_changes(
    redis: RedisServer, replica: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{redis.port}/0"
    async with store_at(url, tmp_path) as store:
        await store.push("orders", ROUTES, [NewJob(b"warm-up")])
        with frozen(replica), trio.fail_after(2):
            started = trio.current_time()
            await store.push("orders", ROUTES, [NewJob(b"acknowledged")])
            assert trio.current_time() - started < 0.25
    assert waits(redis) == 0  # no WAIT sent, ever
    assert not [r for r in caplog.records if r.getMessage().startswith(UNCONFIRMED)]


async def test_more_replicas_than_there_are_is_never_confirmed(
    redis: RedisServer, replica: RedisServer, tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{redis.port}/0?replicas=2&replica_timeout=100ms"
    async with store_at(url, tmp_path) as store:
        with pytest.raises(StoreUncertain, match=r"only 1 of 2 replicas confirmed it within 0\.1s"):
            await store.push("orders", ROUTES, [NewJob(b"x")])
        assert (await store.stats("orders", "email")).ready == 1


async def test_the_start_refuses_a_user_that_may_not_wait(
    redis: RedisServer, tmp_path: Path
) -> None:
    redis.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all", "-wait")
    url = f"redis://app:s3cret@127.0.0.1:{redis.port}/0?replicas=1"
    with pytest.raises(StoreRefused, match=r"WAIT, which Redis refused: NOPERM .*give the user"):
        await open_store(parse_store(url, str(tmp_path)))
    async with store_at(url.replace("?replicas=1", ""), tmp_path) as store:  # fine without
        await store.push("orders", ROUTES, [NewJob(b"x")])


async def test_the_start_warns_of_a_master_with_too_few_replicas(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{redis.port}/0?replicas=1"
    async with store_at(url, tmp_path):
        pass
    (warning,) = [r for r in caplog.records if "replicas connected" in r.getMessage()]
    assert warning.getMessage() == (
        "a Redis master has 0 replicas connected, and the store URL asks for replicas=1:"
        " until it has more, every push is answered as possibly stored"
    )
    caplog.clear()
    replica = start_replica(redis, tmp_path / "replica")
    try:
        async with store_at(url, tmp_path):
            pass
    finally:
        replica.stop()
    assert not [r for r in caplog.records if "replicas connected" in r.getMessage()]


async def test_a_cluster_push_waits_for_the_replica_of_its_own_master(
    replicated: RedisCluster, tmp_path: Path
) -> None:
    master, other = replicated.masters()[:2]
    queue, elsewhere = queue_on(master), queue_on(other)
    seeds = ",".join(f"127.0.0.1:{node.port}" for node in replicated.nodes)
    url = f"redis+cluster://{seeds}?replicas=1&replica_timeout=300ms"
    async with store_at(url, tmp_path) as store:
        assert isinstance(store, RedisStore) and isinstance(store.router, Cluster)
        await store.push(queue, ROUTES, [NewJob(b"confirmed")])
        with frozen(replica_of(replicated, master)), trio.fail_after(5):
            with pytest.raises(StoreUncertain, match="only 0 of 1 replicas confirmed it"):
                await store.push(queue, ROUTES, [NewJob(b"on the master only")])
            # Another master's replica is up: its pushes are confirmed.
            await store.push(elsewhere, ROUTES, [NewJob(b"confirmed elsewhere")])
        assert (await store.stats(queue, "email")).ready == 2

        # A stale slot map: the script (and its WAIT) go to the wrong master, which answers
        # MOVED without running it; both go again to the right one, the push once.
        router = store.router
        router._slots[key_slot(prefix_of(queue) + b"n")] = other.address
        result = await store.push(queue, ROUTES, [NewJob(b"after a MOVED")])
        assert len(result.ids) == 1
        stats = await store.stats(queue, "email")
        assert (stats.ready, stats.pushed_total) == (3, 3)
        assert replica_of(replicated, master).cli("DBSIZE").strip() == master.cli("DBSIZE").strip()


async def test_producers_hear_an_unconfirmed_push_may_have_been_stored(
    redis: RedisServer, replica: RedisServer, tmp_path: Path
) -> None:
    queue = """\
        queue: q
        topics:
          t: {backend: "fastcgi://127.0.0.1:9", script: /srv/x.php, paused: true}
        """
    store = f"redis://127.0.0.1:{redis.port}/0?replicas=1&replica_timeout=200ms"
    config = write_config(tmp_path, {"q": queue}, store=store)
    async with running_daemon(config) as app:
        client = redis_py.Redis(port=int(app.resp_address.rpartition(":")[2]))
        try:
            assert await trio.to_thread.run_sync(client.lpush, "q", b"confirmed") == 1
            with frozen(replica):
                with pytest.raises(redis_py.exceptions.TryAgainError) as refused:
                    await trio.to_thread.run_sync(client.lpush, "q", b"on the master only")
                status, body, _ = await trio.to_thread.run_sync(
                    call, app, "POST", "/v1/queues/q/jobs", json.dumps({"payload": 1}).encode()
                )
        finally:
            client.close()
    assert str(refused.value) == (
        "not acknowledged; it may have been stored: queue q: stored"
        " on the master, but only 0 of 1 replicas confirmed it within 0.2s (WAIT); a failover"
        " now could lose it"
    )
    assert status == 503
    assert "it may have been stored: queue q: stored on the master" in str(body), body
    assert redis.cli("HLEN", "bg:{q}:J:t").strip() == "3"


# -- the options in the configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "replicas", "timeout"),
    [
        ("redis://h:1/0", 0, 1.0),  # off by default
        ("redis://h:1/0?replicas=1", 1, 1.0),
        ("redis://h:1/0?replicas=2&replica_timeout=250ms", 2, 0.25),
        ("redis://h:1/0?replicas=1&timeout=500ms", 1, 0.25),  # half a short call timeout
        ("redis+cluster://a:1,b:2?replicas=1&replica_timeout=2s", 1, 2.0),
        (f"redis://h:1/0?replicas={MAX_REPLICAS}", MAX_REPLICAS, 1.0),
        ("redis://h:1/0?replicas=0&replica_timeout=20s", 0, 20.0),  # off: no bound to hold
    ],
)
def test_store_url_replica_options(url: str, replicas: int, timeout: float) -> None:
    store = parse_store(url, "/")
    assert (store.replicas, store.replica_timeout) == (replicas, timeout)


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("redis://h:1?replicas=-1", "option 'replicas': '-1' is not a number of replicas"),
        ("redis://h:1?replicas=1.5", "option 'replicas': '1.5' is not a number of replicas"),
        ("redis://h:1?replicas=one", "option 'replicas': 'one' is not a number of replicas"),
        ("redis://h:1?replicas=", "option 'replicas': '' is not a number of replicas"),
        ("redis://h:1?replicas", "option 'replicas' needs a value, as in replicas=1"),
        (
            f"redis://h:1?replicas={MAX_REPLICAS + 1}",
            f"option 'replicas': must be between 0 and {MAX_REPLICAS}, not {MAX_REPLICAS + 1}",
        ),
        ("redis://h:1?replicas=1" + "0" * 400, "option 'replicas': must be between 0 and"),
        ("redis://h:1?replicas=1&replicas=2", "option 'replicas' is given twice"),
        ("redis://h:1?replicas=1&replica_timeout=0", "option 'replica_timeout': must be longer"),
        ("redis://h:1?replicas=1&replica_timeout=-1s", "'-1s' is not a duration"),
        (
            "redis://h:1?replicas=1&replica_timeout=10s",
            "option 'replica_timeout': must be shorter than timeout (10s)",
        ),
        (
            "redis://h:1?replicas=1&replica_timeout=2s&timeout=1s",
            "option 'replica_timeout': must be shorter than timeout (1s)",
        ),
        (
            "redis://h:1?replica=1",
            "unknown option 'replica'; did you mean 'replicas'? (replicas is how many replicas"
            " must confirm a push",
        ),
    ],
)
def test_store_url_replica_option_errors(tmp_path: Path, url: str, text: str) -> None:
    error = error_of(tmp_path, main=f"listen: {{}}\nstore: '{url}'\n")
    assert_error(error, tmp_path / "busgate.yaml", 2, "store", text)


def test_check_config_shows_the_replica_options_and_refuses_bad_ones(tmp_path: Path) -> None:
    config = tmp_path / "busgate.yaml"
    listen = "listen: {resp: '127.0.0.1:0', http: '127.0.0.1:0'}\n"
    store = "redis://app:hunter2@127.0.0.1:6379/0?replicas=1&replica_timeout=500ms"
    config.write_text(f"{listen}store: '{store}'\n")
    done = check_config(config)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert (
        "store: redis://app:********@127.0.0.1:6379/0?replicas=1&replica_timeout=500ms\n"
        in done.stdout
    )

    config.write_text(f"{listen}\nstore: 'redis://127.0.0.1:6379/0?replicas=-1'\n")
    done = check_config(config)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"busgate: configuration error: {config}:3: store:"
        " 'redis://127.0.0.1:6379/0?replicas=-1': option 'replicas': '-1' is not a number of"
        f" replicas (0 to {MAX_REPLICAS})\n"
    )
