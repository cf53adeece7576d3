"""A log line for every event an operator has to know of: the circuit breaker's changes, leases
that expired, test deliveries, pruned jobs, refused pushes, deliveries a shutdown cut short;
and text from outside that cannot forge a field."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from adapters.delivery.base import Delivery
from adapters.storage.jobs import Attempt, Job, Outcome, Priority
from gateway import dispatcher as dispatch
from gateway.app import App
from gateway.logs import quoted
from gateway.policy import Decision
from gateway.resp import encode_command
from tests.support.daemon import running_daemon, write_config
from tests.support.http_server import RecordingServer, serving

TOKEN = "0123456789abcdef0123456789"


def daemon_config(tmp_path: Path, backend: str, extra: str = "") -> Path:
    """Queue q, topic t on ``backend`` (one attempt, a circuit opened by one failure), and a
    queue with a password."""
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    topic = f"""\
        queue: q
        topics:
          t:
            backend: {backend}
            timeout: 10s
            retry: {{max_attempts: 1}}
            circuit: {{failures: 1, cooldown: 200ms}}
{extra}"""
    locked = """\
        queue: locked
        password: s3cret
        topics:
          t:
            backend: http://127.0.0.1:9/
            paused: true
        """
    return write_config(
        tmp_path, {"q": topic, "locked": locked}, main_extra="admin_token_file: admin.token\n"
    )


async def resp(app: App, *commands: tuple[str, ...]) -> bytes:
    """Send ``commands`` over one connection; the replies, once there is one per command."""
    host, _, port = app.resp_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"".join(encode_command(*command) for command in commands))
    replies = b""
    with trio.fail_after(10):
        while replies.count(b"\r\n") < len(commands):
            replies += await stream.receive_some(4096)
    await stream.aclose()
    return replies


async def push(app: App, *payloads: bytes) -> None:
    assert await resp(app, ("RPUSH", "q", *(p.decode() for p in payloads))) == (
        b":%d\r\n" % len(payloads)
    )


def http(app: App, method: str, path: str, body: object, **headers: str) -> int:
    request = urllib.request.Request(
        f"http://{app.http_address}{path}",
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def logged(caplog: pytest.LogCaptureFixture, text: str, count: int = 1) -> list[str]:
    """The lines holding ``text``, once there are ``count`` of them."""
    with trio.fail_after(10):
        while len(found := lines(caplog, text)) < count:
            await trio.sleep(0.02)
    return found


async def until(condition: Callable[[], object]) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.02)


# -- logfmt ---------------------------------------------------------------------------------

#: A logfmt field: key=value or key="value with \" escapes".
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def fields(line: str) -> list[tuple[str, str]]:
    return FIELD.findall(line)


def test_quoted_escapes_what_could_end_a_value_or_a_line() -> None:
    assert quoted("plain") == '"plain"'
    assert quoted('a "b" \\c') == r'"a \"b\" \\c"'
    assert quoted("one\ntwo\r\tthree\x00\x1b[31m\x7f\x85\u2028é") == (
        r'"one\ntwo\r\tthree\x00\x1b[31m\x7f\x85\u2028é"'
    )
    assert quoted(ValueError("x y")) == '"x y"'


def test_a_backend_cannot_forge_fields_in_an_attempts_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A redirect's reason holds the backend's Location header; unquoted, a logfmt parser
    read ``outcome=done`` and ``job=FAKE`` from it."""
    caplog.set_level("INFO", logger="busgate.dispatch")
    job = Job("j1", "q", "t", b"{}", {}, Priority.NORMAL, 1, 0.0, 0.0, "ab" * 16)
    delivery = Delivery(0.01, 302, message="https://x/ outcome=done job=FAKE\nforged line")
    reason = f"status 302, Location: {delivery.message}"
    decision = Decision(Outcome.RETRY, reason, run_at=1.0)
    attempt = Attempt(1, 0.0, 0.01, Outcome.RETRY, 302, reason)
    dispatch._log_attempt(job, attempt, decision, delivery, recorded=True)
    (line,) = lines(caplog, "job=j1")
    assert "\n" not in line
    keys = [key for key, _ in fields(line)]
    assert len(keys) == len(set(keys)), line
    assert dict(fields(line))["outcome"] == "retry"
    assert dict(fields(line))["reason"] == quoted(reason)


# -- events of a running daemon ------------------------------------------------------------


async def test_the_circuit_logs_when_it_opens_probes_and_closes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="busgate.dispatch")
    async with (
        serving(RecordingServer()) as backend,
        running_daemon(daemon_config(tmp_path, backend.url)) as app,
    ):
        await push(app, b'{"respond_status": 503}')
        (opened,) = await logged(caplog, "circuit opened")
        await push(app, b"{}")  # the probe, once the cooldown is over
        await logged(caplog, "circuit closed queue=q topic=t")
    assert "queue=q topic=t failures=1 status=503" in opened
    (half_open,) = lines(caplog, "circuit half-open")
    assert "queue=q topic=t" in half_open
    messages = [r.getMessage() for r in caplog.records]
    order = [
        next(i for i, m in enumerate(messages) if w in m) for w in ("opened", "half-", "closed")
    ]
    assert order == sorted(order)


async def test_expired_leases_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A daemon that died holding a job: its lease runs out, and with max_attempts 1 the job
    goes dead.  That must not happen without a line."""
    caplog.set_level("INFO", logger="busgate.dispatch")
    extra = "            paused: true\n            lease: 1s\n"
    config = daemon_config(tmp_path, "http://127.0.0.1:9/", extra=extra)
    async with running_daemon(config) as app:
        await push(app, b"{}")
        assert app.store is not None
        (job,) = await app.store.reserve("q", "t", 1, 1.0)  # by a daemon that dies
        (line,) = await logged(caplog, "outcome=expired")
        stats = await app.store.stats("q", "t")
    assert f"job={job.id} queue=q topic=t attempt=1 outcome=expired status=- " in line
    assert 'reason="lease expired before an outcome was recorded: dead at max_attempts"' in line
    assert (stats.expired_total, stats.dead_total) == (1, 1)


async def test_a_test_delivery_writes_a_line_with_its_job_id_and_trace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="busgate.admin")
    async with (
        serving(RecordingServer()) as backend,
        running_daemon(daemon_config(tmp_path, backend.url)) as app,
    ):
        path = "/v1/queues/q/topics/t/test-delivery"
        body = {"payload": {"respond_status": 201}}
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert await trio.to_thread.run_sync(lambda: http(app, "POST", path, body, **auth))
    (request,) = backend.requests
    job_id = request.headers["x-busgate-job-id"]
    trace = request.headers["traceparent"].split("-")[1]
    (line,) = lines(caplog, "test delivery")
    assert f"job={job_id} queue=q topic=t attempt=1 status=201 " in line
    assert f" trace={trace}" in line


async def test_pruned_dead_jobs_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level("INFO", logger="busgate.dispatch")
    monkeypatch.setattr(dispatch, "PRUNE_INTERVAL", 0.1)
    async with serving(RecordingServer()) as backend:
        extra = "            dead: {max_count: 0}\n"
        async with running_daemon(daemon_config(tmp_path, backend.url, extra)) as app:
            await push(app, b'{"respond_status": 404}', b'{"respond_status": 404}')
            pruned = 0
            with trio.fail_after(10):
                while pruned < 2:
                    await trio.sleep(0.05)
                    found = lines(caplog, "pruned queue=q topic=t")
                    pruned = sum(int(re.findall(r"jobs=(\d+)", line)[0]) for line in found)
    assert pruned == 2


async def test_refused_pushes_are_logged_once_then_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="busgate.producer")
    config = daemon_config(tmp_path, "http://127.0.0.1:9/", extra="            paused: true\n")
    async with running_daemon(config) as app:
        replies = await resp(
            app,
            *[("LPUSH", "nosuch", "x")] * 3,  # a producer retrying in a loop: one line
            ("XADD", "q", "*", "payload", "x", "traceparent", "bad"),
            ("AUTH", "locked", "wrong"),
            ("HELLO", "3", "AUTH", "locked", "wrong"),  # counted as the same queue's
            ("LPUSH", "locked", "x"),
        )
        assert [reply[:1] for reply in replies.split(b"\r\n")[:-1]] == [b"-"] * 7
        status = await trio.to_thread.run_sync(
            lambda: http(app, "POST", "/v1/queues/q/jobs", {"payload": 1, "traceparent": "bad"})
        )
        assert status == 400
        status = await trio.to_thread.run_sync(
            lambda: http(
                app,
                "POST",
                "/v1/queues/locked/jobs",
                {"payload": 1, "traceparent": "bad"},
                Authorization="Bearer s3cret",
            )
        )
        assert status == 400
        await push(app, b"{}")  # an accepted push: no line
    refused = lines(caplog, "push refused")
    # The HTTP push to q is of a kind (queue and reason) logged within the minute: counted.
    assert len(refused) == 5, refused
    (unknown,) = lines(caplog, "reason=unknown_queue")
    assert "via=resp queue=- reason=unknown_queue error=\"ERR unknown queue 'nosuch'\"" in unknown
    (traceparent,) = lines(caplog, "via=resp queue=q reason=invalid")
    assert "traceparent" in traceparent
    assert lines(caplog, "via=resp queue=locked reason=wrong_password")
    assert lines(caplog, "via=resp queue=locked reason=noauth")
    (over_http,) = lines(caplog, "via=http queue=locked reason=invalid")
    assert "traceparent" in over_http
    assert app.service is not None
    assert app.service.refusals.counts == {
        ("", "unknown_queue"): 3,
        ("q", "invalid"): 2,
        ("locked", "wrong_password"): 2,
        ("locked", "noauth"): 1,
        ("locked", "invalid"): 1,
    }


async def test_a_payload_over_every_queues_limit_is_counted_as_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Past the largest max_payload the parser skips a payload unread, before its queue's
    # limit is looked at: those refusals were answered, but neither logged nor counted.
    caplog.set_level("INFO", logger="busgate.producer")
    config = daemon_config(tmp_path, "http://127.0.0.1:9/", extra="            paused: true\n")
    big = "x" * (3 * 1024 * 1024)
    async with running_daemon(config) as app:
        replies = await resp(
            app, ("LPUSH", "q", big), ("LPUSH", "q", "fits", big), ("LPUSH", big, "x"), ("PING",)
        )
        assert replies.count(b"-ERR payload of 3145728 bytes exceeds max_payload") == 3
        assert replies.endswith(b"+PONG\r\n")
        assert app.service is not None
        assert app.service.refusals.counts == {("q", "too_large"): 2, ("", "too_large"): 1}
    (line,) = lines(caplog, "via=resp queue=q reason=too_large")
    assert "exceeds max_payload of 1048576 bytes (the largest of any queue)" in line


async def test_a_delivery_cancelled_at_shutdown_is_logged_with_its_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Still running after shutdown_timeout: cancelled, and its job released; the backend
    may have run it, and it will be delivered again."""
    caplog.set_level("INFO", logger="busgate.dispatch")
    async with (
        serving(RecordingServer()) as backend,
        running_daemon(daemon_config(tmp_path, backend.url)) as app,
    ):
        await push(app, b'{"sleep_ms": 5000}')
        await until(lambda: backend.requests)
        app.shutdown(timeout=0.2)
        with trio.fail_after(10):
            await app._dispatchers["q", "t"].finished.wait()
    (request,) = backend.requests
    (line,) = lines(caplog, "delivery cancelled")
    assert next(r.levelno for r in caplog.records if "cancelled" in r.msg) == logging.WARNING
    job_id = request.headers["x-busgate-job-id"]
    trace = request.headers["traceparent"].split("-")[1]
    assert f"job={job_id} queue=q topic=t attempt=1 trace={trace} " in line
    assert "delivered again" in line
