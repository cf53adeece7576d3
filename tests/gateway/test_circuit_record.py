"""``CircuitBreaker.record`` skips ``_success`` when the circuit is closed without failures:
the same states, counts and times as the plain rule (``backend_failed``, then ``_failure``
or ``_success``) over any run of outcomes, probes, withdrawals and clock steps."""

from __future__ import annotations

import random

import pytest

from adapters.delivery.base import Delivery, Failure
from gateway.circuit import CircuitBreaker, backend_failed


class PlainCircuit(CircuitBreaker):
    """The rule as first written: every outcome through ``_success`` or ``_failure``."""

    def record(self, delivery: Delivery, *, probe: int) -> None:
        if backend_failed(delivery):
            self._failure(probe)
        else:
            self._success()


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


OUTCOMES = [
    Delivery(0.01, 200),
    Delivery(0.01, 204),
    Delivery(0.01, 404),
    Delivery(0.01, 499),
    Delivery(0.01, 500),
    Delivery(0.01, 503),
    Delivery(0.01, None),
    Delivery(0.01, failure=Failure.CONNECT, message="refused"),
    Delivery(0.01, failure=Failure.TIMEOUT, message="slow"),
]


@pytest.mark.parametrize("seed", range(20))
def test_record_does_what_the_plain_rule_does(seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    threshold = rng.randint(1, 4)
    fast = CircuitBreaker(failures=threshold, cooldown=5, clock=clock, max_cooldown=40)
    plain = PlainCircuit(failures=threshold, cooldown=5, clock=clock, max_cooldown=40)
    for _ in range(400):
        step = rng.random()
        if step < 0.6:
            # Mostly successes, so that runs of them follow every state.
            delivery = OUTCOMES[0] if rng.random() < 0.5 else rng.choice(OUTCOMES)
            probe = rng.choice([0, 1, 2, 3])
            fast.record(delivery, probe=probe)
            plain.record(delivery, probe=probe)
        elif step < 0.75:
            assert fast.allowance() == plain.allowance()
        elif step < 0.85:
            assert fast.started() == plain.started()
        elif step < 0.9:
            fast.probe_withdrawn()
            plain.probe_withdrawn()
        else:
            clock.now += rng.choice([1.0, 5.0, 20.0])
        assert vars(fast) == vars(plain)
        assert fast.statistics() == plain.statistics()
        assert fast.reopen_at == plain.reopen_at
