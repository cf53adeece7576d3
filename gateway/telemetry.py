"""What the operator surface shows: one snapshot of every topic, refreshed every second.

A sampler reads the store's depths and counters for all topics in one call per second and
keeps the last minute of them, so rates in and out per second and per minute are deltas of
counters the store keeps (cluster-wide on Redis: every daemon's pushes and deliveries).
Durations and recent failures are this daemon's own, fed by the dispatchers after each
attempt.  The stats endpoint, the dashboard's WebSocket and ``/metrics`` all read the same
cached snapshot, so answering them costs nothing however many topics and jobs there are.

Live subscribers each get a bounded buffer: snapshots every second and job events, at most
``EVENTS_PER_SECOND`` of them per second (sampled beyond that).  A subscriber whose buffer
fills is dropped; memory never grows with a slow client.
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from adapters.delivery.base import Delivery
from adapters.storage.base import Store
from adapters.storage.errors import StoreError
from adapters.storage.jobs import Attempt, Job, Outcome, TopicStats
from gateway import logs
from gateway.config import Config, TopicConfig
from gateway.dispatcher import DispatcherStatistics
from gateway.policy import Decision

log = logging.getLogger("busgate.telemetry")

SAMPLE_INTERVAL = 1.0
#: Attempts whose durations make the percentiles, per topic.
DURATION_SAMPLES = 2048
RECENT_FAILURES = 50
SUBSCRIBER_BUFFER = 256
EVENTS_PER_SECOND = 50

#: Duration histogram buckets (seconds), shared with /metrics.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


@dataclass(slots=True)
class _TopicRecord:
    """Per-topic figures only this daemon knows (its own deliveries)."""

    durations: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=DURATION_SAMPLES)
    )
    histogram: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    attempts: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # backend errors by kind
    recent_failures: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_FAILURES)
    )
    # (monotonic time, pushed_total, attempts out) for the last minute of samples
    samples: collections.deque[tuple[float, int, int]] = field(
        default_factory=lambda: collections.deque(maxlen=62)
    )


# Bound once: module and enum attribute look-ups, per attempt otherwise.
_bucket_of = bisect.bisect_left
_DONE = Outcome.DONE


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


class Telemetry:
    def __init__(
        self,
        store: Store,
        config: Callable[[], Config],
        dispatchers: Callable[[], Mapping[tuple[str, str], DispatcherStatistics]],
        health: Callable[[], Mapping[tuple[str, str], dict[str, Any] | None]] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        refused: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        failed: Callable[[], Mapping[tuple[str, str], int]] | None = None,
    ) -> None:
        self.store = store
        self._config = config
        self._dispatchers = dispatchers
        self._health = health or dict
        #: Pushes refused, by (queue, reason): the producer service's ``Refusals``.
        self._refused = refused or dict
        #: Pushes the store failed, by (queue, stored): the producer service's ``PushFailures``.
        self._failed = failed or dict
        self._clock = clock
        self._topics: dict[tuple[str, str], _TopicRecord] = {}
        #: Whether the last sample reached the store, and since when it has not: a snapshot
        #: kept from before an outage must not pass for the state of things now.
        self._store: dict[str, Any] = {"ok": True, "error": None, "since": None}
        self._snapshot: dict[str, Any] = {
            "generated_at": None,
            "store": self._store,
            "queues": [],
        }
        # Encoded at most once per sample, when first asked for: every request and every live
        # client gets the same bytes, and a daemon nobody watches encodes nothing (with
        # hundreds of topics, encoding every second was a good part of its idle CPU).
        self._snapshot_json: bytes | None = None
        self._snapshot_message: bytes | None = None
        self._stats: dict[tuple[str, str], TopicStats] = {}
        self._subscribers: set[Subscriber] = set()
        self.sample_errors = 0
        self._failures = logs.Repeating(log)  # a store down fails a sample every second
        # Uptime is measured on a monotonic clock: the wall clock may be stepped (NTP), and
        # /v1/stats showed a negative uptime after a step back.
        self._started = time.monotonic()

    # -- fed by the dispatchers -----------------------------------------------------------------

    def record(self, job: Job, attempt: Attempt, decision: Decision, delivery: Delivery) -> None:
        # get, not setdefault: that would build a record per delivery to throw away.
        record = self._topics.get((job.queue, job.topic))
        if record is None:
            record = self._topics[job.queue, job.topic] = _TopicRecord()
        duration = attempt.duration  # read once: this runs per attempt
        record.attempts += 1
        record.durations.append(duration)
        record.duration_sum += duration
        record.histogram[_bucket_of(DURATION_BUCKETS, duration)] += 1
        if delivery.failure is not None:
            kind = delivery.failure.value
            record.failures[kind] = record.failures.get(kind, 0) + 1
        failed = decision.outcome is not _DONE
        if not failed and not self._subscribers:
            return  # an event nobody reads: not built
        event = {
            "type": "attempt",
            "job_id": job.id,
            "queue": job.queue,
            "topic": job.topic,
            "attempt": attempt.attempt,
            "outcome": decision.outcome.value,
            "status": attempt.status,
            "duration_ms": round(attempt.duration * 1000, 3),
            "at": attempt.started_at,
        }
        if failed:
            failure = {
                **event,
                "error": attempt.error,
                "body": _text(attempt.body),
                "stderr": _text(attempt.stderr),
            }
            record.recent_failures.appendleft(failure)
            event = failure
        if self._subscribers:
            message = _encode(event)
            for subscriber in list(self._subscribers):
                subscriber.offer_event(message)

    # -- the snapshot ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot

    def snapshot_json(self) -> bytes:
        """The snapshot as JSON, encoded once per sample."""
        if self._snapshot_json is None:
            self._snapshot_json = _encode(self._snapshot)
        return self._snapshot_json

    def _message(self) -> bytes:
        """The snapshot as the live feed sends it, encoded once per sample."""
        if self._snapshot_message is None:
            self._snapshot_message = _encode({"type": "stats", **self._snapshot})
        return self._snapshot_message

    def recent_failures(self, queue: str, topic: str) -> list[dict[str, Any]]:
        record = self._topics.get((queue, topic))
        return [] if record is None else list(record.recent_failures)

    def duration_histograms(self) -> Iterable[tuple[str, str, list[int], float, int]]:
        for (queue, topic), record in self._topics.items():
            yield queue, topic, record.histogram, record.duration_sum, record.attempts

    def refused_pushes(self) -> Iterable[tuple[str, str, int]]:
        for (queue, reason), count in self._refused().items():
            yield queue, reason, count

    def failed_pushes(self) -> Iterable[tuple[str, str, int]]:
        for (queue, stored), count in self._failed().items():
            yield queue, stored, count

    def backend_failures(self) -> Iterable[tuple[str, str, str, int]]:
        for (queue, topic), record in self._topics.items():
            for kind, count in record.failures.items():
                yield queue, topic, kind, count

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sample()
        task_status.started()
        while True:
            await trio.sleep(SAMPLE_INTERVAL)
            await self.sample()

    async def sample(self) -> None:
        config = self._config()
        keys = [(q.name, t.name) for q in config.queues.values() for t in q.topics]
        limit = max(SAMPLE_INTERVAL * 5, 5)
        try:
            with trio.fail_after(limit):
                # And the topics a reload (or a restart) left out of the configuration: their
                # jobs stay in the store, where nothing delivers them (``_build``).
                configured = set(keys)
                keys += [key for key in await self.store.topics() if key not in configured]
                stats = await self.store.stats_many(keys)
        except (StoreError, trio.TooSlowError) as exc:
            self.sample_errors += 1
            why = str(exc) or f"the store did not answer within {limit:g}s"
            self._failures.failed(logging.WARNING, "stats sample failed: %s", why)
            # The figures stay those of the last sample (generated_at says when), marked so.
            since = self._store["since"] if not self._store["ok"] else self._clock()
            self._store = {"ok": False, "error": why, "since": since}
            self._publish({**self._snapshot, "store": self._store})
            return
        now = trio.current_time()
        if self._failures.failing:
            self._failures.recovered("stats sample succeeded again")
        self._store = {"ok": True, "error": None, "since": None}
        self._stats = dict(zip(keys, stats, strict=True))
        # A reload may have come while the store answered: build from the configuration that
        # runs now, so a topic it removed is marked so at once (its stats were read), and one
        # it added waits for the next sample, being unread.
        self._publish(self._build(self._config(), now))

    def _publish(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot
        self._snapshot_json = self._snapshot_message = None
        for subscriber in list(self._subscribers):
            subscriber.offer(self._message())

    def _build(self, config: Config, now: float) -> dict[str, Any]:
        """Every configured topic, and after them those of a queue the configuration no
        longer has, marked ``"configured": false``, for as long as they hold jobs (ready,
        delayed, leased or dead): an operator who removed a topic by mistake sees them
        stranded, in the stats, ``busgate stats``, the dashboard and ``/metrics`` alike."""
        dispatchers = self._dispatchers()
        health = self._health()
        queues: dict[str, dict[str, Any]] = {}
        configured: set[tuple[str, str]] = set()
        listed: set[tuple[str, str]] = set()  # removed, but still holding jobs
        for queue in config.queues.values():
            topics = []
            for topic in queue.topics:
                key = (queue.name, topic.name)
                configured.add(key)
                stats = self._stats.get(key)
                if stats is None:
                    continue
                record = self._topics.setdefault(key, _TopicRecord())
                topics.append(
                    self._topic(topic, stats, record, dispatchers.get(key), health.get(key), now)
                )
            queues[queue.name] = {
                "name": queue.name,
                "password": queue.password is not None,
                "topics": topics,
            }
        for (queue_name, topic_name), stats in self._stats.items():
            if (queue_name, topic_name) in configured or not _holds_jobs(stats):
                continue
            entry = queues.get(queue_name)
            if entry is None:
                entry = queues[queue_name] = {
                    "name": queue_name,
                    "password": False,
                    "topics": [],
                    "configured": False,
                }
            record = self._topics.setdefault((queue_name, topic_name), _TopicRecord())
            # A reload's drain may still be delivering its last jobs: counted in flight.
            draining = dispatchers.get((queue_name, topic_name))
            entry["topics"].append(self._topic(None, stats, record, draining, None, now))
            listed.add((queue_name, topic_name))
        # What is no longer listed (removed, and holding no jobs) nor draining goes: a daemon
        # whose topics come and go by reload kept each name's durations and failures
        # (about 100 KB with full failure excerpts) for good.
        kept = configured | listed | dispatchers.keys()
        for key in [k for k in self._topics if k not in kept]:
            del self._topics[key]
        return {
            "generated_at": self._clock(),
            "uptime": round(time.monotonic() - self._started, 1),
            "store": self._store,
            "queues": list(queues.values()),
        }

    @staticmethod
    def _topic(
        topic: TopicConfig | None,
        stats: TopicStats,
        record: _TopicRecord,
        dispatcher: DispatcherStatistics | None,
        health: dict[str, Any] | None,
        now: float,
    ) -> dict[str, Any]:
        attempts_out = stats.done_total + stats.retried_total + stats.dead_total
        record.samples.append((now, stats.pushed_total, attempts_out))

        def rate(window: float, index: int) -> float:
            recent = record.samples[-1]
            for sample in record.samples:
                if recent[0] - sample[0] <= window + 0.5:
                    elapsed = recent[0] - sample[0]
                    return round((recent[index] - sample[index]) / elapsed, 3) if elapsed else 0.0
            return 0.0

        ordered = sorted(record.durations)

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        circuit = dispatcher.circuit if dispatcher is not None else None
        # A topic the configuration lacks has no backend, and nothing of this daemon's
        # delivers it (``_build``).
        rate_limit = None if topic is None else topic.rate_limit
        entry = {
            "queue": stats.queue,
            "topic": stats.topic,
            "backend": None if topic is None else topic.backend,
            "kind": None if topic is None else topic.kind,
            "concurrency": 0 if topic is None else topic.concurrency,
            "in_flight": dispatcher.in_flight if dispatcher else 0,
            "buffered": dispatcher.buffered if dispatcher else 0,
            "paused": dispatcher.paused if dispatcher else topic is not None and topic.paused,
            "circuit": {
                "state": circuit.state.value if circuit else "closed",
                "opened_total": circuit.opened_total if circuit else 0,
                "consecutive_failures": circuit.consecutive_failures if circuit else 0,
            },
            "rate_limit": None if rate_limit is None else rate_limit.per_second,
            "depth": {
                "ready": stats.ready,
                "delayed": stats.delayed,
                "leased": stats.leased,
                "dead": stats.dead,
                "done_kept": stats.done,
            },
            "totals": {
                "pushed": stats.pushed_total,
                "done": stats.done_total,
                "retried": stats.retried_total,
                "dead": stats.dead_total,
                "failed": stats.retried_total + stats.dead_total,
                "expired": stats.expired_total,
                "replayed": stats.replayed_total,
                "unmatched": stats.unmatched_total,
            },
            "rates": {
                "in_per_second": rate(1.0, 1),
                "in_per_minute": round(rate(60.0, 1) * 60, 3),
                "out_per_second": rate(1.0, 2),
                "out_per_minute": round(rate(60.0, 2) * 60, 3),
            },
            "duration_ms": {
                "p50": ms(percentile(ordered, 0.50)),
                "p95": ms(percentile(ordered, 0.95)),
                "p99": ms(percentile(ordered, 0.99)),
                "samples": len(ordered),
            },
            "backend_errors": dict(record.failures),
            "backend_health": health,
        }
        if topic is None:
            entry["configured"] = False
        return entry

    # -- live subscribers -----------------------------------------------------------------------

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber(self)
        self._subscribers.add(subscriber)
        subscriber.offer(self._message())
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


def _holds_jobs(stats: TopicStats) -> bool:
    """Jobs an operator must act on: waiting to be delivered, or dead."""
    return stats.ready + stats.delayed + stats.leased + stats.dead > 0


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


class Subscriber:
    """One live client: a bounded buffer of messages; overflow drops the client."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._send, self.messages = trio.open_memory_channel[bytes](SUBSCRIBER_BUFFER)
        self._window_start = 0.0
        self._window_events = 0
        self.sampled_out = 0  # events skipped to stay within EVENTS_PER_SECOND
        self.dropped = False

    def offer_event(self, event: bytes) -> None:
        now = trio.current_time()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_events = now, 0
        if self._window_events >= EVENTS_PER_SECOND:
            self.sampled_out += 1
            return
        self._window_events += 1
        self.offer(event)

    def offer(self, message: bytes) -> None:
        """Queue an encoded JSON message; a full buffer drops this subscriber."""
        if self.dropped:
            return
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            # A client this far behind is not watching: let it go rather than buffer more.
            self.dropped = True
            self._send.close()
            self._telemetry.unsubscribe(self)
        except trio.ClosedResourceError:
            self._telemetry.unsubscribe(self)

    def close(self) -> None:
        self._send.close()
        self._telemetry.unsubscribe(self)
