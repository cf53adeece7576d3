"""A topic's ``connect_timeout``: how long one connection attempt may take, within what is
left of the attempt's ``timeout``.  A backend whose accept queue is full (an overloaded
server, a host that drops SYNs) neither accepts nor refuses: without it, every attempt
waited the fixed 5 s, whatever the operator knew of the backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import yaml

from gateway.app import App
from gateway.config import ConfigError, load_config
from gateway.resp import encode_command
from tests.support.daemon import running_daemon, write_config
from tests.support.ports import unanswered_port

ROOT = Path(__file__).resolve().parents[2]


def queue(port: int, extra: str = "") -> str:
    """One HTTP and one FastCGI topic, both to ``port``; a retry waits a minute, so the
    test sees one attempt each."""
    common = f"timeout: 10s, retry: {{backoff: 1m, max_backoff: 1m}}{extra}"
    return (
        "queue: q\ntopics:\n"
        f"  web: {{backend: 'http://127.0.0.1:{port}/hook', {common}}}\n"
        f"  php: {{backend: 'fastcgi://127.0.0.1:{port}', script: /srv/app/index.php,"
        f" {common}}}\n"
    )


async def push(app: App) -> str:
    host, _, port = app.resp_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(encode_command("XADD", "q", "*", "payload", "{}"))
    reply = await stream.receive_some(1000)
    await stream.aclose()
    assert reply.startswith(b"$"), reply
    return reply.split(b"\r\n")[1].decode()


async def first_attempts(app: App, job_id: str) -> dict[str, tuple[float, str]]:
    """Each topic's first attempt at ``job_id``: (duration, error)."""
    assert app.store is not None
    with trio.fail_after(8):  # well under the 10 s timeout and the default 5 s connect
        while True:
            copies = await app.store.get_job(job_id)
            if len(copies) == 2 and all(copy.attempts for copy in copies):
                return {
                    copy.topic: (copy.attempts[0].duration, copy.attempts[0].error or "")
                    for copy in copies
                }
            await trio.sleep(0.05)


async def test_a_connect_that_hangs_fails_after_connect_timeout_as_a_connect_timeout(
    tmp_path: Path,
) -> None:
    with unanswered_port() as port:
        config = write_config(tmp_path, {"q": queue(port, ", connect_timeout: 300ms")})
        async with running_daemon(config) as app:
            attempts = await first_attempts(app, await push(app))
    for topic, (duration, error) in attempts.items():
        assert 0.25 < duration < 2.0, (topic, duration, error)
        # A connect failure: no attempt spent, and the circuit counts it.
        assert error.startswith("connect: "), (topic, error)
        assert "connect timeout: not connected within 0.3s" in error, (topic, error)


async def test_a_reload_applies_a_changed_connect_timeout(tmp_path: Path) -> None:
    with unanswered_port() as port:
        config = write_config(tmp_path, {"q": queue(port)})
        async with running_daemon(config) as app:
            (tmp_path / "conf.d" / "q.yaml").write_text(queue(port, ", connect_timeout: 200ms"))
            report = await app.reload(load_config(config))
            assert sorted(report.changed) == [("q", "php"), ("q", "web")]
            attempts = await first_attempts(app, await push(app))
    for topic, (duration, error) in attempts.items():
        assert 0.15 < duration < 2.0, (topic, duration, error)
        assert "connect timeout: not connected within 0.2s" in error, (topic, error)


def test_check_config_shows_the_connect_timeout_and_defaults_it_to_5s(tmp_path: Path) -> None:
    text = queue(9) + "  other: {backend: 'http://127.0.0.1:9/'}\n"
    text = text.replace("timeout: 10s,", "timeout: 10s, connect_timeout: 1500ms,", 1)
    config = write_config(tmp_path, {"q": text})
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    topics = yaml.safe_load(done.stdout)["queues"][0]["topics"]
    shown = {name: topic["connect_timeout"] for name, topic in topics.items()}
    assert shown == {"web": "1500ms", "php": "5s", "other": "5s"}


@pytest.mark.parametrize(
    ("value", "said"),
    [("0s", "longer than 0s"), ("0", "longer than 0s"), ("soon", "not a duration")],
)
def test_a_connect_timeout_must_be_a_positive_duration(
    tmp_path: Path, value: str, said: str
) -> None:
    text = "queue: q\ntopics:\n  t:\n    backend: http://127.0.0.1:9/\n"
    text += f"    connect_timeout: {value}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, {"q": text}))
    error = caught.value
    assert (error.line, error.key) == (5, "topics.t.connect_timeout"), str(error)
    assert said in error.message, str(error)
