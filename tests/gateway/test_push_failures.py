"""Pushes the store fails once they were accepted (Redis out of memory, a user it refuses)
are logged and counted: the producers were told, the operator must be too."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.gateway.test_logs_events import TOKEN, resp
from tests.gateway.test_metrics_events import samples
from tests.support.daemon import running_daemon, write_config
from tests.support.redis import RedisServer

pytestmark = pytest.mark.trio

QUEUE = """\
    queue: q
    topics:
      t:
        backend: http://127.0.0.1:9/
        paused: true
    """


def config(tmp_path: Path, store: str) -> Path:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    return write_config(
        tmp_path, {"q": QUEUE}, store=store, main_extra="admin_token_file: admin.token\n"
    )


async def test_pushes_redis_refuses_are_logged_counted_and_their_end_said(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_daemon(config(tmp_path, f"redis://127.0.0.1:{redis.port}/0")) as app:
        redis.cli("CONFIG", "SET", "maxmemory", "1")  # every write refused: OOM
        for _ in range(3):
            reply = await resp(app, ("RPUSH", "q", "a", "b"))
            assert reply.startswith(b"-TRYAGAIN store unavailable, nothing was acknowledged")
        redis.cli("CONFIG", "SET", "maxmemory", "0")
        assert await resp(app, ("RPUSH", "q", "c")) == b":1\r\n"
        assert await samples(app, "busgate_pushes_failed") == {("q", "no"): 6}
    lines = [r.getMessage() for r in caplog.records if r.name == "busgate.producer"]
    failed = [line for line in lines if line.startswith("push failed")]
    # The first at once, the others counted into the next line (at most one a minute).
    assert len(failed) == 1, lines
    assert failed[0].startswith("push failed queue=q jobs=2 stored=no error=")
    assert "OOM" in failed[0]
    assert "pushes stored again queue=q (2 more failures since the last logged)" in lines


async def test_a_push_that_may_be_stored_is_counted_as_such(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    redis.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all")
    store = f"redis://app:s3cret@127.0.0.1:{redis.port}/0"
    async with running_daemon(config(tmp_path, store)) as app:
        # Then a user that may not PUBLISH: the push script fails after its writes (taken
        # away once started: such a user is refused at start).
        redis.cli("ACL", "SETUSER", "app", "-publish")
        reply = await resp(app, ("RPUSH", "q", "a"))
        assert reply.startswith(b"-TRYAGAIN not acknowledged; it may have been stored")
        assert await samples(app, "busgate_pushes_failed") == {("q", "maybe"): 1}
    assert any(
        r.getMessage().startswith("push failed queue=q jobs=1 stored=maybe") for r in caplog.records
    )
