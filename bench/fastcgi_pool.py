"""Benchmark: the FastCGI pool against a bare raw-socket loop, same php-fpm, same run.

php-fpm runs a no-op script with ``pm = static`` and 8 children.  Both sides drive it over 8
kept-alive connections with 8 concurrent workers and send byte-identical requests; the raw
side is the least a client can do (one send of pre-encoded records, read until the
END_REQUEST record), so the ratio is what the pool's state machine, CGI parsing and
bookkeeping cost.  Absolute numbers on a shared 2-core machine are noise; the ratio is the
result.

    .venv/bin/python -m bench.fastcgi_pool [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from pathlib import Path

import trio

from bench import shares
from fastcgi.address import Address
from fastcgi.connection import ClientConnection
from fastcgi.events import BeginRequest, Params, Stdin
from fastcgi.pool import ConnectionPool, PoolLimits
from fastcgi.spec import RecordType
from tests.support.phpfpm import PhpFpm

CONNECTIONS = 8
_HEADER = struct.Struct("!BBHHBx")


def request_env(script: str) -> dict[bytes, bytes]:
    return {
        b"SCRIPT_FILENAME": script.encode(),
        b"SCRIPT_NAME": b"/noop.php",
        b"REQUEST_URI": b"/noop",
        b"REQUEST_METHOD": b"POST",
        b"CONTENT_TYPE": b"application/json",
        b"CONTENT_LENGTH": b"0",
        b"SERVER_PROTOCOL": b"HTTP/1.1",
        b"GATEWAY_INTERFACE": b"CGI/1.1",
    }


def encoded_request(env: dict[bytes, bytes]) -> bytes:
    conn = ClientConnection()
    return (
        conn.send(BeginRequest(keep_conn=True)) + conn.send(Params.of(env)) + conn.send(Stdin(b""))
    )


async def raw_worker(address: Address, wire: bytes, count: int) -> None:
    if address.is_unix:
        stream = await trio.open_unix_socket(address.path)
    else:
        stream = await trio.open_tcp_stream(address.host, address.port)
    buffer = bytearray()
    for _ in range(count):
        await stream.send_all(wire)
        while True:  # walk record headers until END_REQUEST has fully arrived
            pos, done = 0, False
            while len(buffer) - pos >= 8:
                _, kind, _, length, padding = _HEADER.unpack_from(buffer, pos)
                end = pos + 8 + length + padding
                if end > len(buffer):
                    break
                pos = end
                if kind == RecordType.END_REQUEST:
                    done = True
                    break
            if done:
                del buffer[:pos]
                break
            buffer += await stream.receive_some(65536)
    await stream.aclose()


async def run_raw(address: Address, wire: bytes, total: int) -> float:
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for count in shares(total, CONNECTIONS):
            nursery.start_soon(raw_worker, address, wire, count)
    return total / (time.perf_counter() - start)


async def run_pool(address: Address, env: dict[bytes, bytes], total: int) -> float:
    # Built (and so pair-encoded) once, as the gateway builds a topic's fixed parameters
    # once; the pool frames them into records on every request.
    params = Params.of(env)
    async with ConnectionPool(address, limits=PoolLimits(max_connections=CONNECTIONS)) as pool:

        async def worker(count: int) -> None:
            for _ in range(count):
                response = await pool.request(params)
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}")

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for count in shares(total, CONNECTIONS):
                nursery.start_soon(worker, count)
        rate = total / (time.perf_counter() - start)
        stats = pool.statistics()
        assert stats.failures_total == 0 and stats.opened_total == CONNECTIONS
    return rate


async def main(requests: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fpm = PhpFpm(Path(tmp), max_children=CONNECTIONS)
        fpm.start()
        try:
            env = request_env(fpm.script("noop.php"))
            wire = encoded_request(env)
            await run_raw(fpm.address, wire, 2000)  # warm-up: connections, php-fpm's children
            raw_rates, pool_rates, raw_cpu, pool_cpu = [], [], [], []
            for _ in range(rounds):  # interleaved, so drift on the machine hits both
                cpu = time.process_time()
                raw_rates.append(await run_raw(fpm.address, wire, requests))
                raw_cpu.append((time.process_time() - cpu) / requests * 1e6)
                cpu = time.process_time()
                pool_rates.append(await run_pool(fpm.address, env, requests))
                pool_cpu.append((time.process_time() - cpu) / requests * 1e6)
        finally:
            fpm.stop()
    raw, pool = statistics.median(raw_rates), statistics.median(pool_rates)
    pairs = statistics.median(p / r for p, r in zip(pool_rates, raw_rates, strict=True))
    print(
        f"php-fpm no-op, pm=static 8 children, {CONNECTIONS} connections, {requests} requests"
        f" x {rounds} rounds (median)"
    )
    print(f"  raw loop : {raw:9.0f} req/s   rounds: {', '.join(f'{r:.0f}' for r in raw_rates)}")
    print(f"  pool     : {pool:9.0f} req/s   rounds: {', '.join(f'{r:.0f}' for r in pool_rates)}")
    print(
        f"  ratio    : {pool / raw:.2f}x  (target >= 0.9x); median of the rounds' ratios"
        f" {pairs:.2f}x"
    )
    # CPU time of this process per request: steadier than rates on a shared machine, and
    # the pool's own cost is the difference.
    print(
        f"  CPU/req  : raw {statistics.median(raw_cpu):.1f} us,"
        f" pool {statistics.median(pool_cpu):.1f} us"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trio.run(main, args.requests, args.rounds)
