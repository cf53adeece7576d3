"""The store fixture: every contract test runs against each store implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.storage.base import Store
from adapters.storage.redis_client import RedisClient
from adapters.storage.redis_routing import Cluster, Standalone
from adapters.storage.redis_store import RedisStore
from adapters.storage.sqlite import SQLiteStore
from tests.support.redis import RedisCluster, RedisServer
from tests.support.stores import running_store


class FakeClock:
    """Wall-clock stand-in: tests move time forward to expire leases and delays."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "sqlite":
        opened = await SQLiteStore.open(str(tmp_path / "busgate.db"), clock=clock)
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        opened = RedisStore(Standalone(RedisClient(server.address)), clock=clock)
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        opened = RedisStore(Cluster(cluster.seeds, RedisClient), clock=clock)
    async with running_store(opened):
        yield opened
