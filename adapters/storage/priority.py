"""Weighted fairness between priorities: high, normal and low share reservations 3:2:1.

Smooth weighted round-robin (as nginx balances upstreams): every pick adds each non-empty
class's weight to its credit, takes the class with the most credit, and charges it the total.
Over any window the classes are served in proportion to their weights, interleaved rather
than in bursts, and a class with jobs is never starved however busy the others are.
"""

from __future__ import annotations

from collections.abc import Mapping

from adapters.storage.jobs import Priority

DEFAULT_WEIGHTS: Mapping[Priority, int] = {Priority.HIGH: 3, Priority.NORMAL: 2, Priority.LOW: 1}


class PriorityScheduler:
    __slots__ = ("_credit", "_weights")

    def __init__(self, weights: Mapping[Priority, int] = DEFAULT_WEIGHTS) -> None:
        if any(w <= 0 for w in weights.values()) or set(weights) != set(Priority):
            raise ValueError("every priority needs a positive weight")
        self._weights = dict(weights)
        self._credit = dict.fromkeys(Priority, 0)

    def plan(self, available: Mapping[Priority, int], limit: int) -> list[Priority]:
        """The priorities of the next ``limit`` jobs to take, given how many each class has."""
        left = {p: n for p, n in available.items() if n > 0}
        if len(left) == 1:
            # One class with jobs: every round would credit and charge it the same weight,
            # so the loop below would change nothing but the picks.
            ((only, count),) = left.items()
            for p in Priority:
                if p is not only:
                    self._credit[p] = 0
            return [only] * min(count, limit)
        picks: list[Priority] = []
        while len(picks) < limit and left:
            total = 0
            for p in left:
                self._credit[p] += self._weights[p]
                total += self._weights[p]
            best = max(left, key=lambda p: (self._credit[p], -p))
            self._credit[best] -= total
            picks.append(best)
            left[best] -= 1
            if not left[best]:
                del left[best]
        for p in Priority:
            if available.get(p, 0) == 0:
                self._credit[p] = 0  # an empty class does not bank credit for later
        return picks
