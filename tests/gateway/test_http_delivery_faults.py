"""HTTP delivery against servers that misbehave on the wire, each a raw trio socket server
(or the recording h11 server): connections closed or reset around the answer, answers sent
before the request's body was read, TLS that cannot be trusted, odd framings, trickled and
huge answers, redirects and Retry-After dates.  What must hold: the job is never lost, an
attempt is spent only when the backend may have run the job, the failure says what happened,
no connection is reused out of step, and nothing outlasts the topic's timeout."""

from __future__ import annotations

import gc
import json
import socket
import ssl
import struct
import time
import warnings
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from adapters.delivery.base import Delivery, Failure
from adapters.delivery.http import MAX_KEPT_BODY, HTTPBackend, HTTPTarget
from adapters.storage.jobs import State
from gateway.resp import encode_command
from tests.gateway.test_http_delivery import job
from tests.support.daemon import running_daemon, write_config
from tests.support.http_server import RecordingServer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

#: A handler gets the connection's stream and its number (1 for the first connection).
Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


async def raw_service(nursery: trio.Nursery, handler: Handler) -> tuple[str, list[int]]:
    """A TCP server running ``handler`` per connection; returns its URL and, as they come,
    the number of each connection."""
    connections: list[int] = []

    async def serve(stream: trio.SocketStream) -> None:
        connections.append(len(connections) + 1)
        try:
            await handler(stream, len(connections))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # busgate closed its end, as it may
        finally:
            stream.socket.close()

    listeners = await nursery.start(trio.serve_tcp, serve, 0)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/hook", connections


async def deliver_in_turn(
    handler: Handler, count: int, *, timeout: float = 5
) -> tuple[list[Delivery], list[int], HTTPBackend]:
    """``count`` jobs delivered one after the other by a backend with one connection to the
    ``handler``'s service; with the service's connection numbers, and the backend."""
    async with trio.open_nursery() as nursery:
        url, connections = await raw_service(nursery, handler)
        backend = HTTPBackend(HTTPTarget(url=url, timeout=timeout, max_connections=1))
        deliveries = [await backend.deliver(job()) for _ in range(count)]
        await backend.aclose()
        nursery.cancel_scope.cancel()
    return deliveries, connections, backend


async def read_head(stream: trio.abc.Stream, buffer: bytes = b"") -> tuple[bytes, bytes]:
    """A request's head and what came after it ("" head: the client closed)."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return b"", b""
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


async def read_request(stream: trio.abc.Stream, buffer: bytes = b"") -> tuple[bytes, bytes]:
    """A whole request (head and Content-Length body), and the bytes after it."""
    head, rest = await read_head(stream, buffer)
    if not head:
        return b"", b""
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        data = await stream.receive_some(65536)
        if not data:
            return b"", b""
        rest += data
    return head, rest[length:]


def reset(stream: trio.SocketStream) -> None:
    """Close with an RST, as a server killed or timing out a socket may."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


# -- a connection found closed when reused ------------------------------------------------------


@pytest.mark.parametrize("ending", ["eof", "reset"])
async def test_a_reused_connection_closed_before_any_answer_goes_again_once(ending: str) -> None:
    # A server's keep-alive timeout (5 s in Node, uvicorn, Apache) closing the idle connection
    # just as busgate reuses it: the request meets a closed socket.  That cost an attempt, and
    # was reported as a protocol error in h11's words ("can't handle event type
    # ConnectionClosed when role=SERVER and state=SEND_RESPONSE").
    requests: list[int] = []

    async def handler(stream: trio.SocketStream, number: int) -> None:
        _, rest = await read_request(stream)
        requests.append(number)
        await stream.send_all(OK)
        if number == 1:
            _, rest = await read_request(stream, rest)
            requests.append(number)
            if ending == "reset":
                reset(stream)
            return  # closed without a byte of answer
        await read_request(stream, rest)  # the new connection serves on

    ((first, second), connections, backend) = await deliver_in_turn(handler, 2)
    assert (first.status, second.status, second.failure) == (200, 200, None)
    assert requests == [1, 1, 2] and connections == [1, 2]
    assert backend.statistics().failures_total == 0


async def test_a_reused_connection_lost_while_the_server_works_is_not_sent_again() -> None:
    # A server that took the job, worked on it, then died without answering (a gunicorn
    # worker timeout, an OOM-killed worker): busgate sent it again at once as the same
    # attempt, so the job ran twice and one run was never counted.
    requests: list[int] = []

    async def handler(stream: trio.SocketStream, number: int) -> None:
        _, rest = await read_request(stream)
        requests.append(number)
        await stream.send_all(OK)
        _, rest = await read_request(stream, rest)
        requests.append(number)
        await trio.sleep(0.5)  # works on it, then the worker is gone

    ((first, second), connections, backend) = await deliver_in_turn(handler, 2)
    assert first.status == 200
    assert second.failure is Failure.CONNECTION_LOST, second.message
    assert "closed the connection before answering" in second.message
    assert requests == [1, 1] and connections == [1]
    assert backend.statistics().failures_total == 1


async def test_on_a_distant_server_the_keep_alive_race_takes_the_round_trip_into_account(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Connecting took 200 ms (two round trips away): a reset 150 ms after the request is
    # still the server's idle close crossing it, and the request goes again, unspent.
    connect = HTTPBackend._connect

    async def distant(self: HTTPBackend) -> Any:
        await trio.sleep(0.2)
        return await connect(self)

    monkeypatch.setattr(HTTPBackend, "_connect", distant)
    requests: list[int] = []

    async def handler(stream: trio.SocketStream, number: int) -> None:
        _, rest = await read_request(stream)
        requests.append(number)
        await stream.send_all(OK)
        if number == 1:
            _, rest = await read_request(stream, rest)
            requests.append(number)
            await trio.sleep(0.15)
            return  # closed without a byte of answer
        await read_request(stream, rest)

    ((first, second), connections, backend) = await deliver_in_turn(handler, 2)
    assert (first.status, second.status) == (200, 200), second.message
    assert requests == [1, 1, 2] and connections == [1, 2]
    assert backend.statistics().failures_total == 0


async def test_a_new_connection_that_hangs_after_the_keep_alive_race_is_an_unspent_connect_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The request meets an idle-closed connection and goes again on a new one, whose
    # connect hangs (a SYN dropped by a full backlog) past the job's timeout.  The job never
    # reached the server, as the first connect failing would say: an unspent connect failure.
    # The new connection was got under the job's own cancel scope, so this was a spent
    # "no response within" timeout.
    connect = HTTPBackend._connect
    connects = 0

    async def second_hangs(self: HTTPBackend) -> Any:
        nonlocal connects
        connects += 1
        if connects == 2:
            await trio.sleep_forever()
        return await connect(self)

    monkeypatch.setattr(HTTPBackend, "_connect", second_hangs)

    async def handler(stream: trio.SocketStream, number: int) -> None:
        _, rest = await read_request(stream)
        await stream.send_all(OK)
        await read_request(stream, rest)  # closed without a byte of answer

    ((first, second), connections, backend) = await deliver_in_turn(handler, 2, timeout=0.5)
    assert first.status == 200
    assert second.failure is Failure.CONNECT, second.message
    assert second.duration < 1.5
    assert connections == [1] and connects == 2
    assert backend.statistics().in_use == 0


async def read_then(stream: trio.abc.Stream, answer: bytes) -> None:
    await read_request(stream)
    await stream.send_all(answer)


@pytest.mark.parametrize(
    ("reused_answer", "new_answer", "message", "requests"),
    [
        # An answer had begun: the server had the job.  Once is enough.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", OK, "mid-response", 2),
        (b"HTTP/1.1 200 OK\r\n", OK, "mid-response", 2),
        # The new connection fails the same way: no third try.
        (b"", b"", "closed the connection before answering", 3),
    ],
    ids=["body cut short", "head cut short", "new one closes too"],
)
async def test_a_connection_closed_mid_answer_is_lost_and_tried_no_further(
    reused_answer: bytes, new_answer: bytes, message: str, requests: int
) -> None:
    seen: list[int] = []

    async def handler(stream: trio.SocketStream, number: int) -> None:
        _, rest = await read_request(stream)
        seen.append(number)
        if number == 1:
            await stream.send_all(OK)
            await read_request(stream, rest)
            seen.append(number)
            await stream.send_all(reused_answer)
        else:
            await stream.send_all(new_answer)

    async with trio.open_nursery() as nursery:
        url, _ = await raw_service(nursery, handler)
        backend = HTTPBackend(HTTPTarget(url=url, timeout=5, max_connections=1))
        assert (await backend.deliver(job())).status == 200
        delivery = await backend.deliver(job())
        await backend.aclose()
        nursery.cancel_scope.cancel()
    assert delivery.failure is Failure.CONNECTION_LOST, delivery.message
    assert message in delivery.message and url.removesuffix("/hook") in delivery.message
    assert len(seen) == requests


async def test_a_new_connection_closed_before_answering_is_lost_not_retried() -> None:
    async def handler(stream: trio.SocketStream, number: int) -> None:
        await read_request(stream)

    async with trio.open_nursery() as nursery:
        url, connections = await raw_service(nursery, handler)
        backend = HTTPBackend(HTTPTarget(url=url, timeout=5))
        delivery = await backend.deliver(job())
        nursery.cancel_scope.cancel()
    assert delivery.failure is Failure.CONNECTION_LOST
    origin = url.removesuffix("/hook")
    assert delivery.message == f"{origin}: the server closed the connection before answering"
    assert connections == [1]


# -- an answer before the whole request was read -------------------------------------------------


def tls_pair(tmp_path: Path, name: str = "127.0.0.1") -> tuple[ssl.SSLContext, str]:
    """A server context with a certificate for ``name``, and the CA file that trusts it."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, str(ca_file)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("then", ["close", "hold"])
async def test_an_answer_sent_before_the_body_was_read_is_the_attempts_answer(
    tmp_path: Path, tls: bool, then: str
) -> None:
    # nginx's client_max_body_size, an auth proxy: a server may answer from the head and
    # read no more.  Then it closes (the unread body makes that a reset) or waits.  busgate
    # went on writing: "connection broke while writing" instead of the 413, or no answer at
    # all until the topic's timeout.
    context, ca_file = tls_pair(tmp_path)
    answer = (
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\nConnection: close\r\n\r\ntoo big"
    )

    async def handler(raw: trio.SocketStream, number: int) -> None:
        stream: trio.abc.Stream = raw
        if tls:
            stream = trio.SSLStream(raw, context, server_side=True)
        if number == 1:
            await read_head(stream)
            await stream.send_all(answer)
            if then == "hold":
                await trio.sleep_forever()
            return  # the socket is closed with the body unread: a reset
        await read_then(stream, OK)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        url, connections = await raw_service(nursery, handler)
        if tls:
            url = url.replace("http://", "https://")
        backend = HTTPBackend(HTTPTarget(url=url, timeout=5, ca_file=ca_file))
        payload = json.dumps({"blob": "x" * (4 * 1024 * 1024)}).encode()
        early = await backend.deliver(job(payload))
        after = await backend.deliver(job())
        await backend.aclose()
        nursery.cancel_scope.cancel()
    assert (early.status, early.body, early.failure) == (413, b"too big", None), early.message
    assert early.duration < 2  # not the topic's timeout
    assert after.status == 200 and connections == [1, 2]  # never the half-written one again


async def test_an_early_answer_on_a_kept_alive_connection_retires_it() -> None:
    # The server answers from the head and says nothing about closing: the rest of the body
    # would be read by it as the next request.  busgate stops writing and drops the connection.
    async def handler(stream: trio.SocketStream, number: int) -> None:
        if number == 1:
            await read_head(stream)
            await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            await trio.sleep_forever()
        while True:
            await read_then(stream, OK)

    async with trio.open_nursery() as nursery:
        url, connections = await raw_service(nursery, handler)
        backend = HTTPBackend(HTTPTarget(url=url, timeout=5, max_connections=1))
        early = await backend.deliver(job(b"x" * (4 * 1024 * 1024)))
        after = [await backend.deliver(job()) for _ in range(2)]
        await backend.aclose()
        nursery.cancel_scope.cancel()
    assert early.status == 401 and early.duration < 2
    assert [d.status for d in after] == [200, 200] and connections == [1, 2]


async def test_a_large_request_to_a_server_that_neither_reads_nor_answers_times_out() -> None:
    async def handler(stream: trio.SocketStream, number: int) -> None:
        if number == 1:
            await trio.sleep_forever()
        await read_then(stream, OK)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        url, connections = await raw_service(nursery, handler)
        backend = HTTPBackend(HTTPTarget(url=url, timeout=0.5, max_connections=1))
        stuck = await backend.deliver(job(b"x" * (4 * 1024 * 1024)))
        after = await backend.deliver(job())
        await backend.aclose()
        nursery.cancel_scope.cancel()
    assert stuck.failure is Failure.TIMEOUT and 0.45 < stuck.duration < 1.5
    assert after.status == 200 and connections == [1, 2]
    stats = backend.statistics()
    assert (stats.timeouts_total, stats.in_use, stats.open) == (1, 0, 0)


async def test_a_large_request_to_a_server_that_reads_it_all_keeps_its_connection() -> None:
    async with trio.open_nursery() as nursery:
        server = RecordingServer()
        await nursery.start(server.run)
        backend = HTTPBackend(HTTPTarget(url=server.url, timeout=10, max_connections=1))
        payload = json.dumps({"blob": "y" * (3 * 1024 * 1024)}).encode()
        deliveries = [await backend.deliver(job(payload)) for _ in range(3)]
        await backend.aclose()
        nursery.cancel_scope.cancel()
    assert [d.status for d in deliveries] == [200, 200, 200]
    assert [r.body for r in server.requests] == [payload] * 3
    assert server.connections == 1


# -- TLS -----------------------------------------------------------------------------------------


async def tls_failure(
    url: str, *, ca_file: str | None = None, verify_tls: bool = True
) -> tuple[Failure | None, str]:
    target = HTTPTarget(url, timeout=3, connect_timeout=1, ca_file=ca_file, verify_tls=verify_tls)
    backend = HTTPBackend(target)
    delivery = await backend.deliver(job())
    await backend.aclose()
    return delivery.failure, delivery.message


async def test_tls_failures_are_connect_failures_that_say_why(tmp_path: Path) -> None:
    # The reason was lost: "TLS handshake failed: " and nothing after it, whatever it was.
    localhost_context, ca_file = tls_pair(tmp_path, name="localhost")

    async def tls_server(stream: trio.SocketStream, number: int) -> None:
        tls = trio.SSLStream(stream, localhost_context, server_side=True)
        await read_then(tls, OK)

    async def plain_server(stream: trio.SocketStream, number: int) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    async def hang_up(stream: trio.SocketStream, number: int) -> None:
        pass

    async with trio.open_nursery() as nursery:
        tls_url, _ = await raw_service(nursery, tls_server)
        tls_url = tls_url.replace("http://", "https://")
        plain_url, _ = await raw_service(nursery, plain_server)
        hang_up_url, _ = await raw_service(nursery, hang_up)
        found = {
            "wrong name": await tls_failure(tls_url, ca_file=ca_file),
            "untrusted": await tls_failure(tls_url),
            "not TLS": await tls_failure(plain_url.replace("http://", "https://")),
            "hung up": await tls_failure(hang_up_url.replace("http://", "https://")),
            "unchecked": await tls_failure(tls_url, verify_tls=False),
        }
        nursery.cancel_scope.cancel()
    expected = {
        "wrong name": "certificate verify failed: IP address mismatch",
        "untrusted": "certificate verify failed: unable to get local issuer certificate",
        "not TLS": "wrong version number",
        "hung up": "the server closed the connection",
    }
    for case, words in expected.items():
        failure, message = found[case]
        assert failure is Failure.CONNECT and failure.job_never_ran, (case, message)
        assert f"TLS handshake failed: {words}" in message, (case, message)
    assert found["unchecked"] == (None, "")


async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout_leaving_no_socket() -> None:
    # The TCP socket under a handshake cut short by the connect timeout was left to the
    # garbage collector (a ResourceWarning, and an open file until then).
    async def silent(stream: trio.SocketStream, number: int) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        url, _ = await raw_service(nursery, silent)
        gc.collect()  # what earlier tests left is not this one's
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            failure, message = await tls_failure(url.replace("http://", "https://"))
            gc.collect()
        nursery.cancel_scope.cancel()
    assert failure is Failure.CONNECT and "not connected within 1s" in message
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# -- odd framings, trickles and floods -----------------------------------------------------------


async def test_a_response_framed_two_ways_is_read_as_chunked_and_its_connection_retired() -> None:
    # RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and such a message "ought to
    # be handled as an error" -- a proxy in between may have read it by its length.  h11 reads
    # it as chunked and kept the connection for the next job.
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        OK,
    ]

    async def handler(stream: trio.SocketStream, number: int) -> None:
        rest = b""
        while answers:
            head, rest = await read_request(stream, rest)
            if not head:
                return
            await stream.send_all(answers.pop(0))

    ((one, two), connections, _) = await deliver_in_turn(handler, 2)
    assert (one.status, one.body, two.status) == (200, b"hello", 200)
    assert connections == [1, 2]


async def answer_ok_until_eof(stream: trio.abc.Stream, rest: bytes) -> None:
    """Answer every further request on the connection with OK, until the client closes."""
    while True:
        head, rest = await read_request(stream, rest)
        if not head:
            return
        await stream.send_all(OK)


@pytest.mark.parametrize(
    ("answer", "status", "body", "reused"),
    [
        (
            b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
            200,
            b"ok",
            True,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, 200, b"ok", True),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", 204, b"", False),
        (b"HTTP/1.1 304 Not Modified\r\n\r\nhello", 304, b"", False),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n",
            200,
            b"hello",
            True,
        ),
        (b"HTTP/1.0 200 OK\r\n\r\nbody to the end", 200, b"body to the end", False),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody to the end",
            200,
            b"body to the end",
            False,
        ),
        (
            b"HTTP/1.1 308 Permanent Redirect\r\nLocation: http://127.0.0.1:9/x\r\n"
            b"Content-Length: 0\r\n\r\n",
            308,
            b"",
            True,
        ),
    ],
    ids=[
        "102+103",
        "100",
        "204 with body",
        "304 with body",
        "trailers",
        "http/1.0 to eof",
        "close to eof",
        "redirect",
    ],
)
async def test_odd_but_valid_answers(answer: bytes, status: int, body: bytes, reused: bool) -> None:
    # A body after a 204/304 is not this answer's and must not be the next one's; a body to
    # EOF retires the connection; a redirect is not followed (it is just a status).
    async def handler(stream: trio.SocketStream, number: int) -> None:
        _, rest = await read_request(stream)
        await stream.send_all(answer if number == 1 else OK)
        if number == 1 and answer.endswith(b"\r\n\r\nbody to the end"):
            return  # the end of the body
        await answer_ok_until_eof(stream, rest)

    ((one, two), connections, _) = await deliver_in_turn(handler, 2)
    assert (one.status, one.body, one.failure) == (status, body, None)
    assert (two.status, two.body) == (200, b"ok")
    assert connections == ([1] if reused else [1, 2])


async def test_junk_sent_after_an_answer_is_never_the_next_jobs_answer() -> None:
    async def handler(stream: trio.SocketStream, number: int) -> None:
        _, rest = await read_request(stream)
        await stream.send_all(OK)
        if number == 1:
            await trio.sleep(0.05)
            await stream.send_all(b"HTTP/1.1 500 Stray\r\nContent-Length: 0\r\n\r\n")
        await answer_ok_until_eof(stream, rest)

    async with trio.open_nursery() as nursery:
        url, connections = await raw_service(nursery, handler)
        backend = HTTPBackend(HTTPTarget(url=url, timeout=5, max_connections=1))
        one = await backend.deliver(job())
        await trio.sleep(0.2)
        two = await backend.deliver(job())
        await backend.aclose()
        nursery.cancel_scope.cancel()
    assert (one.status, two.status, two.failure) == (200, 200, None)
    assert connections == [1, 2]


@pytest.mark.parametrize("where", ["head", "body", "informational", "unframed"])
async def test_a_trickled_answer_cannot_outlast_the_timeout(where: str) -> None:
    async def handler(stream: trio.SocketStream, number: int) -> None:
        await read_request(stream)
        if where == "unframed":
            # No length and no close (an empty answer written as for a HEAD): HTTP/1.1 says
            # the body runs to the end of the connection, which never comes.
            await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\n")
            await trio.sleep_forever()
        if where == "head":
            drip = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: yes\r\n" * 1000
        elif where == "body":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            drip = b"x" * 100000
        else:
            drip = b"HTTP/1.1 102 Processing\r\n\r\n" * 1000
        for index in range(0, len(drip), 3):
            await stream.send_all(drip[index : index + 3])
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        url, _ = await raw_service(nursery, handler)
        backend = HTTPBackend(HTTPTarget(url=url, timeout=0.5))
        started = time.monotonic()
        delivery = await backend.deliver(job())
        elapsed = time.monotonic() - started
        nursery.cancel_scope.cancel()
    assert delivery.failure is Failure.TIMEOUT
    assert 0.45 < elapsed < 1.5


async def test_a_huge_answer_is_read_through_and_kept_to_a_bound() -> None:
    size = 48 * 1024 * 1024

    async def handler(stream: trio.SocketStream, number: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"z" * (1024 * 1024)
        for _ in range(size // len(block)):
            await stream.send_all(block)
        await read_then(stream, OK)

    ((big, after), connections, _) = await deliver_in_turn(handler, 2, timeout=20)
    assert big.status == 200 and len(big.body) == MAX_KEPT_BODY
    assert after.status == 200 and connections == [1]  # read through: the connection lives on


# -- through the daemon: redirects and Retry-After dates -----------------------------------------


async def test_daemon_retries_a_redirect_and_honours_a_retry_after_date(tmp_path: Path) -> None:
    when = time.time() + 120
    steer = [
        {"respond_status": 503, "retry_after": formatdate(when, usegmt=True)},
        {"respond_status": 301},
    ]
    async with trio.open_nursery() as nursery:
        server = RecordingServer()
        await nursery.start(server.run)
        config = write_config(
            tmp_path,
            {
                "orders": f"""\
                    queue: orders
                    topics:
                      search:
                        backend: {server.url}
                        retry: {{max_attempts: 2, backoff: 50ms, max_backoff: 50ms}}
                    """
            },
        )
        async with running_daemon(config) as app:
            host, _, port = app.resp_address.rpartition(":")
            stream = await trio.open_tcp_stream(host, int(port))
            payloads = [json.dumps(s).encode() for s in steer]
            await stream.send_all(encode_command("RPUSH", "orders", *payloads))
            assert await stream.receive_some(100) == b":2\r\n"
            assert app.store is not None
            with trio.fail_after(10):
                while len(server.requests) < 3:
                    await trio.sleep(0.02)
                while (await app.store.stats("orders", "search")).leased:
                    await trio.sleep(0.02)
            ids = {r.body: r.headers["x-busgate-job-id"] for r in server.requests}
            later, redirected = [(await app.store.get_job(ids[p]))[0] for p in payloads]
        nursery.cancel_scope.cancel()
    assert later.state is State.DELAYED and later.run_at == pytest.approx(when, abs=2)
    # A redirect is not followed: a status like any other, retried and then dead.
    assert redirected.state is State.DEAD
    assert [a.status for a in redirected.attempts] == [301, 301]
