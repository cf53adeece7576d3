"""SIGTERM: stop accepting and reserving, let in-flight deliveries finish until
shutdown_timeout, release the rest so nothing stays leased."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from adapters.storage.jobs import JobRecord, State
from adapters.storage.sqlite import SQLiteStore
from tests.support.daemon import (
    Received,
    read_received,
    running_daemon,
    wait_received,
    write_config,
)
from tests.support.phpfpm import PhpFpm
from tests.support.ports import free_port, wait_connectable
from tests.support.redis import RedisServer
from tests.support.sqlite import cap_pages


def configure(tmp_path: Path, fpm: PhpFpm, shutdown_timeout: str) -> tuple[Path, int]:
    port = free_port()
    queue = f"""\
        queue: q
        topics:
          t:
            backend: fastcgi://127.0.0.1:{fpm.address.port}
            script: {fpm.script("record.php")}
            concurrency: 1
            timeout: 10s
        """
    config = write_config(tmp_path, {"q": queue})
    text = config.read_text().replace("resp: 127.0.0.1:0", f"resp: 127.0.0.1:{port}")
    config.write_text(text.replace("shutdown_timeout: 5s", f"shutdown_timeout: {shutdown_timeout}"))
    return config, port


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
        stderr=log.open("ab"),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


async def push(port: int, *payloads: str) -> None:
    done = await trio.run_process(
        ["redis-cli", "-p", str(port), "RPUSH", "q", *payloads], capture_stdout=True
    )
    assert done.stdout.strip() == str(len(payloads)).encode()


async def delivering(
    config: Path, port: int, log: Path, record: Path, payload: str
) -> tuple[subprocess.Popen[bytes], Received]:
    """A daemon started on ``config``, with ``payload`` pushed and being delivered."""
    daemon = start(config, log)
    await trio.to_thread.run_sync(wait_connectable, "127.0.0.1", port)
    await push(port, payload)
    (first,) = await wait_received(record, 1)
    return daemon, first


async def job_in_store(tmp_path: Path, job_id: str) -> JobRecord:
    """The job as the stopped daemon left it in its SQLite file."""
    store = await SQLiteStore.open(str(tmp_path / "busgate.db"))
    try:
        (job,) = await store.get_job(job_id)
    finally:
        await store.aclose()
    return job


async def test_sigterm_finishes_in_flight_work_and_leaves_the_rest_ready(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config, port = configure(tmp_path, recording_fpm, "10s")
    daemon = start(config, tmp_path / "daemon.log")
    await trio.to_thread.run_sync(wait_connectable, "127.0.0.1", port)
    await push(port, '{"sleep_ms": 800}', "second", "third")
    (slow,) = await wait_received(record, 1)  # in flight, sleeping in php
    daemon.send_signal(signal.SIGTERM)
    code = await trio.to_thread.run_sync(daemon.wait, 20)
    assert code == 0
    assert [r.body for r in read_received(record)] == [b'{"sleep_ms": 800}']
    store = await SQLiteStore.open(str(tmp_path / "busgate.db"))
    try:
        (job,) = await store.get_job(slow.job_id)
        stats = await store.stats("q", "t")
    finally:
        await store.aclose()
    assert job.state is State.DONE  # the in-flight delivery was allowed to finish
    assert (stats.ready, stats.leased, stats.done) == (2, 0, 1)  # the rest waits, unleased
    log = (tmp_path / "daemon.log").read_text()
    assert "shutting down: draining in-flight deliveries for up to 10s" in log


async def test_delivery_past_the_shutdown_timeout_is_released_without_an_attempt(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config, port = configure(tmp_path, recording_fpm, "300ms")
    log = tmp_path / "daemon.log"
    daemon, first = await delivering(config, port, log, record, '{"sleep_ms": 3000}')
    started = trio.current_time()
    daemon.send_signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(daemon.wait, 20) == 0
    assert trio.current_time() - started < 2.5  # did not wait for the 3 s script
    job = await job_in_store(tmp_path, first.job_id)
    assert (job.state, job.attempt, job.attempts) == (State.READY, 0, ())
    # Restarted, the daemon delivers it again as attempt 1: the cut-short one did not count.
    daemon = start(config, log)
    try:
        received = await wait_received(record, 2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(daemon.wait, 20)
    assert received[1].job_id == first.job_id and received[1].attempt == 1
    assert "released queue=q topic=t jobs=1" in log.read_text()


async def test_a_second_sigterm_releases_in_flight_jobs_at_once(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    # A second signal (Ctrl-C twice, an impatient operator) was ignored: the drain waited out
    # shutdown_timeout for a delivery that might take that long.
    config, port = configure(tmp_path, recording_fpm, "60s")
    log = tmp_path / "daemon.log"
    daemon, first = await delivering(config, port, log, record, '{"sleep_ms": 8000}')
    daemon.send_signal(signal.SIGTERM)
    await trio.sleep(0.5)
    assert daemon.poll() is None  # draining: waiting for the delivery
    started = trio.current_time()
    daemon.send_signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(daemon.wait, 20) == 0
    assert trio.current_time() - started < 3  # not the 8 s script, nor the 60 s drain
    job = await job_in_store(tmp_path, first.job_id)
    assert (job.state, job.attempt, job.attempts) == (State.READY, 0, ())
    text = log.read_text()
    assert "SIGTERM again: cancelling in-flight deliveries now" in text
    assert "released queue=q topic=t jobs=1" in text
    assert text.count("shutting down: draining") == 1


async def test_draining_daemon_refuses_http_pushes_and_stores_none_of_them(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config, port = configure(tmp_path, recording_fpm, "10s")
    http_port = free_port()
    config.write_text(
        config.read_text().replace("http: 127.0.0.1:0", f"http: 127.0.0.1:{http_port}")
    )
    daemon = start(config, tmp_path / "daemon.log")
    await trio.to_thread.run_sync(wait_connectable, "127.0.0.1", http_port)
    await push(port, '{"sleep_ms": 1500}')
    await wait_received(record, 1)  # in flight: the drain lasts until it ends
    daemon.send_signal(signal.SIGTERM)
    with trio.fail_after(5):
        while (await http(http_port, "GET", "/readyz"))[0] != 503:
            await trio.sleep(0.02)
    status, headers, body = await http(http_port, "POST", "/v1/queues/q/jobs", b"late")
    assert status == 503 and headers["Retry-After"] == "5"
    assert b"shutting down; nothing was stored" in body
    assert await trio.to_thread.run_sync(daemon.wait, 20) == 0
    store = await SQLiteStore.open(str(tmp_path / "busgate.db"))
    try:
        stats = await store.stats("q", "t")
    finally:
        await store.aclose()
    assert (stats.ready, stats.leased, stats.done) == (0, 0, 1)  # "late" was never stored


PAUSED_QUEUE = """\
    queue: q
    topics:
      t: {backend: "fastcgi://127.0.0.1:9", script: /srv/x.php, paused: true}
    """


async def http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, Any, bytes]:
    def call() -> tuple[int, Any, bytes]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data=body or None, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    return await trio.to_thread.run_sync(call)


async def test_readyz_says_not_ready_while_the_sqlite_disk_is_full(tmp_path: Path) -> None:
    async with running_daemon(write_config(tmp_path, {"q": PAUSED_QUEUE})) as app:
        assert isinstance(app.store, SQLiteStore)
        http_port = int(app.http_address.rpartition(":")[2])
        client = redis.Redis(port=int(app.resp_address.rpartition(":")[2]))

        def push() -> object:
            return client.lpush("q", b"x" * 20_000)

        assert (await http(http_port, "GET", "/readyz"))[0] == 200
        await cap_pages(app.store, 0)
        with pytest.raises(redis.exceptions.ResponseError, match="disk is full"):
            await trio.to_thread.run_sync(push)
        status, _, body = await http(http_port, "GET", "/readyz")
        assert status == 503 and b"database or disk is full" in body
        await cap_pages(app.store, 1000)  # room again: /readyz finds out with no push
        assert (await http(http_port, "GET", "/readyz"))[0] == 200
        assert await trio.to_thread.run_sync(push) == 1
        client.close()


@pytest.mark.parametrize(
    ("refusal", "restore", "error"),
    [
        # Out of memory with noeviction: PING answers, every write is refused.
        (("maxmemory", "1"), ("maxmemory", "0"), "OOM"),
        # Fewer good replicas than min-replicas-to-write.
        (("min-replicas-to-write", "1"), ("min-replicas-to-write", "0"), "NOREPLICAS"),
    ],
)
async def test_readyz_says_not_ready_while_redis_refuses_writes(
    tmp_path: Path,
    noeviction_redis: RedisServer,
    refusal: tuple[str, str],
    restore: tuple[str, str],
    error: str,
) -> None:
    # PING alone said ready while every push was refused.
    server = noeviction_redis
    config = write_config(tmp_path, {"q": PAUSED_QUEUE}, store=f"redis://{server.address}")
    async with running_daemon(config) as app:
        http_port = int(app.http_address.rpartition(":")[2])
        client = redis.Redis(port=int(app.resp_address.rpartition(":")[2]))

        def push() -> object:
            return client.lpush("q", b"x")

        assert (await http(http_port, "GET", "/readyz"))[0] == 200
        server.cli("CONFIG", "SET", *refusal)
        with pytest.raises(redis.exceptions.ResponseError, match=error):
            await trio.to_thread.run_sync(push)
        status, _, body = await http(http_port, "GET", "/readyz")
        assert status == 503 and error.encode() in body, body
        server.cli("CONFIG", "SET", *restore)  # /readyz finds out with no push
        assert (await http(http_port, "GET", "/readyz"))[0] == 200
        assert await trio.to_thread.run_sync(push) == 1
        client.close()


async def test_readyz_comes_back_for_a_redis_user_that_may_not_set(
    tmp_path: Path, noeviction_redis: RedisServer
) -> None:
    # The probe write after a refusal is a SET: a least-privilege user without it got
    # NOPERM, and /readyz stayed 503 for good though pushes went through again.
    server = noeviction_redis
    server.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all", "-set")
    store = f"redis://app:s3cret@{server.address}"
    config = write_config(tmp_path, {"q": PAUSED_QUEUE}, store=store)
    async with running_daemon(config) as app:
        http_port = int(app.http_address.rpartition(":")[2])
        client = redis.Redis(port=int(app.resp_address.rpartition(":")[2]))
        server.cli("CONFIG", "SET", "maxmemory", "1")
        with pytest.raises(redis.exceptions.ResponseError, match="OOM"):
            await trio.to_thread.run_sync(client.lpush, "q", b"x")
        server.cli("CONFIG", "SET", "maxmemory", "0")
        assert (await http(http_port, "GET", "/readyz"))[0] == 200
        client.close()


async def test_a_connection_that_pushed_before_a_drain_is_refused_during_it(
    recording_fpm: PhpFpm, tmp_path: Path
) -> None:
    # A connection remembers the queues it pushed to, checked once; once the service has
    # stopped (the first thing a drain does), that must not let its next push through.
    # Before the fix, producers on open connections were acknowledged all through a drain,
    # holding SIGTERM off for as long as they kept pushing.
    config, port = configure(tmp_path, recording_fpm, "10s")
    async with running_daemon(config) as app:
        assert app.service is not None and app.store is not None
        app.dispatcher("q", "t").pause()
        client = redis.Redis(port=port, socket_timeout=10)
        try:
            assert await trio.to_thread.run_sync(client.rpush, "q", "before") == 1
            app.service.stop()
            with pytest.raises(redis.ResponseError, match="shutting down; nothing was stored"):
                await trio.to_thread.run_sync(client.rpush, "q", "during")

            def pipelined() -> object:
                pipe = client.pipeline(transaction=False)
                pipe.rpush("q", "a")
                pipe.lpush("q", "b")
                return pipe.execute()

            with pytest.raises(redis.ResponseError, match="shutting down; nothing was stored"):
                await trio.to_thread.run_sync(pipelined)
        finally:
            client.close()
        stats = await app.store.stats("q", "t")
    assert stats.pushed_total == 1
