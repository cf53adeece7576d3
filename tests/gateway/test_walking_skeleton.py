"""End to end: jobs pushed with real Redis clients arrive in a real php-fpm script."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis
import trio

from adapters.storage.jobs import State, TopicStats
from gateway.app import App
from tests.support.daemon import read_received, running_daemon, wait_received, write_config
from tests.support.phpfpm import PhpFpm


def orders_queue(fpm: PhpFpm, *, password: str | None = None, max_attempts: int = 3) -> str:
    password_line = f"password: {password}\n" if password else ""
    return (
        "queue: orders\n"
        + password_line
        + f"""\
topics:
  email:
    backend: fastcgi://127.0.0.1:{fpm.address.port}
    script: {fpm.script("record.php")}
    uri: /jobs/order-email
    concurrency: 4
    timeout: 5s
    retry: {{max_attempts: {max_attempts}, backoff: 100ms, max_backoff: 200ms}}
"""
    )


def port_of(app: App) -> int:
    return int(app.resp_address.rpartition(":")[2])


async def test_redis_cli_push_arrives_in_php(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"orders": orders_queue(recording_fpm)})
    payload = '{"order_id": 42, "note": "héllo \\" quotes"}'
    async with running_daemon(config) as app:
        done = await trio.run_process(
            ["redis-cli", "-p", str(port_of(app)), "LPUSH", "orders", payload],
            capture_stdout=True,
        )
        assert done.stdout.strip() == b"1"  # redis-cli prints "(integer) 1" only on a tty
        (received,) = await wait_received(record, 1)
    assert received.body == payload.encode()
    server = received.server
    assert server["HTTP_X_BUSGATE_QUEUE"] == "orders"
    assert server["HTTP_X_BUSGATE_TOPIC"] == "email"
    assert server["HTTP_X_BUSGATE_ATTEMPT"] == "1"
    assert len(server["HTTP_X_BUSGATE_JOB_ID"]) == 26
    assert server["REQUEST_URI"] == "/jobs/order-email"
    assert server["SCRIPT_FILENAME"] == recording_fpm.script("record.php")
    assert server["REQUEST_METHOD"] == "POST"
    assert server["CONTENT_TYPE"] == "application/json"
    assert server["CONTENT_LENGTH"] == str(len(payload.encode()))
    assert server["HTTP_TRACEPARENT"].startswith("00-")
    assert server["HTTP_X_BUSGATE_ENQUEUED_AT"].endswith("Z")


async def test_redis_py_pushes_with_auth_and_binary_payloads(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"orders": orders_queue(recording_fpm, password="s3cret")})
    payloads = [os.urandom(1000), b"", b"\x00\r\n*3\r\n", json.dumps({"n": 1}).encode()]
    async with running_daemon(config) as app:

        def produce() -> list[object]:
            client = redis.Redis(port=port_of(app), password="s3cret")
            replies: list[object] = [client.lpush("orders", *payloads[:2])]
            replies.append(client.rpush("orders", *payloads[2:]))
            replies.append(client.llen("orders"))
            client.close()
            return replies

        replies = await trio.to_thread.run_sync(produce)
        received = await wait_received(record, len(payloads))
        assert app.store is not None
        stats = await _settled_stats(app)
    assert replies[:2] == [2, 2]
    assert isinstance(replies[2], int)
    assert sorted(r.body for r in received) == sorted(payloads)
    assert len({r.job_id for r in received}) == len(payloads)
    assert (stats.done_total, stats.ready, stats.leased) == (4, 0, 0)


async def test_wrong_password_and_no_auth_store_nothing(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"orders": orders_queue(recording_fpm, password="s3cret")})
    async with running_daemon(config) as app:

        def produce() -> tuple[str, str]:
            anonymous = redis.Redis(port=port_of(app))
            with pytest.raises(redis.AuthenticationError) as no_auth:
                anonymous.lpush("orders", b"x")
            wrong = redis.Redis(port=port_of(app), password="nope")
            with pytest.raises(redis.AuthenticationError) as wrong_pass:
                wrong.ping()
            return str(no_auth.value), str(wrong_pass.value)

        no_auth, wrong_pass = await trio.to_thread.run_sync(produce)
        stats = await _settled_stats(app)
    assert "Authentication required" in no_auth
    assert "invalid username-password pair" in wrong_pass
    assert stats.pushed_total == 0
    assert read_received(record) == []


async def test_job_is_acknowledged_only_after_a_2xx(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"orders": orders_queue(recording_fpm, max_attempts=2)})
    async with running_daemon(config) as app:
        port = port_of(app)
        await trio.run_process(
            ["redis-cli", "-p", str(port), "LPUSH", "orders", '{"respond_status": 500}'],
            capture_stdout=True,
        )
        received = await wait_received(record, 2)
        assert app.store is not None
        with trio.fail_after(5):
            while (records := await app.store.get_job(received[0].job_id))[0].state != State.DEAD:
                await trio.sleep(0.02)
    assert [r.attempt for r in received] == [1, 2]
    assert received[0].job_id == received[1].job_id
    (job,) = records
    assert [(a.attempt, a.status, a.outcome.value) for a in job.attempts] == [
        (1, 500, "retry"),
        (2, 500, "dead"),
    ]
    assert job.attempts[0].body == b"recorded"
    assert all(a.duration > 0 for a in job.attempts)


async def _settled_stats(app: App) -> TopicStats:
    assert app.store is not None
    with trio.fail_after(10):
        while True:
            stats = await app.store.stats("orders", "email")
            if stats.leased == 0 and stats.ready == 0:
                return stats
            await trio.sleep(0.02)
