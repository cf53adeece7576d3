"""A Redis script that fails part way keeps what it wrote before: a push that fails so is
answered as possibly stored, never as "nothing was acknowledged" (a producer believing that
pushes again, and the job runs twice)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_py
import trio

from adapters.storage.errors import StoreUnavailable, StoreUncertain
from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from tests.storage.test_redis_timeouts import store_at
from tests.support.daemon import running_daemon, write_config
from tests.support.redis import RedisServer

pytestmark = pytest.mark.trio

ROUTES = [("email", Filter())]


async def test_a_push_whose_script_fails_after_writing_may_be_stored(
    redis: RedisServer, tmp_path: Path
) -> None:
    redis.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all")
    url = f"redis://app:s3cret@127.0.0.1:{redis.port}/0"
    async with store_at(url, tmp_path) as store:
        # Then the user may do all but PUBLISH, which the push script calls after its writes
        # (taken away once started: a user that may not PUBLISH is refused at start).
        redis.cli("ACL", "SETUSER", "app", "-publish")
        with pytest.raises(StoreUncertain, match=r"failed part way: .*can't run this command"):
            await store.push("orders", ROUTES, [NewJob(b"x")])
        # And it was: Redis keeps the writes before the failing command.
        assert (await store.stats("orders", "email")).ready == 1


async def test_a_push_refused_before_its_script_runs_was_not_stored(
    redis: RedisServer, tmp_path: Path
) -> None:
    async with store_at(f"redis://127.0.0.1:{redis.port}/0", tmp_path) as store:
        await store.push("orders", ROUTES, [NewJob(b"warm-up")])
        # Every write is refused: OOM, at the script's first write, so nothing is written.
        redis.cli("CONFIG", "SET", "maxmemory", "1")
        try:
            with pytest.raises(StoreUnavailable, match="OOM") as refused:
                await store.push("orders", ROUTES, [NewJob(b"x")])
        finally:
            redis.cli("CONFIG", "SET", "maxmemory", "0")
        assert not isinstance(refused.value, StoreUncertain)
        assert (await store.stats("orders", "email")).ready == 1


async def test_a_producer_is_told_its_push_may_have_been_stored(
    redis: RedisServer, tmp_path: Path
) -> None:
    redis.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all")
    queue = """\
        queue: q
        topics:
          t:
            backend: fastcgi://127.0.0.1:9
            script: /srv/none.php
            paused: true
        """
    store = f"redis://app:s3cret@127.0.0.1:{redis.port}/0"
    async with running_daemon(write_config(tmp_path, {"q": queue}, store=store)) as app:
        redis.cli("ACL", "SETUSER", "app", "-publish")  # once started: refused at start
        port = int(app.resp_address.rpartition(":")[2])
        client = redis_py.Redis(port=port, socket_timeout=10)
        try:
            with pytest.raises(redis_py.ResponseError) as refused:
                await trio.to_thread.run_sync(client.rpush, "q", "job")
        finally:
            client.close()
    assert str(refused.value).startswith("not acknowledged; it may have been stored: ")
