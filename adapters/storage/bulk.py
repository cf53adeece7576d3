"""Bulk dead-letter operations on any store: everything matching a filter, at a rate.

Built on the store's ``list_dead`` pages and its id-based ``replay_dead``/``delete_dead``, so
both stores share one implementation.  Jobs are collected first and acted on afterwards: a
replay changes the dead list it would otherwise be paging through.

A ``Confirmation`` names the set a dry run matched, so that what an operator confirmed is
what is acted on while new failures keep arriving: see ``Confirmation``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from adapters.storage.base import Store, dead_cursor
from adapters.storage.jobs import DeadFilter

#: Ids handled per store call.
CHUNK = 100

Progress = Callable[[int, int], None]  # (done so far, total)


@dataclass(frozen=True, slots=True)
class Matched:
    """The dead jobs a filter matched in one listing, newest first."""

    ids: list[str]
    #: (died_at, id) of the newest of them: dead lists are ordered by it.
    newest: tuple[float, str] | None


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What a dry run matched, in a few bytes: a bound and a digest, not the ids.

    A filter may match 100,000 dead jobs; their ids would be megabytes to hand to a browser
    and back.  Dead jobs are listed newest first, so the bound (the newest matched job) makes
    a later listing skip the failures that arrived since, at no cost: it starts there, as a
    page cursor does.  A bound on time alone is not exact (two daemons' clocks, a failure
    stamped just before the dry run but written just after it), so the digest of the ids
    checks that the later listing found exactly the confirmed set.
    """

    count: int
    digest: str
    newest: tuple[float, str]

    @classmethod
    def of(cls, matched: Matched) -> Confirmation:
        assert matched.newest is not None, "nothing matched: nothing to confirm"
        return cls(len(matched.ids), _digest(matched.ids), matched.newest)

    def matches(self, ids: Sequence[str]) -> bool:
        return len(ids) == self.count and _digest(ids) == self.digest

    def token(self) -> str:
        died_at, job_id = self.newest
        return f"{self.count}/{self.digest}/{died_at!r}/{job_id}"

    @classmethod
    def parse(cls, token: str) -> Confirmation:
        """Raises ``ValueError`` for a token no dry run handed out."""
        parts = token.split("/", 3)
        if len(parts) != 4:
            raise ValueError(f"invalid confirmation {token!r}")
        count, digest, died_at, job_id = parts
        newest = (float(died_at), job_id)  # ValueError if not a number
        if not (count.isdigit() and len(digest) == 32 and job_id and math.isfinite(newest[0])):
            raise ValueError(f"invalid confirmation {token!r}")
        return cls(int(count), digest, newest)

    def start(self) -> str:
        """The page cursor that lists from the newest confirmed job on, that job included.

        A cursor lists what sorts after (died_at, id), ids descending at one time; the id
        followed by NUL is the least string above the id, so the newest job is the first.
        """
        died_at, job_id = self.newest
        return dead_cursor(died_at, job_id + "\0")


async def matching_dead(
    store: Store,
    queue: str,
    topic: str,
    where: DeadFilter,
    *,
    within: Confirmation | None = None,
) -> Matched:
    """The dead jobs matching ``where``, listed once; only those as old as the newest of a
    confirmed set, if ``within`` is given."""
    ids: list[str] = []
    newest: tuple[float, str] | None = None
    cursor = None if within is None else within.start()
    while True:
        page = await store.list_dead(queue, topic, where, cursor, CHUNK)
        if newest is None and page.jobs:
            newest = (page.jobs[0].died_at, page.jobs[0].id)
        ids += [job.id for job in page.jobs]
        if page.cursor is None:
            return Matched(ids, newest)
        cursor = page.cursor


async def matching_dead_ids(store: Store, queue: str, topic: str, where: DeadFilter) -> list[str]:
    """Ids of the dead jobs matching ``where``, newest first."""
    return (await matching_dead(store, queue, topic, where)).ids


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
    return await delete_ids(store, queue, topic, ids, progress=progress)


async def delete_ids(
    store: Store, queue: str, topic: str, ids: list[str], *, progress: Progress | None = None
) -> int:
    """Forget these dead jobs (others are skipped)."""
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


def _digest(ids: Sequence[str]) -> str:
    """128 bits of SHA-256 over the ids, in any order (a listing's order at one died_at may
    differ between stores); as a JSON list, as an id may hold any character."""
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:32]
