"""Delivering a job to an HTTP service: a POST with the payload as body, over h11 on trio.

Connections to the topic's origin are kept alive and capped like FastCGI ones
(``fastcgi.pooling``); a response with ``Connection: close`` (or HTTP/1.0 without keep-alive)
retires its connection, which h11 tells us through its states.  HTTPS uses the system's CA
store unless the topic names another CA file or turns verification off.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from adapters.delivery.base import Delivery, Failure, failure_of
from adapters.delivery.headers import SERVER_SOFTWARE, job_headers, request_body
from adapters.storage.jobs import Job
from fastcgi.errors import (
    BackendError,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
)
from fastcgi.pooling import Pool, PooledStream, PoolLimits, PoolStatistics, os_reason

_RECEIVE_SIZE = 64 * 1024
#: Response bodies are kept up to this size; the rest is read (to keep the connection
#: usable) and dropped.  Attempts record only the first KiB anyway.
MAX_KEPT_BODY = 1024 * 1024
_MAX_HEADER_BLOCK = 64 * 1024


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
    __slots__ = ("h11", "stream")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType, now: float) -> None:
        super().__init__(socket, now)
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BLOCK)

    def reusable(self) -> bool:
        conn = self.h11
        # Bytes after the response (a body longer than its Content-Length, an answer sent
        # twice) would be read as the next job's answer: the stream is out of step.
        if conn.trailing_data[0]:
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
        self._host_header = parts.netloc if not default_port else parts.hostname
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
        try:
            with trio.CancelScope(deadline=started + timeout) as scope:
                conn = await pool.acquire()
                try:
                    answer = await self._exchange(conn, job)
                except BaseException:
                    pool.discard(conn)
                    raise
                pool.release(conn)
        except BackendError as exc:
            pool.failures_total += 1
            return Delivery(
                trio.current_time() - started, failure=failure_of(exc), message=str(exc)
            )
        if scope.cancelled_caught:
            pool.failures_total += 1
            pool.timeouts_total += 1
            return Delivery(
                trio.current_time() - started,
                failure=Failure.TIMEOUT,
                message=f"{self._origin}: no response within {timeout:g}s",
            )
        return Delivery(
            duration=trio.current_time() - started,
            status=answer.status,
            headers=answer.headers,
            body=answer.body,
        )

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
        try:
            await conn.stream.send_all(wire)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(self._origin, f"connection broke while writing: {exc}") from exc

        status = 0
        headers: tuple[tuple[bytes, bytes], ...] = ()
        kept: list[bytes] = []
        kept_size = 0
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolViolation(self._origin, f"malformed response: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    data = await conn.stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise ConnectionLost(
                        self._origin, f"connection broke while reading: {exc}"
                    ) from exc
                protocol.receive_data(bytes(data))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = tuple((bytes(k), bytes(v)) for k, v in event.headers)
            elif isinstance(event, h11.Data):
                if kept_size < MAX_KEPT_BODY:
                    kept.append(bytes(event.data[: MAX_KEPT_BODY - kept_size]))
                    kept_size += len(kept[-1])
            elif isinstance(event, h11.EndOfMessage):
                return _Answer(status, headers, b"".join(kept))
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionLost(self._origin, "the server closed the connection mid-response")
            # InformationalResponse (100 Continue and friends): keep reading.

    async def _connect(self) -> HTTPConnection:
        name = self._origin
        with trio.move_on_after(self.target.connect_timeout) as scope:
            try:
                tcp = await trio.open_tcp_stream(self._host, self._port)
            except OSError as exc:
                raise ConnectError(name, f"cannot connect: {os_reason(exc)}") from exc
            stream: trio.abc.Stream = tcp
            if self._ssl_context is not None:
                tls = trio.SSLStream(tcp, self._ssl_context, server_hostname=self._host)
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    tcp.socket.close()
                    raise ConnectError(name, f"TLS handshake failed: {exc}") from exc
                stream = tls
        if scope.cancelled_caught:
            raise ConnectTimeout(name, f"not connected within {self.target.connect_timeout}s")
        return HTTPConnection(stream, tcp.socket, trio.current_time())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.pool.run(task_status=task_status)

    async def aclose(self) -> None:
        await self.pool.aclose()

    def statistics(self) -> PoolStatistics:
        return self.pool.statistics()
