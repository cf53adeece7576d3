"""A Redis that restarts answers ``-LOADING`` to every command while it loads its dataset: a
call it refused ran nothing, so the store waits with backoff and sends it again, within the
call's timeout; a push issued meanwhile is stored once loading ends, exactly once.  /readyz
says the store is loading rather than waiting for it or printing a bare error reply.

Against real redis-servers restarted with a dataset that takes a second or two to load
(``restart_loading``: redis-server's ``key-load-delay``), standalone and a cluster master.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis as redis_py
import trio

from adapters.storage.errors import StoreLoading, StoreUnavailable
from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from adapters.storage.redis_client import RedisClient
from adapters.storage.redis_routing import Cluster, Standalone
from gateway.app import open_store
from gateway.config import parse_store
from tests.gateway.test_lifecycle import http
from tests.storage.test_cluster_subscription import cluster as cluster
from tests.storage.test_cluster_subscription import queue_on
from tests.storage.test_redis_subscription import opened
from tests.support.daemon import running_daemon, write_config
from tests.support.redis import RedisCluster, RedisServer, loading, restart_loading
from tests.support.stores import running_store

ROUTES = [("email", Filter())]


async def test_a_push_while_redis_loads_is_stored_once_loading_ends(redis: RedisServer) -> None:
    async with opened(Standalone(RedisClient(redis.address))) as store:
        await store.push("orders", ROUTES, [NewJob(b"before")])  # connected, scripts cached
        restart_loading(redis, 1.5)
        with trio.fail_after(10):
            # Before: refused at once, "Redis refused: LOADING Redis is loading the dataset".
            result = await store.push("orders", ROUTES, [NewJob(b"while loading")])
            assert not loading(redis)  # answered once loading was over, not before
        assert len(result.ids) == 1
        stats = await store.stats("orders", "email")
        assert (stats.ready, stats.pushed_total) == (2, 2)  # the one before, this one once
        # and the rest of the store works as before the restart
        (job,) = await store.reserve("orders", "email", 1, 30)
        assert job.payload == b"before"


async def test_a_push_fails_clearly_when_loading_outlasts_the_timeout(
    redis: RedisServer, tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{redis.port}/0?timeout=500ms"
    async with running_store(await open_store(parse_store(url, str(tmp_path)))) as store:
        await store.push("orders", ROUTES, [NewJob(b"before")])
        restart_loading(redis, 3)
        with trio.fail_after(3):
            started = trio.current_time()
            with pytest.raises(StoreLoading) as refused:
                await store.push("orders", ROUTES, [NewJob(b"too early")])
            waited = trio.current_time() - started
        # Waited for it, with backoff (0.1 s, 0.2 s, ...) within the URL's 500 ms; before,
        # refused at once.
        assert 0.25 <= waited < 1.5, waited
        assert isinstance(refused.value, StoreUnavailable)  # nothing acknowledged
        assert "still loading its dataset into memory after a restart" in str(refused.value)
        assert loading(redis)
        with trio.fail_after(10):
            while loading(redis):
                await trio.sleep(0.05)
        stats = await store.stats("orders", "email")
        assert (stats.ready, stats.pushed_total) == (1, 1)  # refused: not stored


async def test_the_readiness_check_says_loading_at_once(redis: RedisServer) -> None:
    async with opened(Standalone(RedisClient(redis.address))) as store:
        await store.check()
        restart_loading(redis, 1.5)
        with trio.fail_after(0.5):  # reported, not waited for: /readyz has 2 s
            with pytest.raises(StoreLoading, match=r"^loading: Redis is loading its dataset"):
                await store.check()
        with trio.fail_after(10):
            while loading(redis):
                await trio.sleep(0.05)
        await store.check()


async def test_a_cluster_master_restarting_is_waited_for(cluster: RedisCluster) -> None:
    master = cluster.masters()[0]
    queue = queue_on(master)
    async with opened(Cluster(cluster.seeds, RedisClient)) as store:
        await store.push(queue, ROUTES, [NewJob(b"before")])
        # Shorter than the cluster's node timeout (2 s): no node marks it failing, and it
        # serves its slots again once loaded.
        restart_loading(master, 1.5, prefix=f"{{{queue}}}:")
        with trio.fail_after(0.5), pytest.raises(StoreLoading, match=r"^loading: "):
            await store.check()  # a PING to every master
        with trio.fail_after(10):
            await store.push(queue, ROUTES, [NewJob(b"while loading")])
            assert not loading(master)
        stats = await store.stats(queue, "email")
        assert (stats.ready, stats.pushed_total) == (2, 2)
        await store.check()


async def test_the_daemon_answers_a_producer_once_redis_has_loaded(
    redis: RedisServer, tmp_path: Path
) -> None:
    queue = """\
        queue: q
        topics:
          t: {backend: "fastcgi://127.0.0.1:9", script: /srv/x.php, paused: true}
        """
    config = write_config(tmp_path, {"q": queue}, store=f"redis://127.0.0.1:{redis.port}/0")
    async with running_daemon(config) as app:
        http_port = int(app.http_address.rpartition(":")[2])
        client = redis_py.Redis(port=int(app.resp_address.rpartition(":")[2]))
        try:
            assert (await http(http_port, "GET", "/readyz"))[0] == 200
            restart_loading(redis, 1.5)
            status, _, body = await http(http_port, "GET", "/readyz")
            assert status == 503 and b"loading: Redis is loading its dataset" in body, body
            assert json.loads(body)["status"] == "loading"
            with trio.fail_after(10):
                # Before: -TRYAGAIN store unavailable ... LOADING, at once.
                assert await trio.to_thread.run_sync(client.lpush, "q", b"while loading") == 1
            assert not loading(redis)
            assert (await http(http_port, "GET", "/readyz"))[0] == 200
            assert redis.cli("HLEN", "bg:{q}:J:t").strip() == "1"  # stored once
        finally:
            client.close()
