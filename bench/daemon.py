"""Benchmarks of the whole daemon, each against a raw baseline measured in the same run.

    e2e      jobs pushed over RESP (100 per LPUSH, one redis-py producer) -> store ->
             php-fpm no-op (8 static children) -> ack, against a raw trio FastCGI client
             driving the same pool with 8 connections and sending busgate's own request
             (the same CGI params and body), measured before and after; a raw client's
             minimal request is reported too, and the CPU each process spent per job
             (2 cores: the run is bound by their sum)
    ingest   redis-benchmark -t lpush (50 clients) against the gateway (queue "mylist",
             topic paused) and against redis-server, unpipelined (-n 100000) and with -P 16
             (-n 1000000); and
             against a bare trio server that only replies, the ceiling for one trio process;
             with busgate's CPU per push, and how much of its one core that was
    latency  push -> the backend's first byte at 1,000 jobs/s: p50 and p99, from the time each
             push was due on a fixed schedule (open loop: see bench/pusher.py)
    rss      daemon RSS with 100 topics and 1,000,000 pending jobs (the daemon's own; on the
             Redis store the jobs are in redis-server)

The daemon runs in this process (as in production, one process), logging at ``info`` as
``busgate run`` does by default (to /dev/null); producers run in separate processes, as real
ones do.  e2e, ingest and latency measure the daemon twice: at the default priority, and at
the ``Nice=`` that systemd/busgate.service gives it (see ``niced``); the raw client of e2e
is measured at both too.

e2e and ingest run ``--rounds`` rounds, each measuring the baseline next to the daemon and
taking their ratio within the round: a shared 2-core machine drifts by more than the margins
measured here from one minute to the next, and a drift hits both sides of a round alike.  The
median of the rounds' ratios is the result; the range is printed beside it (``Rounds``).

    .venv/bin/python -m bench.daemon [e2e|ingest|latency|rss ...] [--store sqlite|redis|both]
        [--jobs 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis
import trio

from adapters.delivery.fastcgi import FastCGIBackend
from adapters.storage.jobs import Job, Priority, new_job_id, new_trace_id
from bench import pusher as pusher_module
from bench.fastcgi_pool import encoded_request, request_env, run_raw
from fastcgi.connection import ClientConnection
from fastcgi.events import Params
from fastcgi.pooling import send_all
from gateway import heap, logs
from gateway.app import App, build_backend
from gateway.config import load_config
from tests.support.phpfpm import PhpFpm
from tests.support.redis import RedisServer

CHILDREN = 8
HERE = Path(__file__).resolve().parent
PUSHER = HERE / "pusher.py"
#: Jobs per LPUSH of e2e's producer: one process pushing one job a command waits a round trip
#: each and measures itself (1,810 jobs/s on the Redis store here), not the delivery path the
#: target is about.  Ingest measures single pushes (redis-benchmark, 50 clients).
E2E_BATCH = 100
#: redis-benchmark's pushes per run, by pipeline depth: its default -n unpipelined.  At -P 16
#: redis-server takes 100,000 in under 0.1 s, so the 50 clients' connecting and the first
#: batches weigh on both sides: here redis-server measured 0.81-1.10M/s over such runs and
#: 1.14-1.28M/s over runs of 1,000,000, busgate 94k/s and 118-140k/s.
INGEST_REQUESTS = {1: 100_000, 16: 1_000_000}
UNIT = HERE.parent / "systemd" / "busgate.service"


def unit_nice() -> int:
    """The ``Nice=`` of systemd/busgate.service (0 without one): how production runs busgate."""
    match = re.search(r"^Nice=(-?[0-9]+)[ \t]*$", UNIT.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def priorities() -> list[int]:
    """The priorities to measure the daemon at: the default, and the unit's if it can be set."""
    wanted = unit_nice()
    if wanted == 0:
        return [0]
    try:
        with niced(wanted):
            pass
    except PermissionError:
        print(f"(Nice={wanted} needs root or CAP_SYS_NICE: measured at the default priority only)")
        return [0]
    return [0, wanted]


@contextlib.contextmanager
def niced(value: int) -> Iterator[None]:
    """This thread, and the threads and processes it starts meanwhile, at nice ``value``.

    Linux keeps a nice value per thread, so this is the daemon's (trio's) thread and the
    threads the daemon starts, as ``Nice=`` in the unit gives the whole daemon; the php-fpm
    and redis-server started before keep the default.  Producers reset their own
    (``default_priority``).
    """
    before = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, value)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


def default_priority() -> None:
    """preexec_fn of a producer process: nice 0, whatever the thread that started it runs at
    (raising one's nice value needs no privilege)."""
    os.setpriority(os.PRIO_PROCESS, 0, 0)


def write_config(directory: Path, store: str, queues: dict[str, str]) -> Path:
    (directory / "conf.d").mkdir(parents=True, exist_ok=True)
    main = directory / "busgate.yaml"
    main.write_text(
        f"store: {store}\nlisten: {{resp: '127.0.0.1:0', http: '127.0.0.1:0'}}\n"
        "shutdown_timeout: 5s\n"
    )
    for name, text in queues.items():
        (directory / "conf.d" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return main


@asynccontextmanager
async def daemon(config: Path) -> AsyncIterator[App]:
    async with trio.open_nursery() as outer:
        outer.start_soon(logs.flushing)  # as `busgate run` does
        async with trio.open_nursery() as nursery:
            app: App = await nursery.start(App(load_config(config)).run)
            heap.settle()  # as `busgate run` does once the daemon is up
            try:
                yield app
            finally:
                app.shutdown(timeout=5)
        outer.cancel_scope.cancel()


@asynccontextmanager
async def stores(kind: str, tmp: Path) -> AsyncIterator[str]:
    """A store URL: a fresh SQLite file, or a fresh redis-server."""
    if kind == "sqlite":
        yield f"sqlite:{tmp / 'bench.db'}"
        return
    server = RedisServer(tmp / "redis")
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


def pusher(
    port: int,
    queue: str,
    count: int,
    *,
    rate: float = 0,
    batch: int = E2E_BATCH,
    ready: bool = False,
) -> list[str]:
    argv = [sys.executable, str(PUSHER), str(port), queue, str(count), str(rate), str(batch)]
    return [*argv, "--ready"] if ready else argv


async def push_timed(
    port: int, queue: str, count: int, on_start: Callable[[], None] = lambda: None
) -> float:
    """Run the pusher; return the perf_counter time of its first push (once it has connected),
    calling ``on_start`` then."""
    process = await trio.lowlevel.open_process(
        pusher(port, queue, count, ready=True),
        stdout=subprocess.PIPE,
        preexec_fn=default_priority,
    )
    assert process.stdout is not None
    try:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(64)
            if not chunk:
                break
            line += chunk
        started = time.perf_counter()
        on_start()
        status = await process.wait()
    finally:
        process.kill()
        await process.stdout.aclose()
    if line != b"ready\n" or status != 0:
        raise RuntimeError(f"the pusher failed (exit status {status}, said {line!r})")
    return started


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 600) -> None:
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.005)


# -- rounds ------------------------------------------------------------------------------------


class Rounds:
    """A rate measured round by round beside its baseline; the result is the median of the
    rounds' ratios, not the ratio of two medians, so that each ratio compares runs made
    within seconds of each other."""

    def __init__(self) -> None:
        self.baselines: list[float] = []
        self.rates: list[float] = []

    def add(self, baseline: float, rate: float) -> None:
        self.baselines.append(baseline)
        self.rates.append(rate)

    @property
    def ratios(self) -> list[float]:
        return [rate / base for rate, base in zip(self.rates, self.baselines, strict=True)]

    def summary(self, target: float | None) -> str:
        """``"10801/s = 0.52x (rounds 0.47-0.55; target >= 0.5x)"``: the median rate too."""
        ratios = self.ratios
        spread = f"rounds {min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "one round"
        wanted = f"; target >= {target}x" if target is not None else ""
        return (
            f"{statistics.median(self.rates):9.0f}/s = {statistics.median(ratios):.2f}x"
            f" ({spread}{wanted})"
        )


# -- CPU accounting ----------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User and system CPU seconds ``pid`` has used (with its children's, as php-fpm's
    workers are its master's, if ``children``); 0 for a process that has gone."""
    pids = [pid]
    if children:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += map(int, (task / "children").read_text().split())
    total = 0
    for each in pids:
        with contextlib.suppress(OSError):
            # Fields 14 and 15 (utime, stime), counted after the command name's ")".
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def store_pid(url: str) -> int | None:
    """The redis-server behind a store URL; None for SQLite (a thread of the daemon)."""
    if not url.startswith("redis://"):
        return None
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


class CpuMeter:
    """CPU seconds per process group from ``start`` to ``stop``: this process (the daemon,
    or the raw client), the store's redis-server and php-fpm (master and workers)."""

    def __init__(self, fpm: PhpFpm, store: int | None = None) -> None:
        assert fpm.process is not None
        self._fpm = fpm.process.pid
        self._store = store
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {"this": time.process_time()}
        if self._store is not None:
            now["redis-server"] = cpu_seconds(self._store)
        now["php-fpm"] = cpu_seconds(self._fpm, children=True)
        # The pusher, once it has exited and been waited for (nothing else exits meanwhile).
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        now["pusher (start-up included)"] = reaped.ru_utime + reaped.ru_stime
        return now

    def start(self) -> None:
        self.used = self._now()

    def stop(self) -> None:
        self.used = {name: end - self.used[name] for name, end in self._now().items()}

    def per_job(self, jobs: int, this: str) -> str:
        """``"busgate 62 us, redis-server 15 us, php-fpm 57 us"``, naming this process ``this``."""
        return ", ".join(
            f"{this if name == 'this' else name} {used / jobs * 1e6:.0f} us"
            for name, used in self.used.items()
            if used or not name.startswith("pusher")
        )


# -- e2e ---------------------------------------------------------------------------------------


def e2e_topic(fpm: PhpFpm) -> str:
    return f"""\
        queue: e2e
        topics:
          noop:
            backend: {fpm.address}
            script: {fpm.script("noop.php")}
            concurrency: {CHILDREN}
            timeout: 10s
        """


def busgate_request(config: Path) -> bytes:
    """The request busgate sends php-fpm for one of the pusher's jobs, byte for byte.

    The raw client replays it, so both sides ask php-fpm for the same work (the job headers
    are CGI params php parses on every request) and the ratio is the gateway's own cost.
    """
    (topic,) = load_config(config).queues["e2e"].topics
    backend = build_backend(topic)
    assert isinstance(backend, FastCGIBackend)
    now = time.time()
    job = Job(
        new_job_id(),
        "e2e",
        "noop",
        b'{"n":12345}',
        {},
        Priority.NORMAL,
        1,
        now,
        now,
        new_trace_id(),
    )
    body = backend.body(job)
    return ClientConnection().send_request(Params.of(backend.params(job, body)), body)


async def bench_e2e(kinds: list[str], jobs: int, rounds: int) -> None:
    nices = priorities()
    # Per store and priority: the rounds, and the last round's CPU meters (daemon, raw client).
    results: dict[tuple[str, int], tuple[Rounds, CpuMeter, CpuMeter]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fpm = PhpFpm(tmp / "fpm", max_children=CHILDREN)
        fpm.start()
        try:
            minimal = encoded_request(request_env(fpm.script("noop.php")))
            same = busgate_request(
                write_config(tmp / "shape", "sqlite:unused", {"e2e": e2e_topic(fpm)})
            )
            await run_raw(fpm.address, same, 2000)  # warm-up: connections, php-fpm's children
            raw_minimal = await run_raw(fpm.address, minimal, jobs)
            for kind in kinds:
                for nice in nices:
                    measured = Rounds()
                    # The raw client before and after each daemon run: the run's baseline is
                    # their mean, so a drift during the round is split between them.
                    raw_meter = CpuMeter(fpm)
                    with niced(nice):
                        before = await run_raw(fpm.address, same, jobs)
                    for round_ in range(rounds):
                        # A fresh store each round: the daemon's check that the store recorded
                        # every job counts this round's only.  Started before ``niced``: the
                        # unit's Nice= is busgate's, not its store's.
                        here = tmp / f"{kind}{nice}-{round_}"
                        async with stores(kind, here) as url:
                            config = write_config(here, url, {"e2e": e2e_topic(fpm)})
                            meter = CpuMeter(fpm, store_pid(url))
                            with niced(nice):
                                rate = await _e2e_rate(config, jobs, meter)
                        with niced(nice):
                            raw_meter.start()
                            after = await run_raw(fpm.address, same, jobs)
                            raw_meter.stop()
                        measured.add((before + after) / 2, rate)
                        before = after
                    results[kind, nice] = (measured, meter, raw_meter)
        finally:
            fpm.stop()
    print(
        f"e2e: RESP push -> store -> php-fpm no-op ({CHILDREN} static children) -> ack,"
        f" {jobs} jobs pushed by one redis-py producer, {E2E_BATCH} per LPUSH,"
        f" {rounds} rounds (median)"
    )
    print(
        f"  raw trio FastCGI client, {CHILDREN} connections, minimal request, nice   0:"
        f" {raw_minimal:8.0f} req/s (8 params, no body)"
    )
    for (kind, nice), (measured, meter, raw_meter) in results.items():
        print(
            f"  raw trio FastCGI client, {CHILDREN} connections, busgate's request, nice {nice:3}:"
            f" {statistics.median(measured.baselines):8.0f} req/s"
        )
        print(f"    CPU per request (last round): {raw_meter.per_job(jobs, 'client')}")
        target = 0.5 if kind == "redis" else None  # the target; SQLite's is reported
        print(
            f"  busgate, {kind:6} store, nice {nice:3}{_as_the_unit(nice)}:"
            f" {measured.summary(target)}"
        )
        print(f"    CPU per job (last round): {meter.per_job(jobs, 'busgate')}")


async def _e2e_rate(config: Path, jobs: int, meter: CpuMeter) -> float:
    """Jobs per second from the first push to the last outcome recorded; ``meter`` measures
    the same stretch."""
    async with daemon(config) as app:
        port = int(app.resp_address.rpartition(":")[2])
        assert app.store is not None
        dispatcher = app.dispatcher("e2e", "noop")
        start = await push_timed(port, "e2e", jobs, meter.start)

        # The dispatcher counts a job done once the store has recorded it.  Asking it costs
        # no store round trip, which a poll every 5 ms would add to the very process being
        # measured (about 1.5% of the run).
        async def all_done() -> bool:
            return dispatcher.statistics().done_total >= jobs

        await until(all_done)
        rate = jobs / (time.perf_counter() - start)
        meter.stop()
        recorded = (await app.store.stats("e2e", "noop")).done_total
        if recorded < jobs:
            raise RuntimeError(f"the store recorded {recorded} of {jobs} jobs")
        return rate


def _as_the_unit(nice: int) -> str:
    return " (as busgate.service runs it)" if nice and nice == unit_nice() else ""


# -- ingest ------------------------------------------------------------------------------------


def redis_benchmark(port: int, pipeline: int, requests: int) -> float:
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-t",
            "lpush",
            "-c",
            "50",
            "-n",
            str(requests),
            "-P",
            str(pipeline),
            "-q",
        ],
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=default_priority,
    ).stdout
    match = re.search(r"LPUSH.*?: ([\d.]+) requests per second", out.replace("\r", "\n"))
    if match is None:
        raise RuntimeError(f"unexpected redis-benchmark output: {out!r}")
    return float(match.group(1))


async def bench_ingest(kinds: list[str], requests: dict[int, int], rounds: int) -> None:
    """``requests``: how many pushes redis-benchmark sends, per pipeline depth."""
    nices = priorities()
    results: dict[tuple[str, int], dict[int, tuple[Rounds, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        baseline = RedisServer(tmp / "baseline")
        baseline.start()
        try:
            floor = await bare_trio_rates(requests)
            for kind in kinds:
                for nice in nices:
                    async with stores(kind, tmp / f"{kind}{nice}") as url:
                        queue = """\
                            queue: mylist
                            topics:
                              held:
                                backend: fastcgi://127.0.0.1:9
                                script: /srv/none.php
                                paused: true
                            """
                        config = write_config(tmp / f"{kind}{nice}", url, {"mylist": queue})
                        with niced(nice):
                            async with daemon(config) as app:
                                port = int(app.resp_address.rpartition(":")[2])
                                results[kind, nice] = await _ingest_rounds(
                                    baseline.port, port, requests, rounds
                                )
        finally:
            baseline.stop()
    print(f"ingest: redis-benchmark -t lpush -c 50, {rounds} rounds (median)")
    for pipeline, target in ((1, 0.5), (16, 0.1)):
        raw = statistics.median(
            base for rates in results.values() for base in rates[pipeline][0].baselines
        )
        print(f"  -P {pipeline:2} -n {requests[pipeline]}: redis-server {raw:9.0f}/s")
        print(
            f"         bare trio server  {floor[pipeline]:9.0f}/s ="
            f" {floor[pipeline] / raw:.2f}x (replies only: the most one trio process gets)"
        )
        for (kind, nice), rates in results.items():
            measured, cpu = rates[pipeline]
            print(
                f"         busgate ({kind:6}, nice {nice:3}) {measured.summary(target)}"
                f"{_as_the_unit(nice)}"
            )
            print(
                f"           busgate's CPU: {cpu / requests[pipeline] * 1e6:.1f} us per push,"
                f" {cpu * measured.rates[-1] / requests[pipeline]:.2f} of a core"
                " (its event loop is one thread)"
            )


async def _ingest_rounds(
    baseline: int, port: int, requests: dict[int, int], rounds: int
) -> dict[int, tuple[Rounds, float]]:
    """redis-benchmark against redis-server at ``baseline`` and the daemon at ``port``, round
    by round; with the daemon's CPU seconds in the last round, per pipeline depth."""
    measured = {pipeline: Rounds() for pipeline in requests}
    cpu = dict.fromkeys(requests, 0.0)
    for _ in range(rounds):
        for pipeline, count in requests.items():
            raw = await trio.to_thread.run_sync(redis_benchmark, baseline, pipeline, count)
            rate, cpu[pipeline] = await _ingest_rate(port, pipeline, count)
            measured[pipeline].add(raw, rate)
    return {pipeline: (measured[pipeline], cpu[pipeline]) for pipeline in requests}


async def _ingest_rate(port: int, pipeline: int, requests: int) -> tuple[float, float]:
    """redis-benchmark's rate against the daemon in this process, and the CPU seconds this
    process spent meanwhile."""
    cpu = time.process_time()
    rate = await trio.to_thread.run_sync(redis_benchmark, port, pipeline, requests)
    return rate, time.process_time() - cpu


async def _reply_only(stream: trio.SocketStream) -> None:
    # One ":1" per command received: no parsing beyond counting, no store, no checks.  It
    # reads and writes the socket itself, as busgate's RESP server does.
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    with sock, contextlib.suppress(OSError):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                return
            await send_all(sock, b":1\r\n" * data.count(b"*"), lambda: None)


async def bare_trio_rates(requests: dict[int, int]) -> dict[int, float]:
    """What redis-benchmark gets from a trio server that only replies: the ceiling on what
    busgate's RESP server (one trio process) could reach, measured in the same run."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, _reply_only, listeners)
        rates = {
            p: await trio.to_thread.run_sync(redis_benchmark, port, p, n)
            for p, n in requests.items()
        }
        nursery.cancel_scope.cancel()
    return rates


# -- latency -----------------------------------------------------------------------------------

LATENCY_PHP = """<?php
// Appends "job-id request-start-time" once per delivery: the backend's first moment.
file_put_contents(getenv('BUSGATE_RECORD'),
    $_SERVER['HTTP_X_BUSGATE_JOB_ID'] . ' ' . $_SERVER['REQUEST_TIME_FLOAT'] . "\\n",
    FILE_APPEND | LOCK_EX);
"""


async def bench_latency(kinds: list[str], jobs: int, rate: float) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "latency.php"
        script.write_text(LATENCY_PHP)
        record = tmp / "starts.txt"
        fpm = PhpFpm(tmp / "fpm", max_children=CHILDREN, env={"BUSGATE_RECORD": str(record)})
        fpm.start()
        nices = priorities()
        results = {}
        try:
            for kind in kinds:
                for nice in nices:
                    record.unlink(missing_ok=True)
                    async with stores(kind, tmp / f"{kind}{nice}") as url:
                        queue = f"""\
                            queue: lat
                            topics:
                              t:
                                backend: {fpm.address}
                                script: {script}
                                concurrency: {CHILDREN}
                            """
                        config = write_config(tmp / f"{kind}{nice}", url, {"lat": queue})
                        with niced(nice):
                            sent = await _push_paced(config, jobs, rate, record)
                    starts = dict(line.split() for line in record.read_text().splitlines())
                    # From the time each push was due: one sent late (the producer's own
                    # hiccup, or a store slow to answer its connection) counts as waiting.
                    latencies = sorted(float(starts[i]) - due for i, (due, _) in sent.items())
                    p50 = statistics.median(latencies)
                    p99 = latencies[int(len(latencies) * 0.99)]
                    late = max(at - due for due, at in sent.values())
                    span = max(at for _, at in sent.values()) - min(at for _, at in sent.values())
                    results[kind, nice] = (p50, p99, late, (jobs - 1) / span)
        finally:
            fpm.stop()
    print(
        f"latency: push due -> php-fpm request start, {jobs} jobs at {rate:.0f} jobs/s, one"
        f" XADD each on a fixed schedule over {pusher_module.PACED_CONNECTIONS} connections"
    )
    for (kind, nice), (p50, p99, late, sent_rate) in results.items():
        print(
            f"  {kind:6}, nice {nice:3}: p50 {p50 * 1000:6.2f} ms (target <= 2), p99"
            f" {p99 * 1000:6.2f} ms (target <= 10){_as_the_unit(nice)};"
            f" sent at {sent_rate:.0f} jobs/s, at most {late * 1000:.1f} ms late"
        )


async def _push_paced(
    config: Path, jobs: int, rate: float, record: Path
) -> dict[str, tuple[float, float]]:
    """Job id -> the times its push was due and sent, once the backend has recorded every
    start."""
    async with daemon(config) as app:
        port = int(app.resp_address.rpartition(":")[2])
        done = await trio.run_process(
            pusher(port, "lat", jobs, rate=rate, batch=1),
            capture_stdout=True,
            preexec_fn=default_priority,
        )
        sent: dict[str, tuple[float, float]] = json.loads(done.stdout)
        await until(lambda: _recorded(record, jobs), 60)
    return sent


async def _recorded(path: Path, count: int) -> bool:
    return path.exists() and path.read_text().count("\n") >= count


# -- rss ---------------------------------------------------------------------------------------


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def bench_rss(kinds: list[str], jobs: int, topics: int) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for kind in kinds:
            async with stores(kind, tmp / kind) as url:
                queues = {
                    f"q{i}": f"""\
                        queue: q{i}
                        topics:
                          t:
                            backend: fastcgi://127.0.0.1:9
                            script: /srv/none.php
                            paused: true
                        """
                    for i in range(topics)
                }
                config = write_config(tmp / kind, url, queues)
                # A separate daemon process, so its RSS is the daemon's alone.
                port = _free_port()
                text = config.read_text().replace(
                    "resp: '127.0.0.1:0'", f"resp: '127.0.0.1:{port}'"
                )
                config.write_text(text)
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "gateway.cli",
                        "--log-level",
                        "error",
                        "run",
                        "-c",
                        str(config),
                    ],
                    env={**os.environ, "PYTHONPATH": str(HERE.parent)},
                )
                try:
                    await trio.to_thread.run_sync(_wait_port, port)
                    idle = rss_of(process.pid)
                    per_queue = jobs // topics
                    async with trio.open_nursery() as nursery:
                        for i in range(topics):
                            nursery.start_soon(trio.run_process, pusher(port, f"q{i}", per_queue))
                    await trio.sleep(2)
                    results[kind] = (idle, rss_of(process.pid))
                finally:
                    process.terminate()
                    process.wait(30)
    print(f"rss: daemon with {topics} topics (paused) and {jobs} pending jobs")
    for kind, (idle, loaded) in results.items():
        print(
            f"  {kind:6}: {idle / 2**20:6.1f} MB idle, {loaded / 2**20:6.1f} MB with the"
            " jobs pending (target <= 100 MB)"
        )


def _free_port() -> int:
    from tests.support.ports import free_port

    return free_port()


def _wait_port(port: int) -> None:
    from tests.support.ports import wait_connectable

    wait_connectable("127.0.0.1", port, timeout=60)


async def main(args: argparse.Namespace) -> None:
    kinds = ["sqlite", "redis"] if args.store == "both" else [args.store]
    # As `busgate run` logs by default, a line per delivered job, to the cheapest sink there
    # is (journald, on a real host, costs more).
    logs.setup("info", open(os.devnull, "w"))  # noqa: SIM115  # open for the whole run
    for which in args.which or ["e2e", "ingest", "latency", "rss"]:
        if which == "e2e":
            await bench_e2e(kinds, args.jobs, args.rounds)
        elif which == "ingest":
            await bench_ingest(kinds, INGEST_REQUESTS, args.rounds)
        elif which == "latency":
            await bench_latency(kinds, 5000, 1000.0)
        elif which == "rss":
            await bench_rss(kinds, args.pending, 100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("which", nargs="*", choices=["e2e", "ingest", "latency", "rss", []])
    parser.add_argument("--store", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3, help="of e2e and ingest")
    trio.run(main, parser.parse_args())
