"""Benchmark: the stores' push and reserve+ack rates, wake-up latency, and Redis memory per job.

Redis figures are ratios against ``redis-benchmark -t lpush,rpop -P 16`` run against the same
redis-server in the same run (same payload size).  SQLite figures are absolute jobs/s with
``synchronous=FULL`` (every acknowledged push is on disk).

    .venv/bin/python -m bench.storage [--jobs 100000] [--payload 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from adapters.storage.base import Finish, Store
from adapters.storage.fanout import Filter
from adapters.storage.jobs import Attempt, NewJob, Outcome
from adapters.storage.redis_client import RedisClient
from adapters.storage.redis_routing import Standalone
from adapters.storage.redis_store import RedisStore
from adapters.storage.sqlite import SQLiteStore
from bench import shares
from tests.support.redis import RedisServer

ROUTES = [("work", Filter())]
BATCH = 100
WORKERS = 8


def redis_benchmark(port: int, payload: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-t",
            "lpush,rpop",
            "-P",
            "16",
            "-n",
            "200000",
            "-d",
            str(payload),
            "-q",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rates = {}
    for line in out.replace("\r", "\n").splitlines():
        match = re.match(r"(LPUSH|RPOP).*?: ([\d.]+) requests per second", line)
        if match:
            rates[match.group(1)] = float(match.group(2))
    return rates


async def in_parallel(total: int, work: Callable[[int], Awaitable[int]]) -> float:
    """Run ``work(count)`` on WORKERS tasks sharing ``total`` jobs; return jobs/s.  Each
    says how many jobs it moved, and a rate is only given over all of them."""
    moved = []

    async def one(count: int) -> None:
        moved.append(await work(count))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for count in shares(total, WORKERS):
            nursery.start_soon(one, count)
    elapsed = time.perf_counter() - start
    if sum(moved) != total:
        raise RuntimeError(f"{sum(moved)} of {total} jobs were moved")
    return total / elapsed


async def push_rate(store: Store, queue: str, jobs: int, payload: bytes) -> float:
    async def work(count: int) -> int:
        for start in range(0, count, BATCH):
            await store.push(queue, ROUTES, [NewJob(payload)] * min(BATCH, count - start))
        return count

    return await in_parallel(jobs, work)


async def reserve_ack_rate(store: Store, queue: str, jobs: int) -> float:
    async def work(count: int) -> int:
        done = 0
        while done < count:
            batch = await store.reserve(queue, "work", min(BATCH, count - done), 60)
            if not batch:
                break  # another worker took the rest: in_parallel counts
            await store.finish(
                [
                    Finish(
                        job,
                        Attempt(job.attempt, 0.0, 0.001, Outcome.DONE, status=200),
                        Outcome.DONE,
                    )
                    for job in batch
                ]
            )
            done += len(batch)
        return done

    return await in_parallel(jobs, work)


async def wake_latency(pusher: Store, waiter: Store, queue: str, rounds: int = 200) -> float:
    """p50 seconds from the start of a push to the idle topic's reserve returning it."""
    samples: list[float] = []

    async def dispatcher(
        pushed_at: list[float], task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await waiter.wait_for_jobs(queue, "work", trio.current_time() + 5)
            if await waiter.reserve(queue, "work", 1, 60):
                samples.append(time.perf_counter() - pushed_at[0])
                return

    for _ in range(rounds):
        pushed_at = [0.0]
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher, pushed_at)
            await trio.sleep(0.002)
            pushed_at[0] = time.perf_counter()
            await pusher.push(queue, ROUTES, [NewJob(b"ping")])
    return statistics.median(samples)


async def bench_redis(jobs: int, payload: bytes, rounds: int) -> None:
    lpush, rpop, pushed, acked = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            store = RedisStore(Standalone(RedisClient(server.address)))
            other_host = RedisStore(Standalone(RedisClient(server.address)))
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                await nursery.start(other_host.run)
                for _ in range(rounds):  # interleaved: machine drift hits both sides alike
                    baseline = redis_benchmark(server.port, len(payload))
                    lpush.append(baseline["LPUSH"])
                    rpop.append(baseline["RPOP"])
                    server.cli("FLUSHALL")
                    pushed.append(await push_rate(store, "bench", jobs, payload))
                    acked.append(await reserve_ack_rate(store, "bench", jobs))
                local = await wake_latency(store, store, "wake")
                remote = await wake_latency(store, other_host, "wake")
                server.cli("FLUSHALL")
                before = int(_info(server, "used_memory"))
                await push_rate(store, "memory", 100_000, b"x" * 200)
                per_job = (int(_info(server, "used_memory")) - before) / 100_000
                nursery.cancel_scope.cancel()
        finally:
            server.stop()
    median = statistics.median
    base = median(lpush)
    push_ratio = median(p / b for p, b in zip(pushed, lpush, strict=True))
    ack_ratio = median(a / b for a, b in zip(acked, lpush, strict=True))
    print(
        f"redis-benchmark -t lpush,rpop -P 16 -d {len(payload)}, {rounds} rounds (median):"
        f" LPUSH {base:.0f}/s, RPOP {median(rpop):.0f}/s"
    )
    print(
        f"  push, batches of {BATCH}, {WORKERS} tasks : {median(pushed):8.0f} jobs/s ="
        f" {push_ratio:.3f}x LPUSH (target >= 0.2x)"
    )
    print(
        f"  reserve {BATCH} + ack {BATCH}, {WORKERS} tasks: {median(acked):8.0f} jobs/s ="
        f" {ack_ratio:.3f}x LPUSH (target >= 0.1x)"
    )
    print(
        f"  push -> reserve on an idle topic, p50: same host {local * 1000:.2f} ms,"
        f" other host (pub/sub) {remote * 1000:.2f} ms (target <= 5 ms)"
    )
    print(
        f"  used_memory per pending job, 200-byte payload: {per_job:.0f} bytes"
        f" = payload + {per_job - 200:.0f} (target <= payload + 200)"
    )


def _info(server: RedisServer, field: str) -> str:
    for line in server.cli("INFO", "memory").splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(field)


async def bench_sqlite(jobs: int, payload: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = await SQLiteStore.open(str(Path(tmp) / "bench.db"))
        try:
            pushed = await push_rate(store, "bench", jobs, payload)
            acked = await reserve_ack_rate(store, "bench", jobs)
            latency = await wake_latency(store, store, "wake")
        finally:
            await store.aclose()
    print("sqlite (WAL, group commit, pushes fsynced before they are answered):")
    print(f"  push, batches of {BATCH}, {WORKERS} tasks : {pushed:8.0f} jobs/s (target >= 20000)")
    print(f"  reserve {BATCH} + ack {BATCH}, {WORKERS} tasks: {acked:8.0f} jobs/s (target >= 5000)")
    print(f"  push -> reserve on an idle topic, p50: {latency * 1000:.2f} ms (target <= 5 ms)")


async def main(jobs: int, payload_size: int, rounds: int) -> None:
    payload = b"p" * payload_size
    await bench_redis(jobs, payload, rounds)
    await bench_sqlite(jobs, payload)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.jobs, args.payload, args.rounds)
