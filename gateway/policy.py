"""What a delivery's result means for its job: done, retry (when, and whether it counts), dead.

Pure functions of the result and the topic's policy, so every rule is tested without I/O.

    2xx                                  -> done
    429 / 503 with a valid Retry-After   -> retry at that time
    a status in dead_on (400 404 410 422) -> dead at once
    any other status, timeout, reset      -> retry with exponential backoff and jitter
    connect refused, overloaded, no free
    connection (the job never ran)        -> retry with backoff, no attempt spent
    attempts exhausted                    -> dead
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from adapters.delivery.base import Delivery
from adapters.storage.jobs import Outcome

#: A backend's Retry-After is honoured up to this long.
MAX_RETRY_AFTER = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Backoff:
    backoff: float  # first delay, seconds
    max_backoff: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Exponential in the attempt number, capped, with "equal jitter" (50-100%)."""
        # The exponent is capped: 2.0 ** 1024 raises OverflowError (max_attempts may be
        # 10,000), and by 2 ** 1000 any backoff has long reached any max_backoff.
        base = min(self.max_backoff, self.backoff * 2.0 ** min(max(attempt - 1, 0), 1000))
        return base * (0.5 + rng.random() / 2)


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome  # DONE, RETRY or DEAD
    reason: str
    run_at: float | None = None  # for RETRY: unix seconds
    spend: bool = True  # for RETRY: whether this attempt counts against max_attempts


def decide(
    delivery: Delivery,
    *,
    attempt: int,
    max_attempts: int,
    backoff: Backoff,
    dead_on: frozenset[int],
    now: float,
    rng: random.Random,
) -> Decision:
    status = delivery.status
    if delivery.failure is None:
        assert status is not None
        if 200 <= status < 300:
            return _done(status)  # nearly every job: before anything a retry needs is built

    exhausted = attempt >= max_attempts

    def retry(reason: str, delay: float, *, spend: bool = True) -> Decision:
        if spend and exhausted:
            return Decision(Outcome.DEAD, f"{reason}; {max_attempts} attempts used")
        return Decision(Outcome.RETRY, reason, now + delay, spend)

    if delivery.failure is not None:
        reason = f"{delivery.failure.value}: {delivery.message}"
        spend = not delivery.failure.job_never_ran
        return retry(reason, backoff.delay(attempt, rng), spend=spend)

    assert status is not None
    # dead_on first: an operator who lists 429 or 503 there means it, Retry-After or not.
    if status in dead_on:
        return Decision(Outcome.DEAD, _said(f"status {status} is in dead_on", delivery))
    if status in (429, 503):
        after = retry_after(delivery.header(b"retry-after"), now)
        if after is not None:
            return retry(f"status {status}, Retry-After {after:g}s", after)
    return retry(_said(f"status {status}", delivery), backoff.delay(attempt, rng))


def _said(reason: str, delivery: Delivery) -> str:
    """The reason, with what the adapter said about the answer (where a 3xx points)."""
    return f"{reason}: {delivery.message}" if delivery.message else reason


@functools.lru_cache(maxsize=128)
def _done(status: int) -> Decision:
    # A Decision is immutable: one per 2xx status serves every job that gets it.
    return Decision(Outcome.DONE, f"status {status}")


def retry_after(value: bytes | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isascii() and text.isdigit():  # isdigit() alone takes "²": float() does not
        return min(float(text), MAX_RETRY_AFTER)
    try:
        date = parsedate_to_datetime(text)
        # An HTTP-date is always GMT, but the asctime form names no zone and Python reads
        # such a date as local time: a host not on UTC would be hours off.
        when = date.replace(tzinfo=date.tzinfo or UTC).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None  # not a date we can use: ordinary backoff
    return min(max(when - now, 0.0), MAX_RETRY_AFTER)
