"""A rate-limited topic gets back the tokens of jobs it reserved but did not deliver.

The dispatcher takes tokens when it reserves.  A job reserved into the buffer and then
given back (the topic was paused, the circuit opened) was never delivered: had it kept its
token, the topic would lose that delivery slot.  On a slow topic a slot is a whole interval:
at 12/m (one token every 5 s, a bucket of one) the job given back would go out 5 s after it
was first reserved instead of at once.

The backend is the h11 recording server; the first job sleeps there longer than one
interval, so the second is reserved (its token spent) while the first is still running.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import trio

from gateway.app import App
from gateway.ratelimit import TokenBucket
from tests.support.daemon import running_daemon, write_config
from tests.support.http_server import RecordingServer, serving
from tests.support.redis import RedisServer

#: 12/m: one token every INTERVAL seconds, a bucket of one.
INTERVAL = 5.0
#: How long the first job runs at the backend: past INTERVAL, so the second job is reserved
#: and waits in the buffer while the first still runs.
FIRST_JOB_MS = 6500


def test_a_given_back_token_is_spendable_again_up_to_the_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(2, clock=lambda: now[0])
    bucket.take(2)
    assert bucket.available() == 0
    bucket.give_back(1)
    assert bucket.available() == 1
    bucket.give_back(5)  # never more than a full bucket
    assert bucket.available() == 2
    now[0] = 10.0
    assert bucket.available() == 2


@pytest.fixture
async def backend() -> AsyncIterator[RecordingServer]:
    async with serving(RecordingServer()) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def store_line(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        return f"store: redis://127.0.0.1:{server.port}/0"
    return f"store: sqlite:{tmp_path / 'busgate.db'}"


def config(directory: Path, store_line: str, url: str) -> Path:
    path = write_config(
        directory,
        {
            "q": f"""\
                queue: q
                topics:
                  t:
                    backend: {url}
                    concurrency: 1
                    timeout: 10s
                    rate_limit: 12/m
                    retry: {{max_attempts: 3, backoff: 1m, max_backoff: 1m}}
                    circuit: {{failures: 1, cooldown: 200ms}}
                """
        },
    )
    main = [line for line in path.read_text().splitlines() if not line.startswith("store:")]
    path.write_text("\n".join([store_line, *main]) + "\n")
    return path


def push(app: App, *payloads: object) -> None:
    port = int(app.resp_address.rpartition(":")[2])
    client = redis.Redis(port=port)
    assert client.rpush("q", *(json.dumps(p) for p in payloads)) == len(payloads)
    client.close()


async def arrival(backend: RecordingServer, count: int, timeout: float = 20) -> float:
    """The time the backend has received ``count`` requests (polled every 10 ms)."""
    with trio.fail_after(timeout):
        while len(backend.requests) < count:
            await trio.sleep(0.01)
    return trio.current_time()


async def wait_buffered(app: App) -> None:
    """Until the second job is reserved and waits in the buffer, the first still running."""
    dispatcher = app.dispatcher("q", "t")
    with trio.fail_after(INTERVAL + 5):
        while dispatcher.statistics().buffered == 0:
            await trio.sleep(0.01)


async def test_a_job_given_back_by_a_pause_goes_out_at_once_on_resume(
    backend: RecordingServer, store_line: str, tmp_path: Path
) -> None:
    async with running_daemon(config(tmp_path, store_line, backend.url)) as app:
        assert app.store is not None
        await trio.to_thread.run_sync(push, app, {"n": 1, "sleep_ms": FIRST_JOB_MS}, {"n": 2})
        await arrival(backend, 1)
        await wait_buffered(app)
        app.dispatcher("q", "t").pause()
        assert len(backend.requests) == 1, "the first job ended before the pause"
        # The first job ends; the second goes back to the store unspent.
        with trio.fail_after(10):
            while (stats := await app.store.stats("q", "t")).done_total < 1 or (
                stats.ready,
                stats.leased,
            ) != (1, 0):
                await trio.sleep(0.01)
        resumed = trio.current_time()
        app.dispatcher("q", "t").resume()
        second = await arrival(backend, 2)
    assert json.loads(backend.requests[1].body)["n"] == 2
    assert backend.requests[1].headers["x-busgate-attempt"] == "1"  # given back: not spent
    # One delivery in the last 6.5 s of a 12/m topic: a token is due.  Without it given back,
    # the job would wait for the next one, about 3.5 s (5 s after it was first reserved).
    assert second - resumed < 2.5


async def test_a_job_given_back_by_an_open_circuit_probes_after_the_cooldown(
    backend: RecordingServer, store_line: str, tmp_path: Path
) -> None:
    async with running_daemon(config(tmp_path, store_line, backend.url)) as app:
        first_job = {"n": 1, "sleep_ms": FIRST_JOB_MS, "respond_status": 500}
        await trio.to_thread.run_sync(push, app, first_job, {"n": 2})
        first = await arrival(backend, 1)
        await wait_buffered(app)
        # The first job's 500 opens the circuit; the buffered job goes back, and after the
        # 200 ms cooldown it is the probe.
        second = await arrival(backend, 2)
        circuit = app.dispatcher("q", "t").circuit.statistics()
    assert circuit.opened_total == 1
    assert json.loads(backend.requests[1].body)["n"] == 2
    assert backend.requests[1].headers["x-busgate-attempt"] == "1"  # given back: not spent
    # 6.5 s at the backend, 0.2 s of cooldown.  Had the probe's token stayed spent, it would
    # wait for the next: 10 s after the first job (twice the interval).
    assert second - first < 8.5
