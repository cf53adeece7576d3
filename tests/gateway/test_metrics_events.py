"""/metrics counts how often a circuit opened, and the pushes refused, by queue and reason."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import App
from tests.gateway.test_logs_events import TOKEN, daemon_config, push, resp, until
from tests.support.daemon import running_daemon
from tests.support.http_server import RecordingServer, serving


async def samples(app: App, family: str) -> dict[tuple[str, ...], float]:
    """The ``family`` counter's values by label values, as /metrics has them now."""
    await app.telemetry.sample()  # don't wait for the next tick

    def get() -> str:
        request = urllib.request.Request(
            f"http://{app.http_address}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.read().decode())

    text = await trio.to_thread.run_sync(get)
    return {
        tuple(sample.labels.values()): sample.value
        for metrics in text_string_to_metric_families(text)
        if metrics.name == family
        for sample in metrics.samples
        if sample.name == family + "_total"
    }


async def test_the_times_a_circuit_opened_are_counted(tmp_path: Path) -> None:
    async with (
        serving(RecordingServer()) as backend,
        running_daemon(daemon_config(tmp_path, backend.url)) as app,
    ):
        assert (await samples(app, "busgate_circuit_opened"))["q", "t"] == 0
        await push(app, b'{"respond_status": 503}')
        dispatcher = app._dispatchers["q", "t"]
        await until(lambda: dispatcher.circuit.statistics().opened_total == 1)
        assert (await samples(app, "busgate_circuit_opened"))["q", "t"] == 1


async def test_refused_pushes_are_counted_by_queue_and_reason(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, "http://127.0.0.1:9/", extra="            paused: true\n")
    async with running_daemon(config) as app:
        await resp(
            app,
            *[("LPUSH", "nosuch", "x")] * 3,
            ("LPUSH", "locked", "x"),
            ("LPUSH", "q", "x"),  # accepted: not counted
        )
        assert await samples(app, "busgate_pushes_refused") == {
            ("", "unknown_queue"): 3,
            ("locked", "noauth"): 1,
        }
