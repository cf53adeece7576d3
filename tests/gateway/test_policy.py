"""Outcome policy, circuit breaker and rate limit: pure logic on fake clocks."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.delivery.base import Delivery, Failure
from adapters.storage.jobs import Outcome
from gateway.circuit import CircuitBreaker, CircuitState
from gateway.policy import Backoff, decide, retry_after
from gateway.ratelimit import TokenBucket

NOW = 1_800_000_000.0
DEAD_ON = frozenset({400, 404, 410, 422})
BACKOFF = Backoff(1.0, 600.0)


def verdict(
    delivery: Delivery, attempt: int = 1, max_attempts: int = 5
) -> tuple[Outcome, float | None, bool]:
    d = decide(
        delivery,
        attempt=attempt,
        max_attempts=max_attempts,
        backoff=BACKOFF,
        dead_on=DEAD_ON,
        now=NOW,
        rng=random.Random(7),
    )
    delay = None if d.run_at is None else round(d.run_at - NOW, 3)
    return d.outcome, delay, d.spend


def answer(status: int, retry: str | None = None) -> Delivery:
    headers = () if retry is None else ((b"Retry-After", retry.encode()),)
    return Delivery(0.01, status=status, headers=headers)


def test_statuses() -> None:
    assert verdict(answer(200))[0] is Outcome.DONE
    assert verdict(answer(204))[0] is Outcome.DONE
    assert verdict(answer(404))[:1] == (Outcome.DEAD,)
    assert verdict(answer(422))[0] is Outcome.DEAD
    outcome, delay, spend = verdict(answer(500))
    assert outcome is Outcome.RETRY and spend and delay is not None and 0.5 <= delay <= 1.0
    assert verdict(answer(503, "30")) == (Outcome.RETRY, 30.0, True)
    assert verdict(answer(429, "Wed, 15 Jan 2027 08:00:10 GMT")) == (Outcome.RETRY, 10.0, True)
    assert verdict(answer(503, "soon"))[0] is Outcome.RETRY  # unreadable: normal backoff
    assert verdict(answer(500), attempt=5)[0] is Outcome.DEAD
    assert verdict(answer(503, "30"), attempt=5)[0] is Outcome.DEAD


def test_a_503_listed_in_dead_on_is_dead_even_with_retry_after() -> None:
    # The operator's explicit list comes first; it used to lose to Retry-After.
    d = decide(
        answer(503, "30"),
        attempt=1,
        max_attempts=5,
        backoff=BACKOFF,
        dead_on=frozenset({503}),
        now=NOW,
        rng=random.Random(7),
    )
    assert (d.outcome, d.reason) == (Outcome.DEAD, "status 503 is in dead_on")


def test_a_redirects_target_is_in_the_reason() -> None:
    # The HTTP adapter says where a 3xx points; the dead letter and the log line keep it.
    moved = Delivery(0.01, status=302, message="302 Found -> https://sso.example/login")

    def reason(dead_on: frozenset[int]) -> str:
        return decide(
            moved,
            attempt=1,
            max_attempts=2,
            backoff=BACKOFF,
            dead_on=dead_on,
            now=NOW,
            rng=random.Random(7),
        ).reason

    assert reason(DEAD_ON) == "status 302: 302 Found -> https://sso.example/login"
    assert reason(frozenset({302})) == (
        "status 302 is in dead_on: 302 Found -> https://sso.example/login"
    )


@pytest.mark.parametrize("failure", [Failure.CONNECT, Failure.OVERLOADED, Failure.POOL_TIMEOUT])
def test_failures_where_the_job_never_ran_spend_nothing(failure: Failure) -> None:
    outcome, _delay, spend = verdict(Delivery(0.0, failure=failure, message="x"), attempt=5)
    assert (outcome, spend) == (Outcome.RETRY, False)  # even past max_attempts


@pytest.mark.parametrize("failure", [Failure.TIMEOUT, Failure.CONNECTION_LOST, Failure.PROTOCOL])
def test_failures_where_the_job_may_have_run_spend_an_attempt(failure: Failure) -> None:
    assert verdict(Delivery(1.0, failure=failure, message="x"))[::2] == (Outcome.RETRY, True)
    assert verdict(Delivery(1.0, failure=failure, message="x"), attempt=5)[0] is Outcome.DEAD


def test_backoff_grows_caps_and_jitters() -> None:
    rng = random.Random(1)
    backoff = Backoff(1.0, 60.0)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (30, 60.0)]:
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert base * 0.5 <= min(delays) and max(delays) <= base
        assert max(delays) - min(delays) > base * 0.3  # jittered, not constant


def test_backoff_past_a_thousand_attempts_is_capped_not_an_overflow() -> None:
    # 2.0 ** 1024 raised OverflowError, which ended the dispatcher (max_attempts may be 10,000).
    rng = random.Random(1)
    for attempt in (1024, 1025, 5000, 10_000):
        assert 300 <= Backoff(1.0, 600.0).delay(attempt, rng) <= 600
        assert Backoff(0.0, 0.0).delay(attempt, rng) == 0
    outcome, delay, spend = verdict(answer(500), attempt=2000, max_attempts=10_000)
    assert outcome is Outcome.RETRY and delay is not None and 300 <= delay <= 600 and spend


def test_retry_after_dates_are_gmt_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The asctime form names no zone; it was read as local time, hours off on such a host.
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    try:
        for form in (
            b"Sun Nov  6 08:49:37 1994",
            b"Sunday, 06-Nov-94 08:49:37 GMT",
            b"Sun, 06 Nov 1994 08:49:37 GMT",
        ):
            assert retry_after(form, 784111767.0) == 10, form
    finally:
        monkeypatch.undo()
        time.tzset()


def test_retry_after_forms() -> None:
    assert retry_after(b"120", NOW) == 120
    assert retry_after(b"99999999", NOW) == 24 * 3600
    assert retry_after(b"Wed, 15 Jan 2027 07:00:00 GMT", NOW) == 0  # in the past
    assert retry_after(None, NOW) is None and retry_after(b"later", NOW) is None
    # Digits to str.isdigit() that float() refuses: a backend's odd header is no crash.
    for odd in (b"\xb2", b"1\xb3", b"\xb9", b"Wed, 15 Jan 99999 07:00:00 GMT", b"-5", b"1.5"):
        assert retry_after(odd, NOW) is None, odd


@given(st.binary(max_size=40))
def test_retry_after_never_raises(value: bytes) -> None:
    seconds = retry_after(value, NOW)
    assert seconds is None or 0 <= seconds <= 24 * 3600


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busgate_out_of_descriptors_is_no_failure_of_the_backends() -> None:
    # Counted, it opened the circuit, and each probe that met it doubled the cooldown: up to
    # 300 s without a delivery after descriptors were free again.
    clock = Clock()
    circuit = CircuitBreaker(failures=2, cooldown=5, clock=clock)
    short = Delivery(0.0, failure=Failure.NO_DESCRIPTORS, message="Too many open files")
    for _ in range(5):
        circuit.record(short, probe=0)
    assert circuit.statistics().state is CircuitState.CLOSED
    assert circuit.statistics().consecutive_failures == 0
    failed = Delivery(0.01, failure=Failure.CONNECT, message="refused")
    circuit.record(failed, probe=0)
    circuit.record(failed, probe=0)
    assert circuit.state is CircuitState.OPEN
    clock.now += 5
    assert circuit.allowance() == 1
    probe = circuit.started()
    circuit.record(short, probe=probe)  # the probe never reached the backend: another goes
    assert (circuit.state, circuit.allowance()) == (CircuitState.HALF_OPEN, 1)
    assert circuit.statistics().consecutive_failures == 2  # and says nothing either way


def fail_the_probe(circuit: CircuitBreaker, clock: Clock) -> None:
    clock.now = circuit.reopen_at
    assert circuit.allowance() == 1
    circuit.record(answer(503), probe=circuit.started())


def test_failed_probes_double_the_cooldown_up_to_max_cooldown() -> None:
    clock = Clock()
    circuit = CircuitBreaker(failures=1, cooldown=10, clock=clock, max_cooldown=300)
    circuit.record(answer(503), probe=0)
    for _ in range(10):  # uncapped: 10,240 s
        fail_the_probe(circuit, clock)
    assert circuit.reopen_at - clock.now == 300


def test_a_backend_that_recovered_starts_again_from_the_base_cooldown() -> None:
    clock = Clock()
    circuit = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    circuit.record(answer(503), probe=0)
    fail_the_probe(circuit, clock)
    fail_the_probe(circuit, clock)  # 40 s now
    clock.now = circuit.reopen_at
    assert circuit.allowance() == 1
    circuit.record(answer(200), probe=circuit.started())
    assert circuit.state is CircuitState.CLOSED
    circuit.record(answer(503), probe=0)  # down again, later
    assert circuit.reopen_at - clock.now == 10


def test_circuit_opens_probes_and_closes() -> None:
    clock = Clock()
    circuit = CircuitBreaker(failures=3, cooldown=10, clock=clock)
    down = Delivery(0.0, failure=Failure.CONNECT, message="refused")
    for _ in range(2):
        circuit.record(down, probe=0)
    circuit.record(answer(404), probe=0)  # the backend answered: not its failure
    assert circuit.state is CircuitState.CLOSED
    for _ in range(3):
        circuit.record(down, probe=0)
    assert circuit.statistics().state is CircuitState.OPEN and circuit.allowance() == 0
    assert circuit.reopen_at == 110
    clock.now = 110
    assert circuit.allowance() == 1  # half-open: one probe
    probe = circuit.started()
    assert probe == 1
    assert circuit.allowance() == 0  # only one
    circuit.record(answer(502), probe=probe)
    assert circuit.statistics().state is CircuitState.OPEN
    assert circuit.reopen_at == 130  # cooldown doubled
    clock.now = 130
    assert circuit.allowance() == 1
    probe = circuit.started()
    assert probe == 2
    circuit.record(answer(200), probe=probe)
    stats = circuit.statistics()
    assert (stats.state, stats.opened_total, stats.consecutive_failures) == (
        CircuitState.CLOSED,
        2,
        0,
    )
    assert circuit.allowance() is None


def test_a_withdrawn_probe_lets_the_next_job_probe() -> None:
    clock = Clock()
    circuit = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    circuit.record(answer(500), probe=0)
    clock.now += 10
    assert circuit.allowance() == 1
    assert circuit.started() == 1  # the probe
    assert circuit.allowance() == 0 and circuit.started() == 0
    circuit.probe_withdrawn()  # it went back to the store undelivered (a pause)
    assert circuit.statistics().state is CircuitState.HALF_OPEN
    assert circuit.allowance() == 1  # before, 0 for ever: a wedged topic


def test_a_late_failure_half_open_is_not_the_probes() -> None:
    # A delivery started before the circuit opened fails while the probe is out: taken for
    # the probe's failure, it reopened the circuit and let a second probe out at the next
    # reopen, with the first still running.
    clock = Clock()
    circuit = CircuitBreaker(failures=1, cooldown=1, clock=clock)
    circuit.record(answer(500), probe=0)  # opens
    clock.now += 1
    assert circuit.allowance() == 1
    probe = circuit.started()  # the probe goes out
    clock.now += 2
    circuit.record(answer(500), probe=0)  # the late one
    clock.now += 2
    assert circuit.statistics().state is CircuitState.HALF_OPEN
    assert circuit.allowance() == 0  # the probe has not answered: nothing more goes
    circuit.record(answer(200), probe=probe)
    assert circuit.allowance() is None


def test_an_earlier_probes_late_failure_is_not_the_current_probes() -> None:
    # Probe 1 is out; a late success closes the circuit, a failure opens it again, probe 2
    # goes out.  Probe 1 failing then was taken for probe 2's: the circuit reopened and,
    # after the cooldown, let a third probe out with the second still running.
    clock = Clock()
    circuit = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    circuit.record(answer(503), probe=0)
    clock.now += 10
    assert circuit.allowance() == 1
    first = circuit.started()
    circuit.record(answer(200), probe=0)  # started before the circuit opened: closes it
    circuit.record(answer(503), probe=0)  # open again
    clock.now += 10
    assert circuit.allowance() == 1
    second = circuit.started()
    circuit.record(answer(503), probe=first)
    assert circuit.statistics().state is CircuitState.HALF_OPEN
    clock.now += 100
    assert circuit.allowance() == 0  # the second probe has not answered
    circuit.record(answer(503), probe=second)
    assert circuit.statistics().state is CircuitState.OPEN


def test_token_bucket() -> None:
    clock = Clock()
    bucket = TokenBucket(5, clock=clock)
    assert bucket.available() == 5
    bucket.take(5)
    assert bucket.available() == 0 and bucket.wait_time() == pytest.approx(0.2)
    clock.now += 0.5
    assert bucket.available() == 2
    clock.now += 100
    assert bucket.available() == 5  # a burst never exceeds a second's worth
    slow = TokenBucket(0.5, clock=clock)  # 30/m
    assert slow.available() == 1
    slow.take(1)
    assert slow.wait_time() == pytest.approx(2.0)
