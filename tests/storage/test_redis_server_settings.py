"""Redis settings that would lose or refuse jobs behind busgate's back are caught at start: a
replica, a user that may not run what busgate needs, an evicting ``maxmemory-policy``; and
ready jobs Redis lost anyway are logged, not dropped in silence.

The store's ``check_server`` is tested here directly; the daemon calls it from
``gateway.app.open_store`` (for a start, not for ``busgate curl``, which only reads)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest
import trio

from adapters.storage.base import Finish, Retention
from adapters.storage.errors import StoreRefused
from adapters.storage.fanout import Filter
from adapters.storage.jobs import Attempt, DeadFilter, NewJob, Outcome
from adapters.storage.redis_client import RedisClient
from adapters.storage.redis_routing import Standalone
from adapters.storage.redis_store import ACL_RULES, RedisStore
from tests.gateway.test_startup_errors import refused, run
from tests.storage.test_redis_timeouts import store_at
from tests.support.redis import RedisServer, start_replica
from tests.support.stores import running_store

pytestmark = pytest.mark.trio

ROOT = Path(__file__).resolve().parents[2]
ROUTES = [("email", Filter())]
EVICTS = "once full, it deletes busgate's jobs"


def store_on(server: RedisServer, user: str | None = None) -> RedisStore:
    password = None if user is None else "s3cret"
    client = RedisClient(server.address, username=user, password=password)
    return RedisStore(Standalone(client))


async def refusal(store: RedisStore) -> StoreRefused:
    """Why the start-up check refuses ``store``."""
    try:
        with pytest.raises(StoreRefused) as refused:
            await store.check_server()
    finally:
        await store.aclose()
    return refused.value


async def check(store: RedisStore) -> None:
    try:
        await store.check_server()
    finally:
        await store.aclose()


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


# -- maxmemory-policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "warned"),
    [
        ("allkeys-lru", True),
        ("allkeys-random", True),
        ("volatile-lru", False),
        ("noeviction", False),
    ],
)
async def test_a_policy_that_evicts_jobs_is_warned_of_at_start(
    redis: RedisServer, caplog: pytest.LogCaptureFixture, policy: str, warned: bool
) -> None:
    # volatile-* evicts keys with a TTL only, and busgate sets none on its data.
    redis.cli("CONFIG", "SET", "maxmemory", "64mb")
    redis.cli("CONFIG", "SET", "maxmemory-policy", policy)
    await check(store_on(redis))
    found = warnings(caplog, EVICTS)
    if warned:
        (line,) = found
        assert f"maxmemory-policy {policy} (maxmemory 64.00M)" in line
        assert "set maxmemory-policy noeviction" in line
    else:
        assert found == []


async def test_without_maxmemory_nothing_is_evicted_whatever_the_policy(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    redis.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")  # maxmemory 0: no limit
    await check(store_on(redis))
    assert warnings(caplog, EVICTS) == []


async def test_a_redis_restarted_with_an_evicting_policy_is_warned_of(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_store(store_on(redis)) as store:
        await store.check_server()
        assert warnings(caplog, EVICTS) == []
        redis.stop()
        redis.start("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lfu")
        # Looked at again when the wake-up subscription comes back, with no call made.
        with trio.fail_after(15):
            while not warnings(caplog, EVICTS):
                await trio.sleep(0.05)
    (line,) = warnings(caplog, EVICTS)
    assert "maxmemory-policy allkeys-lfu" in line


async def test_ready_jobs_whose_records_are_gone_are_logged_as_lost(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with store_at(f"redis://127.0.0.1:{redis.port}/0", tmp_path) as store:
        await store.push("orders", ROUTES, [NewJob(b"a"), NewJob(b"b"), NewJob(b"c")])
        # What an allkeys-* policy does under memory pressure: a whole key, here the records.
        redis.cli("DEL", "bg:{orders}:J:email")
        assert await store.reserve("orders", "email", 10, 30) == []
        await store.push("orders", ROUTES, [NewJob(b"d")])
        redis.cli("DEL", "bg:{orders}:J:email")
        assert await store.reserve("orders", "email", 10, 30) == []
    # Once, then counted into the next warning (at most every LOST_WARNING_INTERVAL).
    (line,) = warnings(caplog, "had no record in Redis")
    assert line.startswith("queue orders topic email: 3 ready jobs had no record in Redis")
    assert "evicted (maxmemory-policy) or deleted outside busgate" in line


# -- a replica --------------------------------------------------------------------------------


async def test_a_replica_is_refused_at_start(redis: RedisServer, tmp_path: Path) -> None:
    replica = start_replica(redis, tmp_path / "replica")
    try:
        refused = await refusal(store_on(replica))
    finally:
        replica.stop()
    assert str(refused) == (
        f"this Redis is a replica (of 127.0.0.1:{redis.port}), which takes no writes: point"
        " the store URL at the master"
    )


async def test_the_daemon_refuses_to_start_on_a_replica(redis: RedisServer, tmp_path: Path) -> None:
    replica = start_replica(redis, tmp_path / "replica")
    try:
        done = await trio.to_thread.run_sync(run, tmp_path, f"redis://127.0.0.1:{replica.port}/0")
    finally:
        replica.stop()
    # Status 2: a configuration matter, which restarting does not mend.
    refused(done, "is a replica", "point the store URL at the master", status=2)


# -- the Redis user's permissions -------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "named"),
    [
        ("+@all -publish ~* &*", "PUBLISH: "),
        ("+@all -hset -lpop ~* &*", "HSET: ; LPOP: "),
        ("+@all -sadd ~* &*", "SADD: "),
        ("+@all -evalsha ~* &*", "may not run busgate's scripts"),
        ("+@all -eval ~* &*", "may not run busgate's scripts"),  # EVAL: on a fresh Redis
        ("+@all ~orders:* &*", "on keys bg:*): NOPERM"),  # the script's key: refused at once
    ],
)
async def test_a_user_that_may_not_run_what_busgate_needs_is_refused_at_start(
    redis: RedisServer, rules: str, named: str
) -> None:
    redis.cli("ACL", "SETUSER", "app", "on", ">s3cret", *rules.split())
    text = str(await refusal(store_on(redis, "app")))
    if "; " in named:
        for part in named.split("; "):
            assert part in text, text
    else:
        assert named in text, text
    assert "README, Stores: Redis" in text
    # Nothing written, nothing left behind.
    assert redis.cli("KEYS", "*").split() == []


async def test_the_daemon_refuses_to_start_for_a_user_that_may_not_publish(
    redis: RedisServer, tmp_path: Path
) -> None:
    redis.cli("ACL", "SETUSER", "app", "on", ">s3cret", "+@all", "-publish", "~*", "&*")
    url = f"redis://app:s3cret@127.0.0.1:{redis.port}/0"
    done = await trio.to_thread.run_sync(run, tmp_path, url)
    refused(done, "may not do all busgate does", "PUBLISH: ", status=2)


def readme_acl_line() -> list[str]:
    """The README's ``redis-cli ACL SETUSER busgate …`` line, as redis-cli's arguments."""
    text = (ROOT / "README.md").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("redis-cli ACL SETUSER")]
    return shlex.split(line)[1:]


async def test_the_readme_acl_is_all_busgate_needs(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = readme_acl_line()
    redis.cli(*[arg.replace("CHANGE-ME", "s3cret") for arg in args])
    url = f"redis://busgate:s3cret@127.0.0.1:{redis.port}/0"
    async with store_at(url, tmp_path) as store, store_at(url, tmp_path) as other:
        assert isinstance(store, RedisStore)
        await store.check_server()
        bell = store.doorbells["orders", "email"]
        pushed = await other.push("orders", ROUTES, [NewJob(b"a"), NewJob(b"b", run_at=1.0)])
        with trio.fail_after(5):  # heard over the wake-up subscription
            await bell.wait()
        assert await store.depth("orders", ["email"]) == 2
        first, second = await store.reserve("orders", "email", 10, 30)
        assert await store.extend(first, 60)
        done = Attempt(first.attempt, 0.0, 0.01, Outcome.DONE, status=200)
        dead = Attempt(second.attempt, 0.0, 0.01, Outcome.DEAD, status=410)
        assert await store.finish(
            [Finish(first, done, Outcome.DONE), Finish(second, dead, Outcome.DEAD)]
        ) == [True, True]
        await store.promote_due("orders", "email")
        await store.recover_expired("orders", "email", 5)
        await store.prune("orders", "email", Retention(10, 3600), Retention(10, 3600))
        assert (await store.stats("orders", "email")).done == 1
        (record,) = await store.get_job(pushed.ids[0])
        assert record.payload == b"a"
        page = await store.list_dead("orders", "email", DeadFilter(), None, 10)
        assert [job.id for job in page.jobs] == [pushed.ids[1]]
        assert await store.delete_dead("orders", "email", ["not-dead"]) == 0
        assert await store.replay_dead("orders", "email", [pushed.ids[1]]) == 1
        assert await store.release(await store.reserve("orders", "email", 10, 30)) == 1
        assert await store.topics() == [("orders", "email")]
        await store.check()
    assert redis.cli("ACL", "LOG").strip() == ""  # nothing refused along the way
    # The rules a refusal at start names are these.
    assert args[:5] == ["ACL", "SETUSER", "busgate", "on", ">CHANGE-ME"]
    assert args[5:] == ACL_RULES.split()
