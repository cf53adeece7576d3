"""Delivering a job to an HTTP service: a POST with the payload as body, over h11 on trio.

Connections to the topic's origin are kept alive and capped like FastCGI ones
(``fastcgi.pooling``); a response with ``Connection: close`` (or HTTP/1.0 without keep-alive)
retires its connection, which h11 tells us through its states.  HTTPS uses the system's CA
store unless the topic names another CA file or turns verification off.

A server may answer before it has read the whole request (a 413 from the head alone), then
stop reading or close: a request too big for the socket buffers is written while the answer
is read, and the answer counts.  A connection whose request was not all written is never
reused.  A kept-alive connection found closed when reused, before any byte of an answer (the
server's keep-alive timeout ran out as the request went), goes again, once, on a new one.

Redirects are not followed (a 3xx is a status like any other), but the delivery's ``message``
says where it pointed: "302 Found -> https://sso.example/login".
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from adapters.delivery.base import Delivery, Failure, failure_of, redirect_message
from adapters.delivery.headers import SERVER_SOFTWARE, job_headers, request_body
from adapters.storage.jobs import Job
from fastcgi.errors import (
    BackendError,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
)
from fastcgi.pooling import (
    Pool,
    PooledStream,
    PoolLimits,
    PoolStatistics,
    closed_while_idle,
    connect_error,
    tls_reason,
)

_RECEIVE_SIZE = 64 * 1024
#: Response bodies are kept up to this size; the rest is read (to keep the connection
#: usable) and dropped.  Attempts record only the first KiB anyway.
MAX_KEPT_BODY = 1024 * 1024
_MAX_HEADER_BLOCK = 64 * 1024
#: A request up to this size goes into the socket buffers without waiting for the server to
#: read it, so it is written before the answer is read; a larger one is written while the
#: answer is read (a task more per delivery).
_WRITE_FIRST = 64 * 1024
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ProtocolViolation(BackendError):
    """The HTTP server's bytes broke HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class HTTPTarget:
    url: str
    timeout: float = 30.0
    content_type: str = "application/json"
    max_connections: int = 4
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    verify_tls: bool = True
    ca_file: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{self.url!r}: expected http://host[:port]/path or https://…")


class HTTPConnection(PooledStream):
    __slots__ = ("answered", "framed_twice", "h11", "stream", "write_error")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType, now: float) -> None:
        super().__init__(socket, now)
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BLOCK)
        #: Per exchange: whether any byte of an answer came, and why writing failed.
        self.answered = False
        self.write_error: BaseException | None = None
        #: An answer came with both Content-Length and Transfer-Encoding (see _receive).
        self.framed_twice = False

    def reusable(self) -> bool:
        conn = self.h11
        # Bytes after the response (a body longer than its Content-Length, an answer sent
        # twice) would be read as the next job's answer: the stream is out of step.
        if conn.trailing_data[0] or self.framed_twice:
            return False
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        return conn.our_state is h11.IDLE and conn.their_state is h11.IDLE


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class HTTPBackend:
    def __init__(self, target: HTTPTarget) -> None:
        self.target = target
        self.description = target.url
        parts = urlsplit(target.url)
        assert parts.hostname is not None
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        # RFC 9110 7.2: Host is uri-host [":" port], and an IPv6 address is a uri-host only
        # in brackets ("Host: ::1" is a 400 from nginx or Tomcat: dead at once).  urlsplit
        # drops them from hostname (and lower-cases it, which is harmless).
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._ssl_context: ssl.SSLContext | None = None
        if self._tls:
            self._ssl_context = ssl.create_default_context(cafile=target.ca_file)
            if not target.verify_tls:
                self._ssl_context.check_hostname = False
                self._ssl_context.verify_mode = ssl.CERT_NONE
        self.pool: Pool[HTTPConnection] = Pool(
            self._origin,
            self._connect,
            limits=PoolLimits(
                max_connections=target.max_connections, idle_timeout=target.idle_timeout
            ),
        )

    @property
    def url(self) -> str:
        """What the daemon requests: the origin and the request target as sent (no
        fragment, no empty "?", dot segments as written)."""
        return self._origin + self._path

    def request(self, job: Job) -> tuple[list[tuple[str, str]], bytes]:
        """The request's headers and body (``busgate curl`` prints the same)."""
        content_type, body = request_body(self.target.content_type, job.payload)
        headers = [
            ("Host", self._host_header),
            ("User-Agent", SERVER_SOFTWARE),
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            *job_headers(job),
        ]
        return headers, body

    async def deliver(self, job: Job) -> Delivery:
        timeout = self.target.timeout
        started = trio.current_time()
        pool = self.pool
        pool.requests_total += 1
        deadline = started + timeout
        try:
            # The job's deadline bounds getting a connection too, enforced by the pool (a
            # scope of ours around it would take the cancellation for itself): a deadline
            # passed before a connection was had is the pool's PoolTimeout or ConnectTimeout.
            # The job never left, so no attempt is spent, as with a refused connection; it
            # was a spent "no response" whenever the topic's timeout was under the connect
            # timeout.
            conn = await pool.acquire(deadline)
            sent_at = trio.current_time()
            try:
                answer = await self._send(conn, job, deadline)
            except ConnectionLost:
                if not closed_while_idle(conn, conn.answered, sent_at):
                    raise
                # A kept-alive connection found closed when reused, before any byte of an
                # answer and at once: the server closed it while it sat idle (its
                # keep-alive timeout), too recently for the check before reuse to see.
                # Once more, on a new connection, got as the first one was: a connect that
                # fails or hangs is the same unspent failure here.
                conn = await pool.acquire(deadline, fresh=True)
                answer = await self._send(conn, job, deadline)
        except BackendError as exc:
            pool.failures_total += 1
            return Delivery(
                trio.current_time() - started, failure=failure_of(exc), message=str(exc)
            )
        if answer is None:
            pool.failures_total += 1
            pool.timeouts_total += 1
            return Delivery(
                trio.current_time() - started,
                failure=Failure.TIMEOUT,
                message=f"{self._origin}: no response within {timeout:g}s",
            )
        status = answer.status
        return Delivery(
            duration=trio.current_time() - started,
            status=status,
            headers=answer.headers,
            body=answer.body,
            message=redirect_message(status, answer.headers, self.target.url)
            if 300 <= status < 400
            else "",
        )

    async def _send(self, conn: HTTPConnection, job: Job, deadline: float) -> _Answer | None:
        """One exchange on ``conn`` under the job's deadline: its answer, or None if the
        deadline came first.  The connection goes back to the pool only after a whole
        exchange."""
        with trio.CancelScope(deadline=deadline):
            try:
                answer = await self._exchange(conn, job)
            except BaseException:
                self.pool.discard(conn)
                raise
            self.pool.release(conn)
            return answer
        return None

    async def _exchange(self, conn: HTTPConnection, job: Job) -> _Answer:
        request_headers, body = self.request(job)
        protocol = conn.h11
        try:
            # h11 would encode text values as ASCII; an attribute may be any text (UTF-8).
            encoded = [(name.encode(), value.encode()) for name, value in request_headers]
            request = h11.Request(method="POST", target=self._path, headers=encoded)
            wire = protocol.send(request) or b""
            wire += protocol.send(h11.Data(data=body)) or b""
            wire += protocol.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise ProtocolViolation(self._origin, f"cannot send the request: {exc}") from exc
        conn.answered = False
        conn.write_error = None
        if len(wire) <= _WRITE_FIRST:
            await self._write(conn, wire)
            return await self._receive(conn)
        return await self._write_while_receiving(conn, wire)

    async def _write(self, conn: HTTPConnection, wire: bytes) -> None:
        try:
            await conn.stream.send_all(wire)
        except _BROKEN as exc:
            # Read on: the server may have answered before it closed (data that came before a
            # reset stays readable).  The request is not all out: never reuse this connection.
            conn.h11.send_failed()
            conn.write_error = exc

    async def _write_while_receiving(self, conn: HTTPConnection, wire: bytes) -> _Answer:
        """Write a large request while reading the answer, which may come first: a server
        can refuse from the head alone (413, 401) and then read no more, or close."""
        written = False

        async def write() -> None:
            nonlocal written
            await self._write(conn, wire)
            written = conn.write_error is None

        failure: BackendError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            try:
                answer = await self._receive(conn)
            except BackendError as exc:  # raised outside the nursery, not in a group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if not written:
            conn.h11.send_failed()  # answered before all was written: out of step for good
        return answer

    async def _receive(self, conn: HTTPConnection) -> _Answer:
        protocol = conn.h11
        status = 0
        headers: tuple[tuple[bytes, bytes], ...] = ()
        kept: list[bytes] = []
        kept_size = 0
        closed = False
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                if closed:  # h11's words for an end of stream before the answer was whole
                    raise self._lost(conn, status) from exc
                raise ProtocolViolation(self._origin, f"malformed response: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    data = await conn.stream.receive_some(_RECEIVE_SIZE)
                except _BROKEN as exc:
                    raise self._lost(conn, status, exc) from exc
                if data:
                    conn.answered = True
                else:
                    closed = True
                protocol.receive_data(bytes(data))
            elif isinstance(event, h11.Response):
                status = event.status_code
                # One pair per field line, as sent (h11 lower-cases the names), never joined:
                # ", " joins only list fields; a repeated singleton such as Content-Type
                # would become "application/json, text/html", a value nobody sent.  Whoever
                # reads a singleton takes a repeated same value as that value, and different
                # values as malformed (as _redirect does with Location).
                headers = tuple((bytes(k), bytes(v)) for k, v in event.headers)
                # Framed two ways: h11 reads it as chunked (RFC 9112 6.3), but a proxy on
                # the way may have framed it by length; the rest of the stream is suspect.
                names = {name for name, _ in headers}
                conn.framed_twice = b"content-length" in names and b"transfer-encoding" in names
            elif isinstance(event, h11.Data):
                if kept_size < MAX_KEPT_BODY:
                    kept.append(bytes(event.data[: MAX_KEPT_BODY - kept_size]))
                    kept_size += len(kept[-1])
            elif isinstance(event, h11.EndOfMessage):
                return _Answer(status, headers, b"".join(kept))
            elif isinstance(event, h11.ConnectionClosed):
                raise self._lost(conn, status)
            # InformationalResponse (100 Continue and friends): keep reading.

    def _lost(
        self, conn: HTTPConnection, status: int, error: BaseException | None = None
    ) -> ConnectionLost:
        """The connection ended before the whole answer: say when, and what broke it."""
        if conn.write_error is not None and not conn.answered:
            return ConnectionLost(
                self._origin, f"connection broke while writing: {conn.write_error}"
            )
        if error is not None:
            return ConnectionLost(self._origin, f"connection broke while reading: {error}")
        if not conn.answered:
            return ConnectionLost(self._origin, "the server closed the connection before answering")
        where = f"after status {status}" if status else "in the status line or headers"
        return ConnectionLost(
            self._origin, f"the server closed the connection mid-response ({where})"
        )

    async def _connect(self) -> HTTPConnection:
        name = self._origin
        with trio.move_on_after(self.target.connect_timeout) as scope:
            try:
                tcp = await trio.open_tcp_stream(self._host, self._port)
            except socket.gaierror as exc:
                # getaddrinfo's codes are not errno values: os_reason read EAI_NONAME (-2)
                # as "Unknown error -2".
                raise ConnectError(name, f"cannot resolve {self._host}: {exc.strerror}") from exc
            except OSError as exc:
                raise connect_error(name, exc) from exc
            stream: trio.abc.Stream = tcp
            if self._ssl_context is not None:
                tls = trio.SSLStream(tcp, self._ssl_context, server_hostname=self._host)
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    tcp.socket.close()
                    raise ConnectError(name, f"TLS handshake failed: {tls_reason(exc)}") from exc
                except BaseException:  # cut short (the connect timeout, the job's): no socket left
                    tcp.socket.close()
                    raise
                stream = tls
        if scope.cancelled_caught:
            raise ConnectTimeout(
                name, f"connect timeout: not connected within {self.target.connect_timeout:g}s"
            )
        return HTTPConnection(stream, tcp.socket, trio.current_time())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.pool.run(task_status=task_status)

    async def aclose(self) -> None:
        await self.pool.aclose()

    def statistics(self) -> PoolStatistics:
        return self.pool.statistics()
