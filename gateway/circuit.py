"""A circuit breaker per topic backend: stop sending to a backend that keeps failing.

    closed ──(N consecutive failures)──> open ──(cooldown)──> half-open
      ^                                    ^                      │ one probe delivery
      └──────────────(probe succeeds)──────┴──(probe fails)───────┘

(Any success closes it: a delivery that started before the circuit opened and succeeds
late says the backend answers again.  Only the probe's failure reopens it.)

While open, the dispatcher reserves nothing, so jobs wait in the store instead of burning
attempts against a dead backend; the probe decides, by itself, when deliveries resume.
Each failed probe doubles the cooldown, up to ``max_cooldown``.  A backend "failure" is a
delivery that got no usable response (refused, timeout, reset, protocol garbage) or a 5xx:
4xx answers are the job's problem, not the backend's.  No I/O here: the dispatcher feeds
outcomes in and asks whether it may reserve.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from adapters.delivery.base import Delivery, Failure


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class CircuitStatistics:
    state: CircuitState
    consecutive_failures: int
    opened_total: int
    reopen_at: float | None  # clock time of the next probe while open


def backend_failed(delivery: Delivery) -> bool:
    return delivery.failure is not None or (delivery.status or 0) >= 500


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures: int,
        cooldown: float,
        clock: Callable[[], float],
        max_cooldown: float = 300.0,
    ) -> None:
        if failures < 1 or cooldown <= 0:
            raise ValueError("a circuit needs failures >= 1 and a positive cooldown")
        self.threshold = failures
        self.base_cooldown = cooldown
        self.max_cooldown = max(max_cooldown, cooldown)
        self._clock = clock
        self.state = CircuitState.CLOSED
        self._failures = 0
        self._cooldown = cooldown
        self._reopen_at = math.inf
        self._probing = False
        self._probes = 0  # probes let out so far: the number of the one out, while _probing
        self._opened_total = 0

    def statistics(self) -> CircuitStatistics:
        return CircuitStatistics(
            state=self.state,
            consecutive_failures=self._failures,
            opened_total=self._opened_total,
            reopen_at=None if self.state is CircuitState.CLOSED else self._reopen_at,
        )

    def allowance(self) -> int | None:
        """How many jobs may be reserved now: None for no limit, 0 for none, 1 for a probe."""
        if self.state is CircuitState.CLOSED:
            return None
        if self.state is CircuitState.OPEN and self._clock() >= self._reopen_at:
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN and not self._probing:
            return 1
        return 0

    def started(self) -> int:
        """A job was taken for delivery: the half-open probe's number if it is the probe,
        else 0.  ``record`` takes the number back with the probe's outcome."""
        if self.state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            self._probes += 1
            return self._probes
        return 0

    def probe_withdrawn(self) -> None:
        """The probe went back undelivered (a pause, a lost lease): the next job probes.

        Without this the circuit would wait, half-open, for an outcome that never comes.
        """
        if self.state is CircuitState.HALF_OPEN:
            self._probing = False

    @property
    def reopen_at(self) -> float:
        """When an open circuit lets a probe through (clock time); inf otherwise."""
        return self._reopen_at if self.state is CircuitState.OPEN else math.inf

    def record(self, delivery: Delivery, *, probe: int) -> None:
        """An attempt's outcome; ``probe``: its number from ``started`` (0: no probe)."""
        if delivery.failure is Failure.NO_DESCRIPTORS:
            # busgate's own shortage, the backend not tried: counted, it opened the circuit
            # and kept it open for minutes (the cooldown doubling) after descriptors were
            # free again.  A probe it stopped goes again.
            if probe and probe == self._probes:
                self.probe_withdrawn()
            return
        if backend_failed(delivery):
            self._failure(probe)
        elif self._failures or self.state is not CircuitState.CLOSED:
            self._success()
        # Else closed without failures: _success would write what is there already (only
        # _open and a half-open failure change the cooldown, the probe and the reopen time).

    def _success(self) -> None:
        self._failures = 0
        self._cooldown = self.base_cooldown
        self._probing = False
        self.state = CircuitState.CLOSED
        self._reopen_at = math.inf

    def _failure(self, probe: int) -> None:
        self._failures += 1
        if self.state is CircuitState.HALF_OPEN and probe == self._probes and self._probing:
            # Only the failure of the probe out now reopens: one of a delivery started before
            # the circuit opened, or of an earlier probe (the circuit has closed and opened
            # again since), says nothing new, and taking it for this probe's would let a
            # second probe out at the next reopen while this one is still running.
            self._probing = False
            self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            self._open()
        elif self.state is CircuitState.CLOSED and self._failures >= self.threshold:
            self._open()

    def _open(self) -> None:
        self.state = CircuitState.OPEN
        self._opened_total += 1
        self._reopen_at = self._clock() + self._cooldown
