"""A store running for the length of a block, as the daemon runs it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from adapters.storage.base import Store

S = TypeVar("S", bound=Store)


@asynccontextmanager
async def running_store(store: S) -> AsyncIterator[S]:
    """``store`` with its ``run()`` going (Redis: the wake-up subscription), closed after."""
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        try:
            yield store
        finally:
            await store.aclose()
            nursery.cancel_scope.cancel()
