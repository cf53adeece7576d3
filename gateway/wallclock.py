"""Steps of the wall clock, seen against the monotonic one.

Leases, due times and finished times are wall-clock stamps: a store several hosts share needs
a clock they share.  NTP may step the wall clock, and after a step forward this daemon's own
stamps look older than they are: the leases of the jobs it is delivering look expired (its
scheduler would take them back and deliver them again while they run), and finished jobs look
past their retention (a step of a week would prune every dead letter).  ``WallClock`` tells
the dispatchers how far the wall clock has moved ahead; they extend what they hold
(``Dispatcher._after_a_step``) and keep history that much longer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: A change of the wall clock against the monotonic one larger than this between two looks a
#: second or so apart is a step, not drift: NTP slews the clock by at most 0.5 ms a second.
STEP = 1.0


class WallClock:
    """The wall clock (``wall``) against the monotonic one, since this object was made (the
    daemon's start)."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._start = self.offset()

    def offset(self) -> float:
        """The wall clock less the monotonic one: constant but for drift, until a step."""
        return self._wall() - time.monotonic()

    def ahead(self) -> float:
        """Seconds the wall clock has moved ahead of the monotonic one since the start (by
        steps and drift alike); 0 if it has not, or has moved back."""
        return max(0.0, self.offset() - self._start)
