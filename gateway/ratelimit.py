"""A token bucket: at most ``rate`` deliveries per second, in bursts of up to ``burst``."""

from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    def __init__(
        self, rate: float, *, burst: float | None = None, clock: Callable[[], float]
    ) -> None:
        if rate <= 0:
            raise ValueError("a rate must be positive")
        self.rate = rate
        # A second's worth (at least one token): smooth at high rates, no starvation at low.
        self.burst = max(1.0, rate if burst is None else burst)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def available(self) -> int:
        """Whole tokens available now."""
        self._refill()
        return int(self._tokens)

    def take(self, count: int) -> None:
        """Spend ``count`` tokens (the caller checked ``available``)."""
        self._refill()
        self._tokens -= count

    def give_back(self, count: int) -> None:
        """Return ``count`` tokens taken for work that was not done (never past ``burst``):
        a slot left unused must stay usable, or the caller runs below ``rate``."""
        self._refill()
        self._tokens = min(self.burst, self._tokens + count)

    def wait_time(self) -> float:
        """Seconds until one whole token is available."""
        self._refill()
        return max(0.0, (1 - self._tokens) / self.rate)
