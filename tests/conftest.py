"""Shared fixtures: real php-fpm pools and the flup sample backend on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastcgi.address import Address
from tests.support.phpfpm import PhpFpm
from tests.support.ports import wait_connectable
from tests.support.redis import RedisCluster, RedisServer


@pytest.fixture(scope="session")
def php_fpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhpFpm]:
    """One php-fpm pool on a free 127.0.0.1 port (8 static children) for the session."""
    fpm = PhpFpm(tmp_path_factory.mktemp("fpm-tcp"))
    fpm.start()
    yield fpm
    fpm.stop()


@pytest.fixture(scope="session")
def php_fpm_unix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhpFpm]:
    """The same pool on a unix socket."""
    fpm = PhpFpm(tmp_path_factory.mktemp("fpm-unix"), unix=True)
    fpm.start()
    yield fpm
    fpm.stop()


class SampleBackend:
    """The flup sample backend (gateway.sample_backend) in a subprocess."""

    def __init__(self, workdir: Path) -> None:
        self.socket = workdir / "sample.sock"
        self.record = workdir / "received.jsonl"
        self.address = Address(path=str(self.socket))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.sample_backend",
                "--socket",
                str(self.socket),
                "--record",
                str(self.record),
            ],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the flup sample backend did not start")
            time.sleep(0.02)
        wait_connectable(str(self.socket))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def sample_backend(tmp_path: Path) -> Iterator[SampleBackend]:
    backend = SampleBackend(tmp_path)
    yield backend
    backend.stop()


@pytest.fixture(scope="session")
def recording_fpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhpFpm]:
    """php-fpm whose record.php appends every request it gets to BUSGATE_RECORD."""
    workdir = tmp_path_factory.mktemp("fpm-record")
    fpm = PhpFpm(workdir, env={"BUSGATE_RECORD": str(workdir / "received.jsonl")})
    fpm.start()
    yield fpm
    fpm.stop()


@pytest.fixture
def record(recording_fpm: PhpFpm) -> Path:
    """The recording file, emptied for this test."""
    path = Path(recording_fpm.env["BUSGATE_RECORD"])
    path.unlink(missing_ok=True)
    return path


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that freeze, break or reconfigure it."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def noeviction_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, whose maxmemory refuses writes rather than evict."""
    server = RedisServer(tmp_path / "redis", args=["--maxmemory-policy", "noeviction"])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside pytest's (root-only) temp tree, so another user can reach it."""
    path = Path(tempfile.mkdtemp(prefix="busgate-shared-"))
    path.chmod(0o755)
    yield path
    for directory, _, _ in os.walk(path):
        os.chmod(directory, 0o755)  # so that it can be removed
    shutil.rmtree(path)
