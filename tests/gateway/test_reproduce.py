"""``busgate curl JOB_ID``: the printed command is run, and the backend must see again what
the daemon's delivery showed it: the same CGI environment or headers, the same body bytes,
only a new traceparent span."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
import redis
import trio
from redis.typing import EncodableT, FieldT

from adapters.delivery.fastcgi import FastCGIBackend
from adapters.storage.jobs import JobRecord, NewJob, Priority, State
from adapters.storage.sqlite import SQLiteStore
from gateway.app import App, build_backend
from gateway.config import TopicConfig, load_config
from gateway.reproduce import ReproduceError, job_of, reproduce_command
from tests.support.daemon import Received, running_daemon, wait_received, write_config
from tests.support.http_server import serving
from tests.support.phpfpm import PhpFpm
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]

#: Bytes a shell would love to mangle: NUL, CR LF, quotes, $( ), backquotes, a printf
#: format, every control byte, and trailing newlines that command substitution would eat.
#: Valid UTF-8, so record.php can also report it as $_POST['payload'] in form mode.
TEXT_PAYLOAD = (
    b'\x00\'"$(touch /tmp/busgate-pwned)`id`\\ %s %n\r\n{"n": 1}\n'
    + bytes(range(128))
    + "h\u00e9llo w\u00f6rld \u2603".encode()
    + b"\n\n"
)
#: Not UTF-8 at all.
BINARY_PAYLOAD = bytes(range(256)) + b"\xff\xfe\x00\n"
#: Attributes travel as X-Busgate-Attr-* headers; these need quoting too.
ATTRIBUTES = {"tenant": "acme", "note": "it's $(id) `id` \\ %s", "empty": ""}


async def busgate_curl(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``busgate curl`` as an operator runs it: a separate process."""
    return await trio.run_process(
        [sys.executable, "-m", "gateway.cli", "curl", *args, "-c", str(config)],
        cwd=REPO,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def run_printed(command: bytes, env: dict[str, str] | None = None) -> bytes:
    done = await trio.run_process(
        ["bash", "-c", command.decode()],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr.decode()
    return bytes(done.stdout)


async def xadd(app: App, payload: bytes, attributes: dict[str, str], queue: str) -> str:
    port = int(app.resp_address.rpartition(":")[2])

    def produce() -> str:
        fields: dict[FieldT, EncodableT] = {"payload": payload}
        fields.update(attributes)
        client = redis.Redis(port=port)
        job_id = client.xadd(queue, fields)
        client.close()
        assert isinstance(job_id, bytes)
        return job_id.decode()

    return await trio.to_thread.run_sync(produce)


async def settled(app: App, job_id: str, copies: int) -> list[JobRecord]:
    """Wait until every copy of the job is done (its attempt number is then final)."""
    assert app.store is not None
    with trio.fail_after(10):
        while True:
            records = await app.store.get_job(job_id)
            if len(records) == copies and all(r.state == State.DONE for r in records):
                return records
            await trio.sleep(0.02)


def assert_same_trace_new_span(original: str, again: str) -> None:
    version, trace, span, flags = original.split("-")
    assert again.split("-")[:2] == [version, trace]
    assert again.split("-")[3] == flags
    assert again.split("-")[2] != span


# -- FastCGI ------------------------------------------------------------------------------------


def fanout_queue(fpm: PhpFpm) -> str:
    backend = f"fastcgi://127.0.0.1:{fpm.address.port}"
    script = fpm.script("record.php")
    return f"""\
queue: orders
topics:
  email:
    backend: {backend}
    script: {script}
    uri: /jobs/order-email?source=busgate
    content_type: application/octet-stream
  audit:
    backend: {backend}
    script: {script}
    uri: /jobs/audit
    content_type: form
"""


async def test_cgi_fcgi_command_repeats_each_topics_delivery(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"orders": fanout_queue(recording_fpm)})
    async with running_daemon(config) as app:
        fanned = await xadd(app, TEXT_PAYLOAD, ATTRIBUTES, "orders")
        await wait_received(record, 2)
        binary = await xadd(app, BINARY_PAYLOAD, ATTRIBUTES, "orders/email")
        delivered = await wait_received(record, 3)
        copies = [*await settled(app, fanned, copies=2), *await settled(app, binary, copies=1)]
        assert {r.attempt for r in copies} == {1}

        # Two topic copies: the operator has to say which one.
        ambiguous = await busgate_curl(config, fanned)
        assert (ambiguous.returncode, ambiguous.stdout) == (1, b"")
        assert "pick one with --topic: orders/email, orders/audit" in ambiguous.stderr.decode()

        async def reproduce(job_id: str, topic: str, *choice: str) -> Received:
            printed = await busgate_curl(config, job_id, *choice)
            assert printed.returncode == 0, printed.stderr.decode()
            connect = f'cgi-fcgi)" -bind -connect 127.0.0.1:{recording_fpm.address.port}'
            assert connect.encode() in printed.stdout
            response = await run_printed(printed.stdout)
            assert response.endswith(b"\r\n\r\nrecorded")  # cgi-fcgi prints php-fpm's answer
            before = len(delivered)
            again = (await wait_received(record, before + 1))[before]
            (original,) = [
                r
                for r in delivered[:3]
                if (r.job_id, r.server["HTTP_X_BUSGATE_TOPIC"]) == (job_id, topic)
            ]
            assert_same_delivery(original, again)
            delivered.append(again)
            return again

        email = await reproduce(fanned, "email", "--topic", "email")
        audit = await reproduce(fanned, "audit", "--topic", "orders/audit")
        binary_email = await reproduce(binary, "email")

    assert email.body == TEXT_PAYLOAD
    assert email.server["CONTENT_TYPE"] == "application/octet-stream"
    assert email.server["REQUEST_URI"] == "/jobs/order-email?source=busgate"
    assert audit.server["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert audit.body.startswith(b"payload=%00%27%22%24%28touch")
    assert audit.server["REQUEST_URI"] == "/jobs/audit"
    assert binary_email.body == BINARY_PAYLOAD


def assert_same_delivery(original: Received, again: Received) -> None:
    """What php-fpm saw both times: every recorded CGI variable, and the body."""
    assert again.body == original.body
    assert_same_trace_new_span(
        original.server["HTTP_TRACEPARENT"], again.server["HTTP_TRACEPARENT"]
    )
    expected = {k: v for k, v in original.server.items() if k != "HTTP_TRACEPARENT"}
    seen = {k: v for k, v in again.server.items() if k != "HTTP_TRACEPARENT"}
    assert seen == expected
    for name in ("SCRIPT_FILENAME", "REQUEST_URI", "CONTENT_TYPE", "CONTENT_LENGTH"):
        assert name in seen
    assert seen["HTTP_X_BUSGATE_ATTEMPT"] == "1"
    assert seen["HTTP_X_BUSGATE_ATTR_NOTE"] == ATTRIBUTES["note"]
    assert seen["HTTP_X_BUSGATE_ATTR_EMPTY"] == ""


def stored_record(
    payload: bytes, *, attempt: int, attributes: dict[str, str] | None = None
) -> JobRecord:
    return JobRecord(
        id="01JREPRODUCE00000000000000",
        queue="orders",
        topic="email",
        state=State.READY,
        payload=payload,
        attributes=attributes or {},
        priority=Priority.NORMAL,
        attempt=attempt,
        enqueued_at=1_800_000_000.125,
        run_at=1_800_000_000.125,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        finished_at=None,
        attempts=(),
    )


def echo_topic(fpm: PhpFpm) -> TopicConfig:
    """A FastCGI topic whose script echoes the request it got, over php-fpm's unix socket."""
    return TopicConfig(
        queue="orders",
        name="email",
        backend=f"fastcgi+unix://{fpm.address.path}",
        kind="fastcgi",
        script=fpm.script("echo.php"),
        uri="/jobs/echo",
    )


async def test_cgi_fcgi_command_over_a_unix_socket(php_fpm_unix: PhpFpm) -> None:
    """A job not delivered yet (attempt 0) is reproduced as its first delivery."""
    topic = echo_topic(php_fpm_unix)
    record = stored_record(BINARY_PAYLOAD, attempt=0, attributes={"lang": "héllo wörld"})
    command = reproduce_command(topic, record)
    assert f'cgi-fcgi)" -bind -connect {php_fpm_unix.address.path}' in command
    response = await run_printed(command.encode())
    report = json.loads(response.partition(b"\r\n\r\n")[2])
    backend = build_backend(topic)
    assert isinstance(backend, FastCGIBackend)
    job = job_of(record)
    assert job.attempt == 1
    expected = {k.decode(): v.decode() for k, v in backend.params(job, backend.body(job))}
    server = report["server"]
    assert_same_trace_new_span(expected.pop("HTTP_TRACEPARENT"), server.pop("HTTP_TRACEPARENT"))
    assert server == {k: v for k, v in expected.items() if k in server}
    assert set(server) >= {"SCRIPT_FILENAME", "REQUEST_URI", "HTTP_X_BUSGATE_ATTR_LANG"}
    assert server["HTTP_X_BUSGATE_ATTEMPT"] == "1"
    assert server["HTTP_X_BUSGATE_ATTR_LANG"] == "héllo wörld"
    assert report["length"] == len(BINARY_PAYLOAD)
    assert report["sha256"] == hashlib.sha256(BINARY_PAYLOAD).hexdigest()


def test_cgi_fcgi_cannot_reach_ipv6() -> None:
    topic = TopicConfig(
        queue="orders",
        name="email",
        backend="fastcgi://[::1]:9000",
        kind="fastcgi",
        script="/srv/app/index.php",
    )
    with pytest.raises(ReproduceError, match="IPv6"):
        reproduce_command(topic, stored_record(b"{}", attempt=1))


# -- HTTP ---------------------------------------------------------------------------------------


@dataclass
class SeenRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # as sent: order, case of values, duplicates
    body: bytes


@dataclass
class RecordingHTTPServer:
    """Keeps every request's raw header list, so nothing curl adds or drops goes unseen."""

    requests: list[SeenRequest] = field(default_factory=list)
    port: int = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started()

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    request = SeenRequest(event.method, event.target, list(event.headers), b"")
                elif isinstance(event, h11.Data):
                    request.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.requests.append(request)
                    answer = h11.Response(status_code=200, headers=[("Content-Length", "2")])
                    await stream.send_all(conn.send(answer) or b"")
                    await stream.send_all(conn.send(h11.Data(data=b"ok")) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                else:  # ConnectionClosed
                    return


@pytest.fixture
async def http_server() -> AsyncIterator[RecordingHTTPServer]:
    async with serving(RecordingHTTPServer()) as server:
        yield server


def header(request: SeenRequest, name: bytes) -> bytes:
    (value,) = [v for k, v in request.headers if k.lower() == name]
    return value


def all_but_the_span(request: SeenRequest) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]:
    """The request with its headers in a canonical order, traceparent left out."""
    headers = sorted((k.lower(), v) for k, v in request.headers if k.lower() != b"traceparent")
    return request.method, request.target, request.body, headers


async def test_curl_command_repeats_an_http_delivery(
    http_server: RecordingHTTPServer, tmp_path: Path
) -> None:
    queue = f"""\
queue: hooks
topics:
  search:
    backend: http://127.0.0.1:{http_server.port}/hooks/job?source=busgate&list[]=1
    content_type: application/octet-stream
"""
    config = write_config(tmp_path, {"hooks": queue})
    # Over 1 KiB, where curl would start sending Expect: 100-continue.
    payload = (TEXT_PAYLOAD + BINARY_PAYLOAD) * 4
    async with running_daemon(config) as app:
        job_id = await xadd(app, payload, ATTRIBUTES, "hooks")
        await settled(app, job_id, copies=1)
        printed = await busgate_curl(config, job_id)
        assert printed.returncode == 0, printed.stderr.decode()
        # An operator's shell: a proxy for the outside world, and a ~/.curlrc of their own.
        # The daemon uses neither, so the command must not either.
        (tmp_path / ".curlrc").write_text('header = "X-From-Curlrc: 1"\ncompressed\n')
        proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        shell = {**os.environ, "CURL_HOME": str(tmp_path), "HOME": str(tmp_path)}
        shell |= {name: proxy for name in ("http_proxy", "HTTP_PROXY", "ALL_PROXY")}
        response = await run_printed(printed.stdout, shell)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"\r\n\r\nok")
    original, again = http_server.requests
    assert again.body == payload
    assert again.target == b"/hooks/job?source=busgate&list[]=1"
    # Exactly the daemon's headers: none that curl adds by itself (Accept, Expect), none lost.
    assert all_but_the_span(again) == all_but_the_span(original)
    assert_same_trace_new_span(
        header(original, b"traceparent").decode(), header(again, b"traceparent").decode()
    )
    assert header(again, b"x-busgate-attr-note") == ATTRIBUTES["note"].encode()
    assert header(again, b"x-busgate-attr-empty") == b""
    assert header(again, b"content-length") == str(len(payload)).encode()
    assert header(again, b"x-busgate-attempt") == b"1"


# -- what goes wrong ------------------------------------------------------------------------


async def test_errors_name_the_problem(tmp_path: Path) -> None:
    fanout = """\
queue: orders
topics:
  email: {backend: "fastcgi://127.0.0.1:9000", script: /srv/app/index.php}
  audit: {backend: "http://127.0.0.1:8080/audit"}
"""
    config = write_config(tmp_path, {"orders": fanout})

    missing = await busgate_curl(config, "01JNOSUCHJOB0000000000000")
    assert missing.returncode == 1
    assert "no store at" in missing.stderr.decode()
    assert not (tmp_path / "busgate.db").exists()  # looking does not create one

    store = await SQLiteStore.open(str(tmp_path / "busgate.db"))
    try:
        routes = [(t.name, t.filter) for t in build_topics(config)]
        pushed = await store.push("orders", routes, [NewJob(b"{}", id="order-42")])
    finally:
        await store.aclose()
    assert pushed.copies == 2

    unknown = await busgate_curl(config, "01JNOSUCHJOB0000000000000")
    assert (unknown.returncode, unknown.stdout) == (1, b"")
    assert "no job '01JNOSUCHJOB0000000000000'" in unknown.stderr.decode()

    ambiguous = await busgate_curl(config, "order-42")
    assert ambiguous.returncode == 1
    assert "pick one with --topic: orders/email, orders/audit" in ambiguous.stderr.decode()

    wrong_topic = await busgate_curl(config, "order-42", "--topic", "search")
    assert wrong_topic.returncode == 1
    assert "no copy for topic 'search'" in wrong_topic.stderr.decode()

    chosen = await busgate_curl(config, "order-42", "--topic", "orders/audit")
    assert chosen.returncode == 0, chosen.stderr.decode()
    assert b"-X POST http://127.0.0.1:8080/audit" in chosen.stdout
    assert b"-H 'X-Busgate-Attempt: 1'" in chosen.stdout

    (tmp_path / "conf.d" / "orders.yaml").write_text(
        "queue: orders\ntopics:\n  email: {backend: 'fastcgi://127.0.0.1:9000',"
        " script: /srv/app/index.php}\n"
    )
    gone_topic = await busgate_curl(config, "order-42", "--topic", "audit")
    assert gone_topic.returncode == 1
    assert "topic 'audit' of queue 'orders', which is no longer configured" in (
        gone_topic.stderr.decode()
    )

    (tmp_path / "conf.d" / "orders.yaml").rename(tmp_path / "conf.d" / "invoices.yaml")
    (tmp_path / "conf.d" / "invoices.yaml").write_text(
        "queue: invoices\ntopics:\n  email: {backend: 'fastcgi://127.0.0.1:9000',"
        " script: /srv/app/index.php}\n"
    )
    gone_queue = await busgate_curl(config, "order-42", "--topic", "email")
    assert gone_queue.returncode == 1
    assert "queue 'orders', which is no longer configured" in gone_queue.stderr.decode()


def build_topics(config_path: Path) -> tuple[TopicConfig, ...]:
    queue = load_config(config_path).queue("orders")
    assert queue is not None
    return queue.topics
