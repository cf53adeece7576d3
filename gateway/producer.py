"""The producer service: what both producer front ends (RESP and HTTP) ask of the gateway.

It checks a push against the live configuration (queue exists, topic exists, password,
payload size) and hands it to the store.  The configuration it reads is an immutable
snapshot swapped whole on reload, so a push sees either the old or the new queues, never
half of each.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from adapters.storage.base import Route, Store
from adapters.storage.errors import StoreError, StoreUnavailable, StoreUncertain
from adapters.storage.jobs import NewJob, PushResult
from gateway import logs
from gateway.config import Config, QueueConfig

log = logging.getLogger("busgate.producer")


class ProducerError(Exception):
    """A push refused before anything was stored; ``code`` is the RESP error prefix."""

    code = "ERR"
    #: Why, as ``busgate_pushes_refused_total`` labels it (``Refusals``).
    reason = "invalid"


class UnknownQueue(ProducerError):
    reason = "unknown_queue"


class UnknownTopic(ProducerError):
    reason = "unknown_topic"


class AuthRequired(ProducerError):
    code = "NOAUTH"
    reason = "noauth"


class WrongPassword(ProducerError):
    code = "WRONGPASS"
    reason = "wrong_password"

    def __init__(self, message: str, login: str = "") -> None:
        super().__init__(message)
        #: The queue the producer logged in as (``AUTH queue password``), for the refusal's
        #: log line and count; "" for a password alone.
        self.login = login


class PayloadTooLarge(ProducerError):
    """A payload over max_payload, attributes over MAX_ATTRIBUTE_BYTES, or more jobs in one
    push than one store call takes."""

    reason = "too_large"


class BadDelay(ProducerError):
    reason = "bad_delay"


#: A job's attributes, names and values, may hold this much at most: they travel as HTTP
#: headers (``X-Busgate-Attr-…``), and servers refuse a header section much larger (431).
MAX_ATTRIBUTE_BYTES = 8 * 1024
#: A delay may be this long at most: 100 years, in milliseconds.
MAX_DELAY_MS = 100 * 366 * 24 * 3600 * 1000


class ShuttingDown(ProducerError):
    """The daemon is draining: pushes go to another instance, or wait for the restart."""

    code = "TRYAGAIN"
    reason = "shutting_down"


class Refusals:
    """Pushes refused before anything was stored (and failed logins), counted by queue and
    reason for ``/metrics``, and logged: the first of a kind at once, then at most one line
    a minute with how many were not, since a misbehaving producer may retry in a loop.

    The queue is one of the configuration's, or "" (an unknown name, or none given): a
    name a producer made up must not become a series, or a line each, of its own.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self._lines: dict[tuple[str, str], logs.Repeating] = {}

    def statistics(self) -> dict[tuple[str, str], int]:
        """Pushes refused so far, by (queue, reason): what ``/metrics`` exports."""
        return dict(self.counts)

    def refused(self, queue: str, reason: str, message: str, via: str) -> None:
        key = (queue, reason)
        self.counts[key] = self.counts.get(key, 0) + 1
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = logs.Repeating(log)
        line.failed(
            logging.WARNING,
            "push refused via=%s queue=%s reason=%s error=%s",
            via,
            queue or "-",
            reason,
            logs.quoted(message),
        )


class PushFailures:
    """Pushes the store failed once they were accepted (Redis out of memory, a user it
    refuses, no answer in time), counted by queue and whether they may be stored, for
    ``/metrics``; and logged, per queue the first at once, then at most one line a minute,
    and once when pushes are stored again.  The producers were told, each in its protocol's
    words, but an operator must not have to ask them."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self._lines: dict[str, logs.Repeating] = {}

    def statistics(self) -> dict[tuple[str, str], int]:
        """Pushes failed so far, by (queue, stored): "no", or "maybe" (StoreUncertain)."""
        return dict(self.counts)

    def failed(self, queue: str, jobs: int, exc: StoreError) -> None:
        stored = "maybe" if isinstance(exc, StoreUncertain) else "no"
        key = (queue, stored)
        self.counts[key] = self.counts.get(key, 0) + jobs
        line = self._lines.get(queue)
        if line is None:
            line = self._lines[queue] = logs.Repeating(log)
        line.failed(
            logging.WARNING,
            "push failed queue=%s jobs=%d stored=%s error=%s",
            queue,
            jobs,
            stored,
            logs.quoted(exc),
        )

    def stored(self, queue: str) -> None:
        """A store call for ``queue`` succeeded: once per call, not per push."""
        line = self._lines.get(queue)
        if line is not None and line.failing:
            line.recovered("pushes stored again queue=%s", queue)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    config: QueueConfig
    routes: tuple[Route, ...]  # (topic, filter) in configuration order
    topics: tuple[str, ...]


class Directory:
    """An immutable view of the configured queues, built once per (re)load."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.queues: Mapping[str, QueueEntry] = {
            name: QueueEntry(
                queue,
                tuple((t.name, t.filter) for t in queue.topics),
                tuple(t.name for t in queue.topics),
            )
            for name, queue in config.queues.items()
        }
        self.max_payload = max((q.max_payload for q in config.queues.values()), default=0)

    def entry(self, queue: str) -> QueueEntry:
        entry = self.queues.get(queue)
        if entry is None:
            raise UnknownQueue(f"unknown queue '{queue}'")
        return entry


def split_target(target: str) -> tuple[str, str | None]:
    """``orders`` -> (orders, None); ``orders/email`` -> (orders, email)."""
    queue, slash, topic = target.partition("/")
    return queue, (topic if slash else None)


class ProducerService:
    def __init__(
        self, store: Store, directory: Directory, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.directory = directory
        #: The wall clock delays are measured against (the store's clock).
        self.clock = clock
        self._batchers: dict[str, _Batcher] = {}
        self.accepting = True
        self.refusals = Refusals()
        self.failures = PushFailures()

    def reload(self, directory: Directory) -> None:
        self.directory = directory
        # A removed queue's batcher goes with it, unless a store call of its is under way
        # (its flush ends with what it has); a daemon whose queues come and go by reload
        # kept one per name it ever had.
        for name in [n for n, b in self._batchers.items() if n not in directory.queues]:
            if not self._batchers[name].busy:
                del self._batchers[name]

    def refused(self, queue: str, reason: str, message: str, *, via: str) -> None:
        """Count and log a push (or login) refused: ``queue`` as the producer named it."""
        known = queue if queue in self.directory.queues else ""
        self.refusals.refused(known, reason, message, via)

    def run_at(self, delay_ms: int) -> float:
        """When a job pushed now with a delay of ``delay_ms`` is due (the store's clock)."""
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise BadDelay(f"a delay is 0 to {MAX_DELAY_MS} ms (100 years), not {delay_ms}")
        return self.clock() + delay_ms / 1000

    def stop(self) -> None:
        """Refuse pushes from now on (shutdown): what is already acknowledged is stored."""
        self.accepting = False

    def check_password(self, queue: str, password: str) -> None:
        """Raise ``WrongPassword`` unless ``password`` opens ``queue``."""
        entry = self.directory.queues.get(queue)
        expected = None if entry is None else entry.config.password
        # Unknown queue and wrong password look the same, as Redis does for users.
        if entry is None or (
            expected is not None and not hmac.compare_digest(expected.encode(), password.encode())
        ):
            raise WrongPassword("invalid username-password pair or user is disabled.", queue)

    def queues_opened_by(self, password: str) -> list[str]:
        """Queues whose password is ``password`` (the one-argument ``AUTH`` form)."""
        return [
            name
            for name, entry in self.directory.queues.items()
            if entry.config.password is not None
            and hmac.compare_digest(entry.config.password.encode(), password.encode())
        ]

    def resolve(self, target: str, authenticated: Mapping[str, str]) -> QueueEntry:
        """Check that a push to ``queue`` or ``queue/topic`` is allowed; return the queue.

        ``authenticated``: the queues this producer logged in to, with the password it gave.
        A login holds only while that is still the queue's password: one changed by a reload
        shuts out connections already open too.
        """
        if not self.accepting:
            raise ShuttingDown("busgate is shutting down; nothing was stored, push again")
        queue, topic = split_target(target)
        entry = self.directory.entry(queue)
        expected = entry.config.password
        if expected is not None and not hmac.compare_digest(
            authenticated.get(queue, "").encode(), expected.encode()
        ):
            raise AuthRequired("Authentication required.")
        if topic is not None and topic not in entry.topics:
            raise UnknownTopic(f"unknown topic '{topic}' in queue '{queue}'")
        return entry

    def check_sizes(self, entry: QueueEntry, payloads: Sequence[bytes]) -> None:
        # One command is one store call: a push of 300,000 payloads held every producer of
        # every queue (and the store) for seconds.
        if len(payloads) > MAX_BATCH:
            raise PayloadTooLarge(
                f"{len(payloads)} payloads in one push; at most {MAX_BATCH}: split it"
            )
        limit = entry.config.max_payload
        for payload in payloads:
            if len(payload) > limit:
                raise PayloadTooLarge(
                    f"payload of {len(payload)} bytes exceeds max_payload of {limit} bytes"
                    f" for queue '{entry.config.name}'"
                )

    @staticmethod
    def check_attributes(attributes: Mapping[str, str]) -> None:
        if not attributes:  # nearly every push
            return
        # Names that one header carries to a backend: HTTP compares header names without
        # case, and CGI also reads `-` as `_` (headers.cgi_name).  Both sent, an HTTP
        # backend would get two values and php only the last: not the same job.
        seen: dict[str, str] = {}
        for name in attributes:
            other = seen.setdefault(name.upper().replace("-", "_"), name)
            if other is not name:
                raise ProducerError(
                    f"attributes {other!r} and {name!r} would be one header to the backend"
                    " (names are compared without case, and `-` as `_`): rename one"
                )
        size = sum(len(name.encode()) + len(value.encode()) for name, value in attributes.items())
        if size > MAX_ATTRIBUTE_BYTES:
            raise PayloadTooLarge(
                f"attributes of {size} bytes (names and values) exceed the limit of"
                f" {MAX_ATTRIBUTE_BYTES} bytes: they are sent as HTTP headers"
            )

    async def push(self, entry: QueueEntry, jobs: Sequence[NewJob]) -> PushResult:
        """Store ``jobs`` (already resolved and size-checked); returns once durable.

        Pushes to one queue that arrive while an earlier store call is under way are merged
        into the next call (group commit): fifty producers pushing one job each cost a
        handful of store round trips, not fifty.  The caller that finds no call under way
        makes it, for everyone waiting; nothing else runs in the background.
        """
        answer: list[PushResult | Exception] = []
        stored = trio.Event()

        def on_stored(outcome: PushResult | Exception, first: int) -> None:
            if isinstance(outcome, PushResult):
                outcome = outcome.part(first, len(jobs))
            answer.append(outcome)
            stored.set()

        await self.submit(entry, jobs, on_stored)
        if not answer:  # another caller's store call carries these jobs
            await stored.wait()
        if isinstance(answer[0], Exception):
            raise answer[0]
        return answer[0]

    async def submit(self, entry: QueueEntry, jobs: Sequence[NewJob], on_stored: OnStored) -> None:
        """Hand ``jobs`` to the next store call; ``on_stored`` gets its result or error.

        If no store call is under way, this caller makes it (and those for whatever is
        submitted meanwhile), so it returns only after ``on_stored`` has run; otherwise it
        returns at once, and the caller making the calls runs ``on_stored`` later.  That is
        what lets a producer connection go back to reading while its push is stored, and
        have its reply sent from the store call's task (``RespServer``): one wake-up per
        command instead of two.  ``on_stored`` runs exactly once, and must not raise.
        """
        if self.submit_nowait(entry, jobs, on_stored):
            await self.flush(entry)

    def submit_nowait(self, entry: QueueEntry, jobs: Sequence[NewJob], on_stored: OnStored) -> bool:
        """``submit`` in two steps, for a caller that must not wait (the RESP server's
        readiness task): True if no store call was under way, and the caller is to make it
        at once, in a task that may wait (``flush``).  Until then, what others submit joins
        that call rather than starting one of its own.
        """
        batcher = self._batchers.get(entry.config.name)
        if batcher is None:
            batcher = self._batchers[entry.config.name] = _Batcher(self.store, self.failures)
        return batcher.add(entry, jobs, on_stored)

    async def flush(self, entry: QueueEntry) -> None:
        """Make the store calls a ``submit_nowait`` that returned True left to this caller."""
        await self._batchers[entry.config.name].flush()


#: Called once with what became of submitted jobs: the result of the store call they went
#: in, with where their own jobs start in it (``PushResult.part``); or why it failed.  The
#: whole result rather than a part of its own: most callers need only their first id, or
#: nothing but success, and a part per submission cost a third of a push's store call.
OnStored = Callable[[PushResult | Exception, int], None]
#: Payloads one push command may carry: it is one store call, whatever its size.
MAX_BATCH = 5000
#: Jobs of several pushes merged into one store call at most.  One call is under way per
#: queue, so a call that takes every push waiting leaves the event loop nothing to read or
#: prepare until the store answers, and the two then take turns instead of overlapping: with
#: redis-benchmark -P 16 from 50 clients (800 pushes in flight) some runs fell into that
#: rhythm for good, at 78-134k pushes/s; capped at 256, 128-146k/s.  A call of 256 still
#: spreads the store's fixed cost per call thin; SQLite measured the same either way.
MERGE_LIMIT = 256
#: A merged store call may take this long, shielded from cancellation (its waiters depend on
#: it even if the task making it was cancelled).
FLUSH_GRACE = 30.0


#: Jobs handed to a queue's next store call: the queue as they were checked against (its
#: topics, as of that moment's configuration), the jobs, and who to tell.
_Submission = tuple[QueueEntry, Sequence[NewJob], OnStored]


class _Batcher:
    """Group commit for one queue's pushes."""

    def __init__(self, store: Store, failures: PushFailures) -> None:
        self.store = store
        self.failures = failures
        self._waiting: list[_Submission] = []
        self._sending: list[_Submission] = []  # in the call under way
        self._flushing = False

    @property
    def busy(self) -> bool:
        """Whether pushes wait or a store call is under way."""
        return self._flushing or bool(self._waiting)

    def add(self, entry: QueueEntry, jobs: Sequence[NewJob], on_stored: OnStored) -> bool:
        """Queue ``jobs`` for the next call; True if the caller is to make it (``flush``)."""
        self._waiting.append((entry, jobs, on_stored))
        if self._flushing:
            return False
        self._flushing = True
        return True

    async def flush(self) -> None:
        try:
            # Shielded, and bounded by FLUSH_GRACE per store call instead: one cancel scope
            # for both, its deadline moved on before each call (a scope costs as much as a
            # trip through the scheduler; the calls go on for as long as pushes come).
            with trio.CancelScope(shield=True) as scope:
                await self._flush_all(scope)
        finally:
            self._flushing = False
            # Out of time (or broken): whoever has no answer yet gets an error, not a hang.
            # The call under way may still complete (SQLite's writer commits what it has
            # queued): its pushes may be stored.  The ones waiting for the next were not.
            sending, waiting = list(self._sending), list(self._waiting)
            self._sending.clear()
            self._waiting.clear()
            late = f"the store did not answer within {FLUSH_GRACE:g}s"
            for submissions, error in (
                (sending, StoreUncertain(late)),
                (waiting, StoreUnavailable(f"{late}; this push was not sent to it")),
            ):
                if submissions:
                    self._failed(submissions, error)

    async def _flush_all(self, scope: trio.CancelScope) -> None:
        while self._waiting:
            # One call per configuration: pushes checked after a reload go to the topics it
            # made, not those of the push that started this flush (under steady load, a
            # topic the reload added would get no job, a removed one would go on getting
            # them).  The same entry object means the same configuration.
            entry = self._waiting[0][0]
            taken = size = 0
            for submitted_entry, submitted, _ in self._waiting:
                if submitted_entry is not entry or (taken and size + len(submitted) > MERGE_LIMIT):
                    break
                size += len(submitted)
                taken += 1
            batch, self._waiting = self._waiting[:taken], self._waiting[taken:]
            jobs = [job for _, submitted, _ in batch for job in submitted]
            self._sending = batch  # if the deadline cancels the call, these are the stranded
            scope.deadline = trio.current_time() + FLUSH_GRACE
            try:
                result = await self.store.push(entry.config.name, entry.routes, jobs)
            except Exception as exc:
                self._sending = []
                self._failed(batch, exc)
                continue
            self._sending = []
            self.failures.stored(entry.config.name)
            first = 0
            for _, submitted, callback in batch:
                callback(result, first)
                first += len(submitted)

    def _failed(self, batch: list[_Submission], exc: Exception) -> None:
        if isinstance(exc, StoreError):  # anything else is a bug, logged where it is answered
            queue = batch[0][0].config.name
            self.failures.failed(queue, sum(len(jobs) for _, jobs, _ in batch), exc)
        for _, _, callback in batch:
            callback(exc, 0)
