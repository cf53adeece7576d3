"""What the store holds: jobs, their attempts, and the records the store answers with.

``NewJob``, ``Job`` and ``Attempt`` (and ``base.Finish``) are built once per job on the hot
path, so they are plain slotted dataclasses, not frozen ones: a frozen dataclass's
``__init__`` sets each field through ``object.__setattr__``, 2.5x the cost (1.5 against
0.6 us for a ``Job``).  So is ``PushResult``, built once per producer request a merged store
call carries (``PushResult.parts``): once per unpipelined push.  Treat them as values all
the same: nothing assigns to their fields.
"""

from __future__ import annotations

import enum
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Excerpts of a backend's body and stderr kept per attempt.
EXCERPT_BYTES = 1024

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_EXPLICIT_ID = re.compile(r"[A-Za-z0-9_.:@+=-]{1,128}")


class Priority(enum.IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, text: str) -> Priority:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"priority must be high, normal or low, not {text!r}") from None


class State(enum.IntEnum):
    READY = 0
    DELAYED = 1  # waiting for run_at (delayed push, or a retry's backoff)
    LEASED = 2  # reserved by a dispatcher until lease_until
    DEAD = 3
    DONE = 4


class Outcome(enum.Enum):
    DONE = "done"
    RETRY = "retry"
    DEAD = "dead"
    EXPIRED = "expired"  # the lease ran out before an outcome was recorded
    RELEASED = "released"  # given back unfinished at shutdown; no attempt spent


# Ids and trace ids need to be unique, not unguessable: a Mersenne Twister seeded from the OS
# (per process, as the random module does) costs no system call per job, os.urandom does.
_random = random.Random()
#: Every pair of base32 symbols, indexed by the 10-bit value they encode.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]


def new_job_id(now: float | None = None) -> str:
    """A 26-character, time-ordered id: a 48-bit ms timestamp and 80 random bits in base32.

    Crockford's alphabet keeps the characters in the same order as the values they stand for,
    so ids sort by creation time.  The 128 bits are written as 130 (26 symbols, 13 pairs):
    the first 5 pairs hold only the timestamp, the last 8 only the random bits.
    """
    ms = int((time.time() if now is None else now) * 1000)
    global _last_ms, _last_prefix
    if ms != _last_ms:  # a batch of pushes shares its millisecond: encode it once
        value = ms << 80
        _last_prefix = "".join([_PAIRS[(value >> shift) & 1023] for shift in range(120, 79, -10)])
        _last_ms = ms
    r = _random.getrandbits(80)
    p = _PAIRS
    # Unrolled: half the cost of a loop, on every pushed job; and joined, not added up
    # (eight intermediate strings), which takes a fifth off again (callgrind: 9,200 -> 7,500
    # instructions).
    return "".join(
        (
            _last_prefix,
            p[r >> 70 & 1023],
            p[r >> 60 & 1023],
            p[r >> 50 & 1023],
            p[r >> 40 & 1023],
            p[r >> 30 & 1023],
            p[r >> 20 & 1023],
            p[r >> 10 & 1023],
            p[r & 1023],
        )
    )


_last_ms, _last_prefix = -1, ""


def new_trace() -> bytes:
    """16 random bytes, a W3C trace id as a store keeps it."""
    # What Random.randbytes does, without its Python-level frame: this runs per pushed job.
    return _random.getrandbits(128).to_bytes(16, "little")


def new_lease() -> str:
    """A reservation's token: 16 hex digits, one per reserve call (a job is leased at most
    once in a call, and each lease of it comes from another call)."""
    return f"{_random.getrandbits(64):016x}"


def new_trace_id() -> str:
    """32 hex digits, a W3C trace id."""
    return new_trace().hex()


def new_span_id() -> str:
    """16 hex digits, a W3C span (parent) id."""
    return f"{_random.getrandbits(64):016x}"


def check_job_id(job_id: str) -> str:
    """Validate an id given by a producer (an idempotency key)."""
    if not _EXPLICIT_ID.fullmatch(job_id):
        raise ValueError("a job id is 1-128 characters of letters, digits and _ . : @ + = -")
    if job_id in (".", ".."):
        # No URL can name it: clients resolve /v1/jobs/.. to /v1/ (RFC 3986 5.2.4), so
        # neither the dashboard nor the admin API could ever show the job.
        raise ValueError(f"a job id cannot be {job_id!r}: no URL can name it")
    return job_id


@dataclass(slots=True)
class NewJob:
    """A job as a producer pushes it, before it is copied to topics."""

    payload: bytes
    id: str | None = None  # explicit id: idempotency key while a copy is pending or dead
    topic: str | None = None  # `queue/topic`: this topic only, no fan-out
    priority: Priority = Priority.NORMAL
    run_at: float | None = None  # unix seconds; None or past means now
    attributes: Mapping[str, str] = field(default_factory=dict)
    trace_id: str | None = None  # 32 hex digits; generated when absent


@dataclass(slots=True)
class Job:
    """One topic's copy of a pushed job, as reserved for delivery."""

    id: str
    queue: str
    topic: str
    payload: bytes
    attributes: Mapping[str, str]
    priority: Priority
    attempt: int  # 1-based number of the delivery this reservation is for
    enqueued_at: float
    run_at: float
    trace_id: str
    lease_until: float = 0.0
    #: Which reservation this is (``new_lease``): outcomes, extensions and releases name it.
    #: (id, attempt) does not tell leases apart: a replay, or a push of a finished explicit
    #: id again, numbers attempts from 1 again, and a daemon that outlived its lease (frozen,
    #: partitioned) would record its late outcome on another delivery's lease.
    lease: str = ""


@dataclass(slots=True)
class Attempt:
    """What one delivery attempt did; the store keeps every one with its job."""

    attempt: int
    started_at: float
    duration: float
    outcome: Outcome
    status: int | None = None  # HTTP/CGI status, None when no response came
    error: str | None = None  # why it failed, in words (timeout, refused, protocol error)
    body: bytes = b""  # first KiB of the response body
    stderr: bytes = b""  # first KiB of FastCGI stderr

    def __post_init__(self) -> None:
        if len(self.body) > EXCERPT_BYTES or len(self.stderr) > EXCERPT_BYTES:
            raise ValueError(f"attempt excerpts are limited to {EXCERPT_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job with its state and full attempt history (``GET /v1/jobs/{id}``)."""

    id: str
    queue: str
    topic: str
    state: State
    payload: bytes
    attributes: Mapping[str, str]
    priority: Priority
    attempt: int
    enqueued_at: float
    run_at: float
    trace_id: str
    finished_at: float | None
    attempts: tuple[Attempt, ...]


class Pushed(enum.IntEnum):
    """What became of one pushed job."""

    STORED = 0  # copied to one or more topics
    DUPLICATE = 1  # skipped: a copy with its explicit id is still pending
    UNMATCHED = 2  # no topic's filter accepted it (counted, not an error)


@dataclass(slots=True)
class PushResult:
    ids: tuple[str, ...]  # one per pushed job, in order
    outcomes: tuple[Pushed, ...]  # one per pushed job
    copies_each: tuple[int, ...]  # topic copies written, per job

    @property
    def copies(self) -> int:
        return sum(self.copies_each)

    @property
    def unmatched(self) -> int:
        return self.outcomes.count(Pushed.UNMATCHED)

    @property
    def duplicates(self) -> int:
        return self.outcomes.count(Pushed.DUPLICATE)

    def part(self, start: int, count: int) -> PushResult:
        """The result of ``count`` jobs from ``start``: one request's, of several a push
        merged."""
        if start == 0 and count == len(self.ids):
            return self
        end = start + count
        return PushResult(
            self.ids[start:end], self.outcomes[start:end], self.copies_each[start:end]
        )


@dataclass(frozen=True, slots=True)
class TopicStats:
    queue: str
    topic: str
    ready: int
    delayed: int
    leased: int
    dead: int
    done: int  # completed jobs still kept in history
    pushed_total: int
    done_total: int
    retried_total: int
    dead_total: int
    expired_total: int
    replayed_total: int
    unmatched_total: int  # per queue; repeated on each of its topics


@dataclass(frozen=True, slots=True)
class DeadFilter:
    """Which dead jobs an operator means; every given criterion must hold."""

    status: int | None = None  # last status (None: any)
    error: str | None = None  # substring of the last error, case-insensitive
    since: float | None = None  # died at or after (unix seconds)
    until: float | None = None  # died before
    attribute: tuple[str, str] | None = None  # (name, value) among the job's attributes

    def matches(
        self, status: int | None, error: str | None, died_at: float, attributes: Mapping[str, str]
    ) -> bool:
        if self.status is not None and status != self.status:
            return False
        if self.error is not None and self.error.lower() not in (error or "").lower():
            return False
        if self.since is not None and died_at < self.since:
            return False
        if self.until is not None and died_at >= self.until:
            return False
        if self.attribute is not None:
            name, value = self.attribute
            if attributes.get(name) != value:
                return False
        return True


@dataclass(frozen=True, slots=True)
class DeadJob:
    id: str
    queue: str
    topic: str
    payload: bytes
    attributes: Mapping[str, str]
    attempt: int
    died_at: float
    status: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class DeadPage:
    jobs: tuple[DeadJob, ...]
    cursor: str | None  # pass back for the next page; None when there is no more
