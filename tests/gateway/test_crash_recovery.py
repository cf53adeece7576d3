"""At-least-once across a crash: SIGKILL the daemon mid-run, restart it, lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
import trio

from tests.support.daemon import read_received, wait_received, write_config
from tests.support.phpfpm import PhpFpm
from tests.support.ports import free_port, wait_connectable
from tests.support.redis import RedisServer

JOBS = 10_000


def queue_file(fpm: PhpFpm) -> str:
    return f"""\
        queue: crash
        topics:
          work:
            backend: fastcgi://127.0.0.1:{fpm.address.port}
            script: {fpm.script("record.php")}
            concurrency: 8
            timeout: 2s
            lease: 3s
        """


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--log-level", "warning", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_sigkill_mid_run_then_restart_delivers_every_job(
    store: str,
    recording_fpm: PhpFpm,
    record: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    port = free_port()
    if store == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        store_line = f"store: redis://127.0.0.1:{server.port}/0\n"
    else:
        store_line = f"store: sqlite:{tmp_path / 'crash.db'}\n"
    config = write_config(tmp_path, {"crash": queue_file(recording_fpm)})
    text = config.read_text().replace("resp: 127.0.0.1:0", f"resp: 127.0.0.1:{port}")
    config.write_text(
        store_line
        + "\n".join(line for line in text.splitlines() if not line.startswith("store:"))
        + "\n"
    )
    log = tmp_path / "daemon.log"

    daemon = start_daemon(config, log)
    try:
        await trio.to_thread.run_sync(wait_connectable, "127.0.0.1", port)

        def produce() -> None:
            client = redis.Redis(port=port)
            for start in range(0, JOBS, 500):
                payloads = [b"job-%d" % n for n in range(start, start + 500)]
                assert client.lpush("crash", *payloads) == 500
            client.close()

        await trio.to_thread.run_sync(produce)
        await wait_received(record, JOBS // 3, timeout=60)
        daemon.send_signal(signal.SIGKILL)  # mid-run: jobs in flight, leases held
        daemon.wait(10)
        delivered_before = len(read_received(record))
        assert delivered_before < JOBS, "the crash came too late to prove anything"

        daemon = start_daemon(config, log)
        with trio.fail_after(120):
            while True:
                seen = {r.body for r in read_received(record)}
                if len(seen) >= JOBS:
                    break
                await trio.sleep(0.2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    assert seen == {b"job-%d" % n for n in range(JOBS)}, textwrap.shorten(log.read_text(), 2000)
