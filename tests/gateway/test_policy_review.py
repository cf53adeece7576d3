"""The delivery policy against real parts: a running daemon, the h11 test server or php-fpm,
on SQLite and on a real redis-server, checked by what the backend receives and the store holds.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from adapters.delivery.base import Delivery
from adapters.storage.jobs import Job, JobRecord, Outcome, State
from gateway import dispatcher as dispatcher_module
from gateway.app import App
from gateway.circuit import CircuitState
from gateway.config import load_config
from gateway.policy import Decision, decide
from gateway.resp import encode_command
from tests.support.daemon import read_received, running_daemon, wait_received, write_config
from tests.support.http_server import RecordingServer, serving
from tests.support.phpfpm import PhpFpm
from tests.support.redis import RedisServer


@dataclass
class TimedServer(RecordingServer):
    """The recording server, also noting when each request arrived and how many ran at once."""

    arrived: list[float] = field(default_factory=list)
    arrived_wall: list[float] = field(default_factory=list)
    running: int = 0
    peak_running: int = 0
    fail_with: int | None = None  # answer every request with this status

    async def _answer(  # type: ignore[override]
        self, conn: h11.Connection, stream: trio.abc.Stream, body: bytes
    ) -> bool:
        self.arrived.append(trio.current_time())
        self.arrived_wall.append(time.time())
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        if self.fail_with is not None:
            body = json.dumps({"respond_status": self.fail_with}).encode()
        try:
            return await RecordingServer._answer(conn, stream, body)
        finally:
            self.running -= 1

    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.arrived)]

    async def reached(self, count: int, *, timeout: float) -> None:
        """Wait until ``count`` requests have arrived."""
        with trio.fail_after(timeout):
            while len(self.requests) < count:
                await trio.sleep(0.01)


@pytest.fixture
async def server() -> AsyncIterator[TimedServer]:
    async with serving(TimedServer()) as recording:
        yield recording


@pytest.fixture(params=["sqlite", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def config_for(tmp_path: Path, store_kind: str, request: pytest.FixtureRequest, topic: str) -> Path:
    """A daemon config with queue ``q`` and one topic ``t`` (its keys in ``topic``)."""
    queue = "queue: q\ntopics:\n  t:\n" + "".join(f"    {line}\n" for line in topic.splitlines())
    store = None
    if store_kind == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.cli("FLUSHALL")
        store = f"redis://127.0.0.1:{redis.port}/0"
    return write_config(tmp_path / "daemon", {"q": queue}, store=store)


async def command(app: App, *args: str | bytes) -> bytes:
    """Send one command over the Redis protocol; the raw reply."""
    host, _, port = app.resp_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        await stream.send_all(encode_command(*args))
        reply = b""
        with trio.fail_after(5):
            while not reply.endswith(b"\r\n"):
                reply += await stream.receive_some(1000)
        assert not reply.startswith(b"-"), reply
        return reply
    finally:
        await stream.aclose()


async def push(app: App, *payloads: object) -> None:
    await command(app, "RPUSH", "q", *(json.dumps(p) for p in payloads))


async def settled(app: App, job_id: str, state: State, timeout: float = 15) -> JobRecord:
    assert app.store is not None
    with trio.fail_after(timeout):
        while True:
            records = await app.store.get_job(job_id)
            if records and records[0].state is state:
                return records[0]
            await trio.sleep(0.05)


async def test_backoff_spacing_and_dead_at_max_attempts(
    server: TimedServer, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    topic = f"""backend: {server.url}
timeout: 2s
retry: {{max_attempts: 5, backoff: 200ms, max_backoff: 500ms}}
circuit: {{failures: 100, cooldown: 1s}}"""
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        await push(app, {"respond_status": 500, "sleep_ms": 100})
        await server.reached(5, timeout=15)
        job_id = server.requests[0].headers["x-busgate-job-id"]
        record = await settled(app, job_id, State.DEAD)
        await trio.sleep(1.0)
    assert [r.headers["x-busgate-attempt"] for r in server.requests] == ["1", "2", "3", "4", "5"]
    assert [a.outcome for a in record.attempts] == [Outcome.RETRY] * 4 + [Outcome.DEAD]
    assert all(0.095 <= a.duration < 0.3 for a in record.attempts), record.attempts
    # Each gap is the answer (100 ms) plus 50-100 % of 200, 400, 500, 500 ms.
    steps = [0.2, 0.4, 0.5, 0.5]
    for gap, step in zip(server.gaps(), steps, strict=True):
        assert 0.1 + step / 2 - 0.01 <= gap <= 0.1 + step + 0.15, (server.gaps(), steps)


def arrivals(server: TimedServer) -> dict[str, list[float]]:
    """When each job's attempts arrived, by the job's payload tag ``n``."""
    out: dict[str, list[float]] = {}
    for req, at in zip(server.requests, server.arrived, strict=True):
        out.setdefault(json.loads(req.body)["n"], []).append(at)
    return out


@pytest.fixture
def west_of_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The daemon's host on a time zone five hours behind UTC."""
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def test_retry_after_forms_as_the_backend_sends_them(
    server: TimedServer,
    tmp_path: Path,
    store_kind: str,
    request: pytest.FixtureRequest,
    west_of_utc: None,
) -> None:
    """Every form of Retry-After (RFC 9110: delta-seconds or an HTTP-date in any of its three
    forms, all GMT), and the ones to ignore; on a host not on UTC, where the asctime form
    was read as local time."""
    topic = f"""backend: {server.url}
concurrency: 8
timeout: 2s
retry: {{max_attempts: 2, backoff: 200ms, max_backoff: 200ms}}
circuit: {{failures: 100, cooldown: 1s}}"""
    soon = time.gmtime(time.time() + 2.5)
    cases = {
        "seconds": ("1", 429, 0.95, 1.4),
        "date": (time.strftime("%a, %d %b %Y %H:%M:%S GMT", soon), 503, 0.9, 3.0),
        "rfc850": (time.strftime("%A, %d-%b-%y %H:%M:%S GMT", soon), 429, 0.9, 3.0),
        "asctime": (time.strftime("%a %b %e %H:%M:%S %Y", soon), 503, 0.9, 3.0),
        "past": ("Wed, 21 Oct 2015 07:28:00 GMT", 503, 0.0, 0.3),
        "garbage": ("soon-ish", 503, 0.09, 0.35),
        "negative": ("-5", 429, 0.09, 0.35),
    }
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        jobs = [
            {"n": n, "respond_status": s, "retry_after": v} for n, (v, s, _, _) in cases.items()
        ]
        jobs.append({"n": "huge", "respond_status": 503, "retry_after": "99999999"})
        pushed_at = time.time()
        await push(app, *jobs)
        await server.reached(2 * len(cases) + 1, timeout=10)
        await trio.sleep(0.5)
        seen = arrivals(server)
        huge_id = next(r.headers["x-busgate-job-id"] for r in server.requests if b"huge" in r.body)
        assert app.store is not None
        (huge,) = await app.store.get_job(huge_id)
    for n, (_value, _status, least, most) in cases.items():
        first, second = seen[n]
        assert least <= second - first <= most, (n, second - first)
    assert len(seen["huge"]) == 1
    assert huge.state is State.DELAYED and huge.attempt == 1
    assert pushed_at + 86400 - 5 < huge.run_at < pushed_at + 86400 + 5


async def test_overloaded_answers_cannot_loop_forever(
    server: TimedServer, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    topic = f"""backend: {server.url}
timeout: 2s
retry: {{max_attempts: 3, backoff: 50ms, max_backoff: 50ms}}
circuit: {{failures: 100, cooldown: 1s}}"""
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        await push(app, {"n": 1, "respond_status": 503, "retry_after": "0"})
        await server.reached(3, timeout=10)
        job_id = server.requests[0].headers["x-busgate-job-id"]
        record = await settled(app, job_id, State.DEAD)
        await trio.sleep(0.5)
    assert len(server.requests) == 3
    assert [a.outcome for a in record.attempts] == [Outcome.RETRY, Outcome.RETRY, Outcome.DEAD]


async def test_rate_limit_is_honoured_after_its_burst(
    server: TimedServer, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    topic = f"""backend: {server.url}
concurrency: 4
rate_limit: 20/s"""
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        began = trio.current_time()
        await push(app, *({"n": n} for n in range(80)))
        await server.reached(80, timeout=15)
    at = server.arrived
    # A second's burst at once, then 20 per second.
    assert at[19] - began < 0.5
    rate = (75 - 25) / (at[75] - at[25])
    assert 19 <= rate <= 21, rate
    assert server.peak_running <= 4


async def test_concurrency_cap_and_recorded_durations(
    server: TimedServer, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    topic = f"""backend: {server.url}
concurrency: 3"""
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        await push(app, *({"n": n, "sleep_ms": 50 * (n % 4)} for n in range(24)))
        await server.reached(24, timeout=15)
        ids = [r.headers["x-busgate-job-id"] for r in server.requests]
        records = [await settled(app, i, State.DONE) for i in ids]
    assert server.peak_running == 3
    for req, rec in zip(server.requests, records, strict=True):
        slept = json.loads(req.body)["sleep_ms"] / 1000
        (attempt,) = rec.attempts
        # Loose above: a busy 2-core CI machine delays the answer's reading, not its start.
        assert slept <= attempt.duration < slept + 0.25, (slept, attempt.duration)


async def test_circuit_probes_one_at_a_time_and_closes_by_itself(
    server: TimedServer, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    topic = f"""backend: {server.url}
concurrency: 4
retry: {{max_attempts: 50, backoff: 10ms, max_backoff: 10ms}}
circuit: {{failures: 3, cooldown: 300ms}}"""
    server.fail_with = 500
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        dispatcher = app._dispatchers["q", "t"]
        await push(app, *({"n": n} for n in range(12)))
        with trio.fail_after(10):
            while dispatcher.circuit.statistics().opened_total < 1:
                await trio.sleep(0.005)
        # Deliveries already sent when it opened reach the server meanwhile (within the
        # 300 ms cooldown): they are not probes.
        await trio.sleep(0.1)
        first_opened = len(server.requests)
        with trio.fail_after(10):
            while dispatcher.circuit.statistics().opened_total < 4:
                await trio.sleep(0.01)
        opened = len(server.requests)
        assert dispatcher.statistics().circuit.state.value in ("open", "half-open")
        server.fail_with = None
        assert app.store is not None
        with trio.fail_after(10):
            while (await app.store.stats("q", "t")).done_total < 12:
                await trio.sleep(0.02)
        assert dispatcher.statistics().circuit.state.value == "closed"
        await trio.sleep(0.1)
        stats_store = await app.store.stats("q", "t")
        counted = dispatcher.statistics()
    # At most concurrency + failures - 1 before it opened; then one probe per cooldown
    # (300, 600, 1200 ms), alone.
    assert first_opened <= 4 + 2, first_opened
    assert opened == first_opened + 3, (first_opened, opened)
    probes = server.arrived[first_opened:opened]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    # The cooldown doubles after each failed probe (300 ms, 600, 1.2 s); never early, late
    # by a little on a busy machine.
    assert all(c - 0.01 <= g < c + 0.2 for g, c in zip(gaps, [0.6, 1.2], strict=True)), gaps
    assert (stats_store.dead_total, stats_store.leased, stats_store.ready) == (0, 0, 0)
    # What the dispatcher counted is what the store recorded, and what the backend got.
    assert (counted.done_total, counted.retried_total, counted.dead_total) == (
        stats_store.done_total,
        stats_store.retried_total,
        0,
    )
    assert counted.delivered_total == len(server.requests) == 12 + stats_store.retried_total


async def test_a_late_failure_from_before_the_circuit_opened_is_not_the_probes(
    server: TimedServer, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    # A fails after 1 s; B at once, opening the circuit; C probes at 300 ms and takes 2 s.
    # A's failure, half-open, was taken for the probe's: the circuit reopened and let D out
    # as a second probe at 1.6 s, with C still running.
    topic = f"""backend: {server.url}
concurrency: 2
retry: {{max_attempts: 5, backoff: 30s, max_backoff: 30s}}
circuit: {{failures: 1, cooldown: 300ms}}"""
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        dispatcher = app._dispatchers["q", "t"]
        await push(
            app,
            {"k": "A", "respond_status": 500, "sleep_ms": 1000},
            {"k": "B", "respond_status": 500},
        )
        with trio.fail_after(10):
            while dispatcher.circuit.statistics().opened_total < 1:
                await trio.sleep(0.005)
        await push(app, {"k": "C", "sleep_ms": 2000}, {"k": "D"})
        await server.reached(4, timeout=15)
    order = [json.loads(r.body)["k"] for r in server.requests]
    assert order[2:] == ["C", "D"], order
    # D went out only once the probe C had succeeded and closed the circuit.
    assert server.arrived[3] - server.arrived[2] >= 2.0, server.gaps()
    assert dispatcher.circuit.statistics().opened_total == 1


async def test_a_delivery_longer_than_its_lease_runs_once(
    recording_fpm: PhpFpm,
    record: Path,
    tmp_path: Path,
    store_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    topic = f"""backend: fastcgi://127.0.0.1:{recording_fpm.address.port}
script: {recording_fpm.script("record.php")}
concurrency: 2
timeout: 6s
lease: 1s
retry: {{max_attempts: 1}}"""
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        await push(app, {"n": 1, "sleep_ms": 2500}, {"n": 2, "sleep_ms": 3500})
        received = await wait_received(record, 2)
        records = [await settled(app, r.job_id, State.DONE, timeout=10) for r in received]
        await trio.sleep(1.5)
        assert app.store is not None
        stats = await app.store.stats("q", "t")
    assert len(read_received(record)) == 2
    assert (stats.done_total, stats.expired_total, stats.dead_total) == (2, 0, 0)
    durations = sorted(rec.attempts[0].duration for rec in records)
    assert 2.5 <= durations[0] < 2.8 and 3.5 <= durations[1] < 3.8, durations


async def test_a_hanging_backend_times_out_and_is_retried(
    server: TimedServer, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    topic = f"""backend: {server.url}
timeout: 400ms
retry: {{max_attempts: 2, backoff: 100ms, max_backoff: 100ms}}"""
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        await push(app, {"n": 1, "sleep_ms": 3000})
        await server.reached(2, timeout=10)
        job_id = server.requests[0].headers["x-busgate-job-id"]
        rec = await settled(app, job_id, State.DEAD)
    assert [a.outcome for a in rec.attempts] == [Outcome.RETRY, Outcome.DEAD]
    assert all("timeout" in (a.error or "") and a.status is None for a in rec.attempts)
    assert all(0.4 <= a.duration < 0.5 for a in rec.attempts), rec.attempts
    assert 0.45 <= server.gaps()[0] <= 0.6


async def test_delayed_jobs_are_not_early_and_priorities_share_3_2_1(
    server: TimedServer, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    topic = f"""backend: {server.url}
concurrency: 1
paused: true"""
    config = config_for(tmp_path, store_kind, request, topic)
    drop_in = config.parent / "conf.d" / "q.yaml"
    async with running_daemon(config) as app:
        for n, priority in enumerate(["high"] * 6 + ["normal"] * 4 + ["low"] * 2):
            await command(
                app, "XADD", "q", "*", "payload", json.dumps({"n": n}), "priority", priority
            )
        due = time.time() + 1.2
        await command(app, "ZADD", "q", f"{due:.3f}", json.dumps({"n": "zadd"}))
        # The daemon's clock at the push, not after its reply, starts the delay: take the
        # time before sending (after the reply, it was late by a round trip, and the job
        # looked 0.09 ms early on a loaded machine).
        xadd_due = time.time() + 0.8
        await command(app, "XADD", "q", "*", "payload", json.dumps({"n": "xadd"}), "delay", "800")
        drop_in.write_text(drop_in.read_text().replace("paused: true", "paused: false"))
        report = await app.reload(load_config(config))
        assert report.toggled == (("q", "t"),)
        await server.reached(14, timeout=10)
    order = [json.loads(r.body)["n"] for r in server.requests]
    assert order[:12] == [0, 6, 1, 10, 7, 2, 3, 8, 4, 11, 9, 5], order
    when = dict(zip(order, server.arrived_wall, strict=True))
    # Never early; late by well under a second on a busy machine: the pushes rang the
    # scheduler's timer, which sleeps until the first is due.
    assert xadd_due <= when["xadd"] < xadd_due + 1.0
    assert due <= when["zadd"] < due + 1.0


async def test_a_job_past_a_thousand_attempts_still_backs_off(
    server: TimedServer, tmp_path: Path
) -> None:
    """2 ** attempt overflowed a float past attempt 1024: the delay raised OverflowError."""
    topic = f"""backend: {server.url}
concurrency: 1
retry: {{max_attempts: 1030, backoff: 1ms, max_backoff: 1ms}}
circuit: {{failures: 10000, cooldown: 1s}}"""
    server.fail_with = 500
    config = config_for(tmp_path, "sqlite", None, topic)  # type: ignore[arg-type]
    async with running_daemon(config) as app:
        await push(app, {"n": 1})
        await server.reached(1030, timeout=60)
        job_id = server.requests[0].headers["x-busgate-job-id"]
        rec = await settled(app, job_id, State.DEAD)
    assert len(rec.attempts) == 1030


async def test_pause_stops_new_deliveries_and_holds_across_reload_and_restart(
    server: TimedServer,
    tmp_path: Path,
    store_kind: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the jobs in a paused topic's buffer (two per unit of concurrency) were still
    delivered, one round after another: a slow topic went on for minutes after a pause."""
    topic = f"""backend: {server.url}
concurrency: 2"""
    config = config_for(tmp_path, store_kind, request, topic)
    drop_in = config.parent / "conf.d" / "q.yaml"
    async with running_daemon(config) as app:
        assert app.store is not None
        real_release = app.store.release
        released: list[list[int]] = []

        async def release(jobs: Sequence[Job]) -> int:
            released.append([json.loads(job.payload)["n"] for job in jobs])
            return await real_release(jobs)

        monkeypatch.setattr(app.store, "release", release)
        await push(app, *({"n": n, "sleep_ms": 400} for n in range(10)))
        await server.reached(2, timeout=5)
        dispatcher = app._dispatchers["q", "t"]
        dispatcher.pause()
        paused_at = len(server.requests)
        await trio.sleep(1.5)
        # The two in flight finish; nothing new starts.
        assert len(server.requests) == paused_at, (paused_at, len(server.requests))
        # The buffered jobs went back in one store call, in the order they were reserved.
        assert released == [[2, 3, 4, 5]]
        stats = await app.store.stats("q", "t")
        assert (stats.done_total, stats.leased, stats.ready) == (2, 0, 8)
        # A reload that leaves the topic alone keeps the pause.
        (config.parent / "conf.d" / "other.yaml").write_text(
            f"queue: other\ntopics:\n  t:\n    backend: {server.url}\n"
        )
        await app.reload(load_config(config))
        await trio.sleep(0.5)
        assert len(server.requests) == paused_at and app._dispatchers["q", "t"].paused
        app._dispatchers["q", "t"].resume()
        await server.reached(paused_at + 1, timeout=5)
        drop_in.write_text(drop_in.read_text() + "    paused: true\n")
        await app.reload(load_config(config))
        stopped_at = len(server.requests)
        await trio.sleep(1)
        assert len(server.requests) == stopped_at
    async with running_daemon(config) as app:  # a restart: the file's pause holds
        await trio.sleep(1)
        assert len(server.requests) == stopped_at
        assert app.store is not None
        stats = await app.store.stats("q", "t")
        assert stats.ready == 10 - stopped_at and stats.leased == 0
        drop_in.write_text(drop_in.read_text().replace("paused: true", "paused: false"))
        await app.reload(load_config(config))
        with trio.fail_after(10):
            while (await app.store.stats("q", "t")).done_total < 10:
                await trio.sleep(0.05)
    ids = [r.headers["x-busgate-job-id"] for r in server.requests]
    assert len(ids) == len(set(ids)) == 10
    assert all(r.headers["x-busgate-attempt"] == "1" for r in server.requests)


async def test_a_reload_changes_the_rate_without_losing_or_repeating_a_job(
    server: TimedServer, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    topic = f"""backend: {server.url}
concurrency: 4
rate_limit: 10/s"""
    config = config_for(tmp_path, store_kind, request, topic)
    drop_in = config.parent / "conf.d" / "q.yaml"
    async with running_daemon(config) as app:
        await push(app, *({"n": n} for n in range(90)))
        await server.reached(25, timeout=10)
        slow = (24 - 12) / (server.arrived[24] - server.arrived[12])
        drop_in.write_text(drop_in.read_text().replace("10/s", "40/s"))
        await app.reload(load_config(config))
        reloaded = len(server.requests)
        assert app._dispatchers["q", "t"].statistics().rate_limit == 40
        await server.reached(90, timeout=10)
        assert app.store is not None
        with trio.fail_after(5):
            while (stats := await app.store.stats("q", "t")).done_total < 90:
                await trio.sleep(0.02)
    assert 9.5 <= slow <= 10.5, slow
    # The new dispatcher starts with a fresh second's burst (40), then 40 per second.
    fast = (89 - (reloaded + 45)) / (server.arrived[89] - server.arrived[reloaded + 45])
    assert 38 <= fast <= 42, fast
    ids = [r.headers["x-busgate-job-id"] for r in server.requests]
    assert len(set(ids)) == len(ids) == 90 and stats.leased == 0


async def test_two_topics_on_a_refusing_php_fpm_lose_and_burn_nothing(
    tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    record = tmp_path / "fpm" / "received.jsonl"
    fpm = PhpFpm(tmp_path / "fpm", env={"BUSGATE_RECORD": str(record)})  # not started yet
    topic = f"""backend: fastcgi://127.0.0.1:{fpm.address.port}
script: {fpm.script("record.php")}
concurrency: 3
retry: {{max_attempts: 2, backoff: 50ms, max_backoff: 100ms}}
circuit: {{failures: 2, cooldown: 200ms}}"""
    config = config_for(tmp_path, store_kind, request, topic)
    drop_in = config.parent / "conf.d" / "q.yaml"
    # A second topic of the same queue on the same pool.
    drop_in.write_text(drop_in.read_text() + "  u:\n" + drop_in.read_text().split("  t:\n")[1])
    try:
        async with running_daemon(config) as app:
            await push(app, *({"n": n} for n in range(15)))
            dispatchers = [app._dispatchers["q", name] for name in ("t", "u")]
            with trio.fail_after(10):
                while min(d.circuit.statistics().opened_total for d in dispatchers) < 2:
                    await trio.sleep(0.02)
            assert app.store is not None
            for name in ("t", "u"):
                stats = await app.store.stats("q", name)
                assert (stats.dead_total, stats.ready + stats.delayed + stats.leased) == (0, 15)
            await trio.to_thread.run_sync(fpm.start)
            received = await wait_received(record, 30, timeout=20)
            topics = [("q", "t"), ("q", "u")]
            with trio.fail_after(10):
                while min(s.done_total for s in await app.store.stats_many(topics)) < 15:
                    await trio.sleep(0.05)
            await trio.sleep(0.2)
            for name, dispatcher in zip("tu", dispatchers, strict=True):
                stats = await app.store.stats("q", name)
                counted = dispatcher.statistics()
                assert counted.circuit.state.value == "closed"
                assert (stats.leased, stats.ready, stats.delayed, stats.dead_total) == (0, 0, 0, 0)
                assert (counted.done_total, counted.retried_total, counted.dead_total) == (
                    stats.done_total,
                    stats.retried_total,
                    stats.dead_total,
                )
    finally:
        fpm.stop()
    assert len(received) == 30 and all(r.attempt == 1 for r in received)
    names = [r.server["HTTP_X_BUSGATE_TOPIC"] for r in received]
    assert sorted(names) == ["t"] * 15 + ["u"] * 15


async def test_a_pause_landing_on_the_probe_does_not_wedge_the_circuit(
    server: TimedServer,
    tmp_path: Path,
    store_kind: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator pauses while the half-open probe is being reserved: the probe goes back
    to the store undelivered.  After a resume the circuit must let a probe through again;
    before, it waited forever for the outcome of a probe that never ran."""
    topic = f"""backend: {server.url}
concurrency: 1
retry: {{max_attempts: 5, backoff: 10ms, max_backoff: 10ms}}
circuit: {{failures: 1, cooldown: 200ms}}"""
    server.fail_with = 500
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        assert app.store is not None
        dispatcher = app._dispatchers["q", "t"]
        real_reserve = app.store.reserve
        paused_on_probe = trio.Event()

        async def reserve(queue: str, topic: str, limit: int, lease: float) -> list[Job]:
            jobs = await real_reserve(queue, topic, limit, lease)
            half_open = dispatcher.circuit.state is CircuitState.HALF_OPEN
            if jobs and half_open and not paused_on_probe.is_set():
                dispatcher.pause()  # lands while the probe is on its way to a worker
                paused_on_probe.set()
            return jobs

        monkeypatch.setattr(app.store, "reserve", reserve)
        await push(app, {"n": 1}, {"n": 2})
        with trio.fail_after(5):
            await paused_on_probe.wait()
        await trio.sleep(0.3)
        assert len(server.requests) == 1  # the first failure; the probe never went out
        server.fail_with = None
        dispatcher.resume()
        with trio.fail_after(5):
            while (await app.store.stats("q", "t")).done_total < 2:
                await trio.sleep(0.02)
        assert dispatcher.circuit.state is CircuitState.CLOSED
    # The first job's failed attempt and its retry, the second job once: nothing burned.
    assert sorted(r.headers["x-busgate-attempt"] for r in server.requests) == ["1", "1", "2"]


async def test_dead_on_is_the_topics_list(server: TimedServer, tmp_path: Path) -> None:
    topic = f"""backend: {server.url}
retry: {{max_attempts: 3, backoff: 50ms, max_backoff: 50ms}}
dead_on: [409, 301]"""
    async with running_daemon(config_for(tmp_path, "sqlite", None, topic)) as app:  # type: ignore[arg-type]
        await push(app, *({"n": s, "respond_status": s} for s in (409, 301, 404)))
        await server.reached(5, timeout=10)
        by_status = {
            json.loads(r.body)["n"]: r.headers["x-busgate-job-id"] for r in server.requests
        }
        records = {s: await settled(app, i, State.DEAD) for s, i in by_status.items()}
    assert {s: len(r.attempts) for s, r in records.items()} == {409: 1, 301: 1, 404: 3}


async def test_a_bug_judging_an_answer_fails_the_attempt_not_the_daemon(
    server: TimedServer,
    tmp_path: Path,
    store_kind: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backoff overflow past attempt 1024 raised there and stopped every topic: any bug
    # in judging an answer now fails that attempt, as a bug in making the request does.
    real = decide
    calls: list[int | None] = []

    def buggy_once(delivery: Delivery, **options: Any) -> Decision:
        calls.append(delivery.status)
        if len(calls) == 1:
            raise ZeroDivisionError("a bug")
        return real(delivery, **options)

    monkeypatch.setattr(dispatcher_module, "decide", buggy_once)
    topic = f"""backend: {server.url}
retry: {{max_attempts: 3, backoff: 10ms, max_backoff: 10ms}}"""
    async with running_daemon(config_for(tmp_path, store_kind, request, topic)) as app:
        await push(app, {"n": 1})
        await server.reached(2, timeout=10)
        first = await settled(app, server.requests[0].headers["x-busgate-job-id"], State.DONE)
        await push(app, {"n": 2})  # the daemon goes on
        await server.reached(3, timeout=10)
        second = await settled(app, server.requests[2].headers["x-busgate-job-id"], State.DONE)
    (failed, done) = first.attempts
    assert failed.outcome is Outcome.RETRY and failed.status is None
    assert failed.error == (
        "internal: busgate could not judge the response: ZeroDivisionError: a bug"
    )
    assert (done.outcome, done.status) == (Outcome.DONE, 200)
    assert [a.outcome for a in second.attempts] == [Outcome.DONE]


async def test_a_bug_in_an_attempt_listener_costs_its_figures_not_the_deliveries(
    server: TimedServer,
    tmp_path: Path,
    store_kind: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Telemetry hears every attempt once the store has it; an exception there stopped every
    # topic (and after a restart the next outcome did it again).
    from gateway.telemetry import Telemetry

    def broken(self: Telemetry, *args: Any) -> None:
        raise ZeroDivisionError("a telemetry bug")

    monkeypatch.setattr(Telemetry, "record", broken)
    caplog.set_level("ERROR", logger="busgate.dispatch")
    config = config_for(tmp_path, store_kind, request, f"backend: {server.url}")
    async with running_daemon(config) as app:
        for n in range(3):
            await push(app, {"n": n})
        await server.reached(3, timeout=10)
        records = [
            await settled(app, r.headers["x-busgate-job-id"], State.DONE) for r in server.requests
        ]
        await push(app, {"n": 3})  # the daemon goes on
        await server.reached(4, timeout=10)
    assert [[a.outcome for a in r.attempts] for r in records] == [[Outcome.DONE]] * 3
    # Once, with its traceback: not a line per job.
    (logged,) = [r for r in caplog.records if "attempt listener failed" in r.getMessage()]
    assert logged.exc_info is not None and "a telemetry bug" in str(logged.exc_info[1])
    assert "more like it" not in logged.getMessage()  # the first: nothing held back yet
