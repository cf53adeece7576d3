"""Delivery to HTTP services over h11: what the service receives, kept-alive connections,
the connection cap, Connection: close, HTTPS, and services that hang, refuse or lie."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme

from adapters.delivery.base import Failure
from adapters.delivery.http import HTTPBackend, HTTPTarget
from adapters.storage.jobs import Job, Priority, State
from gateway.resp import encode_command
from tests.support.daemon import running_daemon, write_config
from tests.support.http_server import RecordingServer, serving
from tests.support.ports import free_port


def job(payload: bytes = b'{"order": 42}', attempt: int = 1) -> Job:
    return Job(
        id="01JOBIDFORHTTPTESTS0000000",
        queue="orders",
        topic="search",
        payload=payload,
        attributes={"tenant": "acme"},
        priority=Priority.NORMAL,
        attempt=attempt,
        enqueued_at=1_800_000_000.25,
        run_at=1_800_000_000.25,
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )


@pytest.fixture
async def server() -> AsyncIterator[RecordingServer]:
    async with serving(RecordingServer()) as recording:
        yield recording


async def test_the_service_gets_a_post_with_the_job_headers(server: RecordingServer) -> None:
    backend = HTTPBackend(HTTPTarget(url=server.url + "?source=busgate"))
    delivery = await backend.deliver(job())
    await backend.aclose()
    assert (delivery.status, delivery.body, delivery.failure) == (200, b"accepted", None)
    assert delivery.duration > 0
    (request,) = server.requests
    assert (request.method, request.target) == ("POST", "/hooks/job?source=busgate")
    assert request.body == b'{"order": 42}'
    h = request.headers
    assert h["content-type"] == "application/json"
    assert h["host"] == f"127.0.0.1:{server.port}"
    assert h["x-busgate-job-id"] == "01JOBIDFORHTTPTESTS0000000"
    assert (h["x-busgate-queue"], h["x-busgate-topic"], h["x-busgate-attempt"]) == (
        "orders",
        "search",
        "1",
    )
    assert h["x-busgate-enqueued-at"] == "2027-01-15T08:00:00.250Z"
    assert h["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert h["x-busgate-attr-tenant"] == "acme"
    assert h["user-agent"] == "busgate"


async def test_form_mode_urlencodes_the_payload(server: RecordingServer) -> None:
    backend = HTTPBackend(HTTPTarget(url=server.url, content_type="form"))
    await backend.deliver(job(b"a=1&b=\xff"))
    await backend.aclose()
    (request,) = server.requests
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.body == b"payload=a%3D1%26b%3D%FF"


async def test_connections_are_kept_alive_and_capped(server: RecordingServer) -> None:
    backend = HTTPBackend(HTTPTarget(url=server.url, max_connections=2))
    for _ in range(5):
        assert (await backend.deliver(job())).status == 200
    assert server.connections == 1
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(backend.deliver, job(b'{"sleep_ms": 50}'))
    await backend.aclose()
    assert server.peak_open == 2
    assert server.connections == 2
    assert backend.statistics().failures_total == 0


async def test_connection_close_retires_the_connection(server: RecordingServer) -> None:
    backend = HTTPBackend(HTTPTarget(url=server.url))
    for _ in range(3):
        assert (await backend.deliver(job(b'{"close": true}'))).status == 200
    await backend.aclose()
    assert server.connections == 3
    assert [r.connection for r in server.requests] == [1, 2, 3]


async def test_status_and_retry_after_reach_the_policy(server: RecordingServer) -> None:
    backend = HTTPBackend(HTTPTarget(url=server.url))
    delivery = await backend.deliver(job(b'{"respond_status": 503, "retry_after": "7"}'))
    await backend.aclose()
    assert delivery.status == 503
    assert delivery.header(b"retry-after") == b"7"


@pytest.mark.parametrize(
    ("payload", "failure"),
    [(b'{"sleep_ms": 2000}', Failure.TIMEOUT), (b'{"garbage": true}', Failure.PROTOCOL)],
)
async def test_hanging_and_lying_services(
    server: RecordingServer, payload: bytes, failure: Failure
) -> None:
    backend = HTTPBackend(HTTPTarget(url=server.url, timeout=0.3))
    delivery = await backend.deliver(job(payload))
    assert delivery.failure is failure and delivery.status is None
    assert f"127.0.0.1:{server.port}" in delivery.message
    assert (await backend.deliver(job())).status == 200  # the pool recovered
    await backend.aclose()


async def test_refused_connection_names_the_origin() -> None:
    port = free_port()
    backend = HTTPBackend(HTTPTarget(url=f"http://127.0.0.1:{port}/x", timeout=2))
    delivery = await backend.deliver(job())
    assert delivery.failure is Failure.CONNECT
    assert delivery.message == f"http://127.0.0.1:{port}: cannot connect: Connection refused"
    assert delivery.failure.job_never_ran


async def test_https_with_a_private_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = RecordingServer(ssl_context=context)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        trusted = HTTPBackend(HTTPTarget(url=server.url, ca_file=str(ca_file)))
        assert (await trusted.deliver(job())).status == 200
        assert (await trusted.deliver(job())).status == 200
        await trusted.aclose()
        assert server.connections == 1  # kept alive over TLS too
        untrusted = HTTPBackend(HTTPTarget(url=server.url, timeout=2))
        refused = await untrusted.deliver(job())
        assert refused.failure is Failure.CONNECT and "TLS handshake failed" in refused.message
        unchecked = HTTPBackend(HTTPTarget(url=server.url, verify_tls=False))
        assert (await unchecked.deliver(job())).status == 200
        await unchecked.aclose()
        nursery.cancel_scope.cancel()


async def test_daemon_delivers_to_an_http_topic(server: RecordingServer, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "orders": f"""\
                queue: orders
                topics:
                  search:
                    backend: {server.url}
                    timeout: 2s
                    retry: {{max_attempts: 3, backoff: 100ms, max_backoff: 200ms}}
                """
        },
    )
    async with running_daemon(config) as app:
        host, _, port = app.resp_address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))

        payloads = [
            b'{"n": 1}',
            json.dumps({"respond_status": 404}).encode(),
            json.dumps({"respond_status": 503, "retry_after": "60"}).encode(),
        ]
        await stream.send_all(encode_command("RPUSH", "orders", *payloads))
        assert await stream.receive_some(100) == b":3\r\n"
        assert app.store is not None
        with trio.fail_after(10):
            while len(server.requests) < 3:
                await trio.sleep(0.02)
            while True:
                stats = await app.store.stats("orders", "search")
                if stats.leased == 0:
                    break
                await trio.sleep(0.02)
        ids = {r.body: r.headers["x-busgate-job-id"] for r in server.requests}
        done, dead, later = [(await app.store.get_job(ids[p]))[0] for p in payloads]
    assert done.state is State.DONE
    assert dead.state is State.DEAD and dead.attempts[0].status == 404
    assert later.state is State.DELAYED
    assert later.run_at - later.attempts[0].started_at == pytest.approx(60, abs=2)
    assert (stats.done, stats.dead, stats.delayed) == (1, 1, 1)


async def test_attributes_any_text_reach_the_service_and_odd_ones_stay_stored(
    server: RecordingServer, tmp_path: Path
) -> None:
    # A non-ASCII value once crashed the daemon (h11 encodes text headers as ASCII), and
    # again at every restart, when the job came round; a padded one was dead-lettered.
    config = write_config(
        tmp_path,
        {"orders": f"queue: orders\ntopics:\n  search: {{backend: '{server.url}'}}\n"},
    )
    attributes = {"lang": "héllo wörld", "padded": "  padded  ", "nul": "a\x00b"}
    async with running_daemon(config) as app:
        host, _, port = app.resp_address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        fields = [part for pair in attributes.items() for part in pair]
        await stream.send_all(encode_command("XADD", "orders", "*", "payload", "{}", *fields))
        job_id = (await stream.receive_some(100)).split(b"\r\n")[1].decode()  # $26 CRLF id
        assert app.store is not None
        with trio.fail_after(10):
            while (record := (await app.store.get_job(job_id))[0]).state is not State.DONE:
                await trio.sleep(0.02)
    (request,) = server.requests
    sent = {k: v for k, v in request.headers.items() if k.startswith("x-busgate-attr-")}
    assert sent == {"x-busgate-attr-lang": "héllo wörld", "x-busgate-attr-padded": "padded"}
    assert record.attributes == attributes  # all of them kept, for the admin API


async def scripted_service(
    nursery: trio.Nursery, answers: list[bytes], connections: list[int]
) -> str:
    """A service that answers the n-th request with ``answers[n]``, byte for byte."""

    async def serve(stream: trio.SocketStream) -> None:
        connections.append(1)
        buffer = b""
        while answers:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            buffer = buffer[length:]
            await stream.send_all(answers.pop(0))

    listeners = await nursery.start(trio.serve_tcp, serve, 0)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/hook"


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" * 2,  # its answer sent twice
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ncaf\xc3\xa9",  # a length in characters
    ],
    ids=["sent twice", "length short"],
)
async def test_bytes_after_a_response_are_never_the_next_jobs_answer(first: bytes) -> None:
    answers = [first, b"HTTP/1.1 500 Oops\r\nContent-Length: 6\r\n\r\nfailed"]
    connections: list[int] = []
    async with trio.open_nursery() as nursery:
        url = await scripted_service(nursery, answers, connections)
        backend = HTTPBackend(HTTPTarget(url=url, max_connections=1, timeout=5))
        one = await backend.deliver(job())
        two = await backend.deliver(job())
        await backend.aclose()
        nursery.cancel_scope.cancel()
    assert one.status == 200
    # The second job gets its own answer, on a new connection: the first is out of step.
    assert (two.status, two.body, two.failure) == (500, b"failed", None)
    assert len(connections) == 2
