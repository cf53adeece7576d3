"""Limits a push meets before the store: a ZADD score the store cannot keep, attributes that
no backend would take as headers, and one command's count of payloads (one store call).

Each used to get through: a ZADD at 1e20 failed the whole store call it shared (other
producers' pushes included, each answered "internal error"); 20 attributes of 900 KB made an
18 MB job on a queue with max_payload 1 KiB, then a 431 from its HTTP backend on every
attempt; an LPUSH of 300,000 payloads held every producer for seconds.  Real daemon, SQLite
and Redis stores; redis-py and the HTTP API as producers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import trio

from gateway.app import App
from gateway.producer import MAX_ATTRIBUTE_BYTES, MAX_BATCH
from tests.gateway.test_producer_protocol import QUEUES
from tests.support.daemon import running_daemon, write_config
from tests.support.redis import RedisServer


@pytest.fixture(params=["sqlite", "redis"])
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[App]:
    if request.param == "sqlite":
        async with running_daemon(write_config(tmp_path, QUEUES)) as app:
            yield app
        return
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = f"redis://127.0.0.1:{server.port}/0"
        async with running_daemon(write_config(tmp_path / "d", QUEUES, store=store)) as app:
            yield app
    finally:
        server.stop()


def client(app: App) -> redis.Redis:
    host, _, port = app.resp_address.rpartition(":")
    return redis.Redis(host=host, port=int(port), protocol=2)


def post_job(app: App, job: object) -> tuple[int, bytes]:
    """POST one job to queue `held` over the HTTP producer API: the status and body."""
    request = urllib.request.Request(
        f"http://{app.http_address}/v1/queues/held/jobs",
        data=json.dumps(job).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def held(app: App) -> int:
    assert app.store is not None
    return (await app.store.stats("held", "t")).ready


async def test_a_zadd_score_past_100_years_is_refused_alone(app: App) -> None:
    def pipeline() -> list[object]:
        with client(app).pipeline(transaction=False) as pipe:
            pipe.lpush("held", "x")
            pipe.zadd("held", {"y": 1e20})
            pipe.lpush("held", "z")
            return pipe.execute(raise_on_error=False)

    first, refused, last = await trio.to_thread.run_sync(pipeline)
    assert (first, last) == (1, 1)
    assert isinstance(refused, redis.ResponseError)
    assert "over 100 years away" in str(refused)
    assert await held(app) == 2


async def test_scores_and_delays_are_read_as_redis_reads_them(app: App) -> None:
    # Python's float() and int() took " 5", "1_000" and "+5"; and a ZADD score out of
    # range counted as reason "invalid" while XADD's delay counted as "bad_delay".
    def refusal(*command: str) -> str:
        with pytest.raises(redis.ResponseError) as refused:
            client(app).execute_command(*command)  # type: ignore[no-untyped-call]
        return str(refused.value)

    def refusals() -> list[str]:
        return [
            refusal("ZADD", "held", " 5", "x"),
            refusal("ZADD", "held", "1_000", "x"),
            refusal("XADD", "held", "*", "payload", "x", "delay", "1_500"),
            refusal("XADD", "held", "*", "payload", "x", "delay", " 1500"),
            refusal("XADD", "held", "*", "payload", "x", "delay", "+5"),
            refusal("ZADD", "held", "nan", "x"),
            refusal("ZADD", "held", "inf", "x"),
        ]

    messages = await trio.to_thread.run_sync(refusals)
    assert all("not a valid float" in m for m in messages[:2]), messages
    assert all("delay is not an integer" in m for m in messages[2:5]), messages
    assert all("must be finite" in m for m in messages[5:]), messages
    assert await held(app) == 0
    assert app.service is not None
    counts = app.service.refusals.counts
    assert (counts[("held", "bad_delay")], counts[("held", "invalid")]) == (2, 5), counts


async def test_attributes_past_the_limit_are_refused(app: App) -> None:
    big = "v" * MAX_ATTRIBUTE_BYTES

    def xadd() -> redis.ResponseError:
        with pytest.raises(redis.ResponseError) as refused:
            client(app).xadd("held", {"payload": b"p", "tenant": big})
        return refused.value

    refused = await trio.to_thread.run_sync(xadd)
    assert "exceed the limit of 8192 bytes" in str(refused)
    fits = "v" * (MAX_ATTRIBUTE_BYTES - len("tenant"))
    await trio.to_thread.run_sync(
        lambda: client(app).xadd("held", {"payload": b"p", "tenant": fits})
    )

    job = {"payload": "p", "attributes": {"tenant": big}}
    assert (await trio.to_thread.run_sync(post_job, app, job))[0] == 413
    assert await held(app) == 1  # the one that fits


async def test_attributes_that_would_be_one_header_are_refused(app: App) -> None:
    # `tenant` and `Tenant` went to an HTTP backend as two headers, and php saw only the
    # last (HTTP_X_BUSGATE_ATTR_TENANT): the two backends did not get the same job.
    def xadd(names: tuple[str, str]) -> redis.ResponseError:
        with pytest.raises(redis.ResponseError) as refused:
            client(app).xadd("held", {"payload": b"p", names[0]: "a", names[1]: "b"})
        return refused.value

    for names in (("tenant", "Tenant"), ("x-region", "X_REGION")):
        refused = await trio.to_thread.run_sync(xadd, names)
        assert f"attributes {names[0]!r} and {names[1]!r} would be one header" in str(refused)

    job = {"payload": "p", "attributes": {"a-b": "1", "A_b": "2"}}
    status, body = await trio.to_thread.run_sync(post_job, app, job)
    assert status == 400 and b"would be one header" in body
    assert await held(app) == 0


async def test_one_push_takes_at_most_one_store_calls_worth_of_payloads(app: App) -> None:
    def lpush(count: int) -> object:
        try:
            return client(app).lpush("held", *[b"p"] * count)
        except redis.ResponseError as refused:
            return refused

    refused = await trio.to_thread.run_sync(lpush, MAX_BATCH + 1)
    assert isinstance(refused, redis.ResponseError)
    assert f"at most {MAX_BATCH}: split it" in str(refused)
    assert await trio.to_thread.run_sync(lpush, MAX_BATCH) == MAX_BATCH
    assert await held(app) == MAX_BATCH
