"""``/metrics`` in the Prometheus text format, from the telemetry snapshot.

A collector reads the snapshot (refreshed every second) and the dispatchers' duration
histograms when Prometheus scrapes, so there is one set of numbers behind the dashboard,
the admin API and the metrics, and no second bookkeeping on the delivery path.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.telemetry import DURATION_BUCKETS, Telemetry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LABELS = ["queue", "topic"]
_CIRCUIT = {"closed": 0, "half-open": 1, "open": 2}


class _BusgateCollector(Collector):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        snapshot = self.telemetry.snapshot()
        topics = [t for q in snapshot["queues"] for t in q["topics"]]
        # The topics of the snapshot: those of the running configuration, and those a reload
        # removed while they hold jobs.  Telemetry keeps any removed topic's durations (it
        # may come back), but its series leave /metrics with its counters.
        listed = {(t["queue"], t["topic"]) for t in topics}
        counters = {
            name: CounterMetricFamily(f"busgate_jobs_{name}", help_text, labels=_LABELS)
            for name, help_text in (
                ("pushed", "Jobs pushed to the topic (copies after fan-out)."),
                ("delivered", "Delivery attempts that got a response or a failure."),
                ("failed", "Attempts that did not end the job as done (retried or dead)."),
                ("retried", "Attempts followed by a retry."),
                ("dead", "Jobs dead-lettered."),
                ("replayed", "Dead jobs replayed."),
                ("expired", "Leases that expired before an outcome was recorded."),
            )
        }
        depth = GaugeMetricFamily(
            "busgate_jobs", "Jobs in the store by state.", labels=[*_LABELS, "state"]
        )
        in_flight = GaugeMetricFamily(
            "busgate_in_flight", "Deliveries running now.", labels=_LABELS
        )
        circuit = GaugeMetricFamily(
            "busgate_circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            labels=_LABELS,
        )
        opened = CounterMetricFamily(
            "busgate_circuit_opened",
            "Times the circuit breaker opened (a probe that failed reopens it), since the"
            " topic's dispatcher started.",
            labels=_LABELS,
        )
        paused = GaugeMetricFamily("busgate_paused", "1 when the topic is paused.", labels=_LABELS)
        unconfigured = GaugeMetricFamily(
            "busgate_topic_unconfigured",
            "1 for a topic the configuration lacks (removed by a reload) whose jobs are still"
            " in the store: nothing delivers them until it is configured again.",
            labels=_LABELS,
        )
        for topic in topics:
            labels = [topic["queue"], topic["topic"]]
            totals = topic["totals"]
            counters["pushed"].add_metric(labels, totals["pushed"])
            counters["delivered"].add_metric(
                labels, totals["done"] + totals["retried"] + totals["dead"]
            )
            counters["failed"].add_metric(labels, totals["failed"])
            counters["retried"].add_metric(labels, totals["retried"])
            counters["dead"].add_metric(labels, totals["dead"])
            counters["replayed"].add_metric(labels, totals["replayed"])
            counters["expired"].add_metric(labels, totals["expired"])
            for state, count in topic["depth"].items():
                depth.add_metric([*labels, state], count)
            if "configured" in topic:  # removed: no dispatcher of ours, a marker instead
                unconfigured.add_metric(labels, 1)
                continue
            in_flight.add_metric(labels, topic["in_flight"])
            circuit.add_metric(labels, _CIRCUIT[topic["circuit"]["state"]])
            opened.add_metric(labels, topic["circuit"]["opened_total"])
            paused.add_metric(labels, 1 if topic["paused"] else 0)
        store_up = GaugeMetricFamily(
            "busgate_store_up",
            "1 when the last stats sample (every second) reached the store; while 0, the"
            " other series keep the figures of the last sample that did.",
        )
        store_up.add_metric([], 1 if snapshot["store"]["ok"] else 0)
        yield store_up
        yield from counters.values()
        yield from (depth, in_flight, circuit, opened, paused)
        if unconfigured.samples:  # only then: /metrics reads as before while all are configured
            yield unconfigured

        durations = HistogramMetricFamily(
            "busgate_delivery_duration_seconds",
            "Duration of delivery attempts made by this daemon.",
            labels=_LABELS,
        )
        for queue, topic_name, histogram, total, _count in self.telemetry.duration_histograms():
            if (queue, topic_name) not in listed:
                continue
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, DURATION_BUCKETS), "+Inf"], histogram, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            durations.add_metric([queue, topic_name], buckets, total)
        yield durations

        errors = CounterMetricFamily(
            "busgate_backend_errors",
            "Attempts without a usable response, by kind.",
            labels=[*_LABELS, "kind"],
        )
        for queue, topic_name, kind, count in self.telemetry.backend_failures():
            if (queue, topic_name) not in listed:
                continue
            errors.add_metric([queue, topic_name, kind], count)
        yield errors

        refused = CounterMetricFamily(
            "busgate_pushes_refused",
            "Pushes (and producer logins) refused before anything was stored, by queue (empty"
            " when it is not one of the configuration's) and reason.",
            labels=["queue", "reason"],
        )
        for queue, reason, count in self.telemetry.refused_pushes():
            refused.add_metric([queue, reason], count)
        yield refused

        failed = CounterMetricFamily(
            "busgate_pushes_failed",
            "Pushes accepted and then failed by the store, by queue and whether they may be"
            ' stored ("no": the producer was told nothing was; "maybe": that it may have been).',
            labels=["queue", "stored"],
        )
        for queue, stored, count in self.telemetry.failed_pushes():
            failed.add_metric([queue, stored], count)
        yield failed


def registry_for(telemetry: Telemetry) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_BusgateCollector(telemetry))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
