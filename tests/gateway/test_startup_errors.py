"""`busgate run` with a store it cannot use: one line saying why, exit status 1, no traceback."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import running_daemon, write_config
from tests.support.ports import free_port
from tests.support.redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, store: str) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path / "etc", {})
    config.write_text(config.read_text().replace(f"sqlite:{tmp_path / 'etc'}/busgate.db", store))
    return busgate_run(config)


def busgate_run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert line.startswith("busgate: cannot start: ")
    for word in words:
        assert word in line, line


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password="right")
    server.start()
    try:
        yield server
    finally:
        server.stop(hard=True)


def test_nothing_listening(tmp_path: Path) -> None:
    refused(run(tmp_path, f"redis://127.0.0.1:{free_port()}/0"), "Connection refused")


def test_wrong_password(tmp_path: Path, redis: RedisServer) -> None:
    refused(run(tmp_path, f"redis://:wrong@127.0.0.1:{redis.port}/0"), "WRONGPASS")


def test_acl_user_without_the_wake_up_channel(tmp_path: Path, redis: RedisServer) -> None:
    # Redis 7 gives a new ACL user no pub/sub channels unless granted (&*).
    redis.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "+@all", "resetchannels")
    refused(run(tmp_path, f"redis://app:s3cret@127.0.0.1:{redis.port}/0"), "NOPERM", "PSUBSCRIBE")


def test_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(8192))
    refused(run(tmp_path, f"sqlite:{junk}"), "not a database")


async def test_the_startup_line_does_not_show_the_store_password(
    tmp_path: Path, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path / "etc", {})
    config.write_text(
        config.read_text().replace(
            f"sqlite:{tmp_path / 'etc'}/busgate.db", f"redis://:right@127.0.0.1:{redis.port}/0"
        )
    )
    caplog.set_level(logging.INFO)
    async with running_daemon(config):
        pass
    (line,) = [r.getMessage() for r in caplog.records if "busgate running" in r.getMessage()]
    assert "right@" not in line and "********@127.0.0.1" in line


def test_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "etc", {})
        config.write_text(
            config.read_text().replace("resp: 127.0.0.1:0", f"resp: 127.0.0.1:{port}")
        )
        done = busgate_run(config)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "address already in use" in done.stderr.lower()
