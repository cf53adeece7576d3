"""The live broker: sampled events, bounded buffers, slow subscribers dropped."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

from adapters.storage.sqlite import SQLiteStore
from gateway.telemetry import EVENTS_PER_SECOND, SUBSCRIBER_BUFFER, Telemetry, percentile


async def telemetry(
    tmp_path: Any, clock: Callable[[], float] = time.time
) -> tuple[Telemetry, SQLiteStore]:
    store = await SQLiteStore.open(str(tmp_path / "t.db"))
    from gateway.config import load_config
    from tests.support.daemon import write_config

    config = load_config(write_config(tmp_path, {}))
    return Telemetry(store, lambda: config, dict, clock=clock), store


async def test_events_are_sampled_per_second(tmp_path: Any) -> None:
    t, store = await telemetry(tmp_path)
    subscriber = t.subscribe()
    for n in range(EVENTS_PER_SECOND * 2):
        subscriber.offer_event(b'{"type":"attempt","n":%d}' % n)
    assert subscriber.sampled_out == EVENTS_PER_SECOND
    received = []
    while True:
        try:
            received.append(subscriber.messages.receive_nowait())
        except trio.WouldBlock:
            break
    assert len(received) == 1 + EVENTS_PER_SECOND  # the first snapshot, then the events
    await trio.sleep(1.01)
    subscriber.offer_event(b'{"type":"attempt"}')
    assert subscriber.messages.receive_nowait() == b'{"type":"attempt"}'
    await store.aclose()


async def test_a_subscriber_that_does_not_read_is_dropped(tmp_path: Any) -> None:
    t, store = await telemetry(tmp_path)
    slow = t.subscribe()
    fast = t.subscribe()
    for _ in range(SUBSCRIBER_BUFFER + 5):
        await t.sample()
        while True:
            try:
                fast.messages.receive_nowait()
            except trio.WouldBlock:
                break
    assert slow.dropped and not fast.dropped
    assert t.subscribers == 1
    await store.aclose()


def test_percentiles() -> None:
    ordered = [float(n) for n in range(1, 101)]
    assert (percentile(ordered, 0.5), percentile(ordered, 0.95), percentile(ordered, 0.99)) == (
        50.0,
        95.0,
        99.0,
    )
    assert percentile([], 0.5) is None and percentile([7.0], 0.99) == 7.0


async def test_a_reload_during_a_sample_is_what_the_snapshot_shows(tmp_path: Any) -> None:
    """The sampler reads the store, then builds the snapshot: a reload that came meanwhile
    must not be undone by it (a removed topic listed as configured for a second)."""
    from adapters.storage.fanout import Filter
    from adapters.storage.jobs import NewJob
    from gateway.config import load_config
    from tests.support.daemon import write_config

    topic = "queue: q\ntopics:\n  {}: {{backend: 'http://127.0.0.1:9/', paused: true}}\n"
    both = load_config(
        write_config(
            tmp_path / "both",
            {"q": topic.format("a") + "  b: {backend: 'http://127.0.0.1:9/', paused: true}\n"},
        )
    )
    only_a = load_config(write_config(tmp_path / "only_a", {"q": topic.format("a")}))
    store = await SQLiteStore.open(str(tmp_path / "t.db"))
    await store.push("q", [("a", Filter()), ("b", Filter())], [NewJob(b"x")])
    running = [both]

    class ReloadedMeanwhile:
        async def stats_many(self, keys: Any) -> Any:
            stats = await store.stats_many(keys)
            running[0] = only_a  # a reload removes b while the store answers
            return stats

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

    telemetry = Telemetry(ReloadedMeanwhile(), lambda: running[0], dict)  # type: ignore[arg-type]
    try:
        await telemetry.sample()
        (queue,) = telemetry.snapshot()["queues"]
        entries = {t["topic"]: t.get("configured", True) for t in queue["topics"]}
        assert entries == {"a": True, "b": False}
    finally:
        await store.aclose()


async def test_uptime_stays_true_when_the_wall_clock_is_stepped_back(tmp_path: Any) -> None:
    wall = [1_800_000_000.0]
    t, store = await telemetry(tmp_path, clock=lambda: wall[0])
    await trio.sleep(0.05)
    wall[0] -= 3600  # NTP steps the clock back an hour
    await t.sample()
    assert 0.0 <= t.snapshot()["uptime"] < 5
    await store.aclose()
