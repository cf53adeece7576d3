"""The smooth weighted round robin that orders a reserve across priorities."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from adapters.storage.jobs import Priority
from adapters.storage.priority import DEFAULT_WEIGHTS, PriorityScheduler


class Reference:
    """The algorithm written plainly, one round per pick, with no shortcut."""

    def __init__(self) -> None:
        self.credit = dict.fromkeys(Priority, 0)

    def plan(self, available: dict[Priority, int], limit: int) -> list[Priority]:
        left = {p: n for p, n in available.items() if n > 0}
        picks: list[Priority] = []
        while len(picks) < limit and left:
            total = 0
            for p in left:
                self.credit[p] += DEFAULT_WEIGHTS[p]
                total += DEFAULT_WEIGHTS[p]
            best = max(left, key=lambda p: (self.credit[p], -p))
            self.credit[best] -= total
            picks.append(best)
            left[best] -= 1
            if not left[best]:
                del left[best]
        for p in Priority:
            if available.get(p, 0) == 0:
                self.credit[p] = 0
        return picks


availability = st.dictionaries(st.sampled_from(list(Priority)), st.integers(0, 12))


@given(st.lists(st.tuples(availability, st.integers(1, 20)), max_size=25))
def test_plans_match_the_plain_algorithm(calls: list[tuple[dict[Priority, int], int]]) -> None:
    # The single-class shortcut must leave the credits exactly as the rounds would.
    scheduler, reference = PriorityScheduler(), Reference()
    for available, limit in calls:
        assert scheduler.plan(available, limit) == reference.plan(available, limit)


def test_weights_are_three_two_one_and_low_is_never_starved() -> None:
    scheduler = PriorityScheduler()
    picks = Counter(scheduler.plan(dict.fromkeys(Priority, 1000), 600))
    assert picks == {Priority.HIGH: 300, Priority.NORMAL: 200, Priority.LOW: 100}
    assert scheduler.plan({Priority.LOW: 3}, 10) == [Priority.LOW] * 3
