"""The store fixture: every contract test runs against each store implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.storage.base import Store
from adapters.storage.sqlite import SQLiteStore


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


@pytest.fixture(params=["sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Store]:
    opened = await SQLiteStore.open(str(tmp_path / "busgate.db"), clock=clock)
    try:
        yield opened
    finally:
        await opened.aclose()
