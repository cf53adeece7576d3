"""busgate run under a (simulated) systemd: the datagrams it sends to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from tests.support.daemon import write_config


async def collect(sock: trio.socket.SocketType, seen: list[str]) -> None:
    while True:
        seen.append((await sock.recv(4096)).decode())


async def wait_for(seen: list[str], wanted: str, after: int = 0) -> int:
    """Index of the first message from ``after`` on that contains ``wanted``."""
    with trio.fail_after(15):
        while True:
            for index in range(after, len(seen)):
                if wanted in seen[index]:
                    return index
            await trio.sleep(0.01)


async def test_ready_watchdog_reloading_and_stopping(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    path = str(tmp_path / "notify.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "NOTIFY_SOCKET": path,
            "WATCHDOG_USEC": "400000",  # ping every 0.2 s
        },
    )
    seen: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, sock, seen)
            ready = await wait_for(seen, "READY=1")
            assert "STATUS=0 queues, 0 topics; redis protocol on 127.0.0.1:" in seen[ready]
            await trio.sleep(0.7)
            assert sum("WATCHDOG=1" in message for message in seen) >= 3, seen
            daemon.send_signal(signal.SIGHUP)
            reloading = await wait_for(seen, "RELOADING=1", ready + 1)
            assert "MONOTONIC_USEC=" in seen[reloading]
            await wait_for(seen, "READY=1", reloading + 1)
            daemon.send_signal(signal.SIGTERM)
            await wait_for(seen, "STOPPING=1", reloading + 1)
            assert await trio.to_thread.run_sync(daemon.wait, 15) == 0
            nursery.cancel_scope.cancel()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        sock.close()
