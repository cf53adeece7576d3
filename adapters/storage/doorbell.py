"""Waking a topic's dispatcher the moment a job is pushed, without polling.

A doorbell remembers a ring that happened while nobody was waiting, so the sequence
"reserve finds nothing; a push rings; the dispatcher starts waiting" does not lose the
wake-up: the wait returns at once.
"""

from __future__ import annotations

import math

import trio


class Doorbell:
    __slots__ = ("_event", "_rung")

    def __init__(self) -> None:
        self._rung = False
        self._event = trio.Event()

    def ring(self) -> None:
        self._rung = True
        self._event.set()

    async def wait(self, deadline: float = math.inf) -> bool:
        """Wait for a ring (or one that already happened) until ``deadline`` (trio time).

        Returns True when rung, False at the deadline.
        """
        if not self._rung:
            with trio.move_on_at(deadline):
                await self._event.wait()
        else:
            await trio.lowlevel.checkpoint()
        rung = self._rung
        self._rung = False
        if self._event.is_set():
            self._event = trio.Event()
        return rung


class Doorbells:
    """One doorbell per (queue, topic)."""

    __slots__ = ("_bells",)

    def __init__(self) -> None:
        self._bells: dict[tuple[str, str], Doorbell] = {}

    def __getitem__(self, key: tuple[str, str]) -> Doorbell:
        bell = self._bells.get(key)
        if bell is None:
            bell = self._bells[key] = Doorbell()
        return bell

    def ring(self, queue: str, topic: str) -> None:
        self[queue, topic].ring()

    def ring_all(self) -> None:
        """Ring every doorbell: rings may have been missed (a wake-up subscription that was
        down), so every waiter looks now rather than at its recheck."""
        for bell in self._bells.values():
            bell.ring()
