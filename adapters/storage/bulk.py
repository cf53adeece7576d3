"""Bulk dead-letter operations on any store: everything matching a filter, at a rate.

Built on the store's ``list_dead`` pages and its id-based ``replay_dead``/``delete_dead``, so
both stores share one implementation.  Jobs are collected first and acted on afterwards: a
replay changes the dead list it would otherwise be paging through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from adapters.storage.base import Store
from adapters.storage.jobs import DeadFilter

#: Ids handled per store call.
CHUNK = 100

Progress = Callable[[int, int], None]  # (done so far, total)


async def matching_dead_ids(
    store: Store, queue: str, topic: str, where: DeadFilter, limit: int | None = None
) -> list[str]:
    """Ids of the dead jobs matching ``where``, newest first (at most ``limit``)."""
    ids: list[str] = []
    cursor: str | None = None
    while limit is None or len(ids) < limit:
        page = await store.list_dead(queue, topic, where, cursor, CHUNK)
        ids += [job.id for job in page.jobs]
        if page.cursor is None:
            break
        cursor = page.cursor
    return ids if limit is None else ids[:limit]


async def replay_where(
    store: Store,
    queue: str,
    topic: str,
    where: DeadFilter,
    *,
    rate: float | None = None,
    progress: Progress | None = None,
) -> int:
    """Replay every dead job matching ``where``; at most ``rate`` jobs per second if given."""
    ids = await matching_dead_ids(store, queue, topic, where)
    return await replay_ids(store, queue, topic, ids, rate=rate, progress=progress)


async def replay_ids(
    store: Store,
    queue: str,
    topic: str,
    ids: list[str],
    *,
    rate: float | None = None,
    progress: Progress | None = None,
) -> int:
    """Replay these dead jobs (others are skipped); at most ``rate`` jobs per second if given."""
    return await _in_chunks(
        ids, lambda chunk: store.replay_dead(queue, topic, chunk), rate, progress
    )


async def delete_where(
    store: Store, queue: str, topic: str, where: DeadFilter, *, progress: Progress | None = None
) -> int:
    """Forget every dead job matching ``where``."""
    ids = await matching_dead_ids(store, queue, topic, where)
    return await _in_chunks(
        ids, lambda chunk: store.delete_dead(queue, topic, chunk), None, progress
    )


async def _in_chunks(
    ids: list[str],
    act: Callable[[list[str]], Awaitable[int]],
    rate: float | None,
    progress: Progress | None,
) -> int:
    if rate is not None and rate <= 0:
        raise ValueError("a replay rate must be positive")
    size = CHUNK if rate is None else max(1, min(CHUNK, int(rate)))
    done = 0
    started = trio.current_time()
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        done += await act(chunk)
        if progress is not None:
            progress(start + len(chunk), len(ids))
        if rate is not None:
            # Pace by the schedule, not by sleeping a fixed time: slow store calls do not
            # make a replay slower than asked.
            await trio.sleep_until(started + (start + len(chunk)) / rate)
    return done
