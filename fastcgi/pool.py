"""A trio connection pool for one FastCGI backend.

php-fpm facts that shape it: a kept-open connection pins one php-fpm worker even while idle,
so open connections are hard-capped and idle ones closed; connections beyond what the pool
can serve wait in php-fpm's listen queue without limit, so the cap is enforced here, before
connecting; workers are recycled and pools restarted, so an idle connection is checked for
EOF before reuse.  The cap, the idle stack and the checks are ``fastcgi.pooling``; this module
is the FastCGI exchange on top.  A connection that timed out or failed in any way is closed,
never reused: bytes still in flight on it would be read as the next response.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType

import trio

from fastcgi.address import Address
from fastcgi.cgi import DEFAULT_MAX_HEADER_SIZE, find_header, parse_cgi_response
from fastcgi.connection import NEED_DATA, ClientConnection, Limits, State
from fastcgi.errors import (
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    ReadTimeout,
    RemoteProtocolError,
    RequestRejected,
    WriteTimeout,
)
from fastcgi.events import (
    BeginRequest,
    EndRequest,
    GetValues,
    GetValuesResult,
    Pair,
    Params,
    Stderr,
    Stdin,
    Stdout,
    UnknownType,
)
from fastcgi.pooling import Pool, PooledStream, PoolLimits, PoolStatistics, none_inf, os_reason

__all__ = ["ConnectionPool", "PoolLimits", "PoolStatistics", "Response", "Timeouts"]

# recv() allocates its whole buffer each call; above glibc's 128 KiB mmap threshold every
# call would be an mmap/munmap pair, so stay at 64 KiB.
_RECEIVE_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines in seconds; ``None`` means no deadline for that phase.

    ``read`` covers the whole wait for the response after the request was written: for a
    job it is the processing time the backend is allowed.  ``pool`` bounds the wait for a
    free connection when all ``max_connections`` are busy.
    """

    connect: float | None = 5.0
    write: float | None = 30.0
    read: float | None = 30.0
    pool: float | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """A completed FastCGI request: the CGI response plus what only FastCGI carries."""

    status: int
    reason: str
    headers: tuple[Pair, ...]
    body: bytes
    stderr: bytes
    app_status: int
    elapsed: float  # seconds from the first byte written to END_REQUEST

    def header(self, name: bytes) -> bytes | None:
        return find_header(self.headers, name)


class FastCGIConnection(PooledStream):
    """One open socket to the backend and its FastCGI protocol state."""

    __slots__ = ("protocol",)

    def __init__(self, stream: trio.SocketStream, limits: Limits, now: float) -> None:
        super().__init__(stream, stream.socket, now)
        self.protocol = ClientConnection(limits)

    def reusable(self) -> bool:
        protocol = self.protocol
        if protocol.state is State.DONE and protocol.keep_conn:
            protocol.start_next_cycle()
        # Bytes after END_REQUEST mean the stream is out of step: never reuse it.
        return protocol.state is State.IDLE and not protocol.buffered_bytes


class ConnectionPool:
    """Kept-alive, capped FastCGI connections to one backend address.

    Use as ``async with ConnectionPool(...) as pool`` (or call ``aclose``); run ``run()`` in a
    nursery to have idle connections closed even when no requests come.
    """

    def __init__(
        self,
        address: Address,
        *,
        limits: PoolLimits = PoolLimits(),
        timeouts: Timeouts = Timeouts(),
        response_limits: Limits = Limits(),
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    ) -> None:
        self.address = address
        self.timeouts = timeouts
        self.response_limits = response_limits
        self.max_header_size = max_header_size
        self._name = str(address)
        self._pool: Pool[FastCGIConnection] = Pool(
            self._name, self._connect, limits=limits, pool_timeout=timeouts.pool
        )

    @property
    def limits(self) -> PoolLimits:
        return self._pool.limits

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def statistics(self) -> PoolStatistics:
        return self._pool.statistics()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close idle connections when they expire, until the pool is closed."""
        await self._pool.run(task_status=task_status)

    async def aclose(self) -> None:
        """Close idle connections now; in-use ones are closed when their request ends."""
        await self._pool.aclose()

    # -- requests ------------------------------------------------------------------------------

    async def request(
        self,
        params: Params | Mapping[bytes, bytes] | Iterable[Pair],
        body: bytes = b"",
        *,
        read_timeout: float | None = None,
    ) -> Response:
        """Send one RESPONDER request and return the parsed response.

        ``read_timeout`` replaces ``timeouts.read`` for this request (a topic's job timeout).
        Raises a ``BackendError`` subclass or ``RemoteProtocolError``; in either case the
        connection used has been closed.
        """
        if not isinstance(params, Params):
            params = Params.of(params)
        protocol_events = (BeginRequest(keep_conn=True), params, Stdin(body))
        read = self.timeouts.read if read_timeout is None else read_timeout
        pool = self._pool
        pool.requests_total += 1
        try:
            conn = await pool.acquire()
            try:
                response = await self._exchange(conn, protocol_events, read)
            except BaseException:
                pool.discard(conn)
                raise
            pool.release(conn)
        except RemoteProtocolError as exc:
            pool.failures_total += 1
            raise RemoteProtocolError(f"{self._name}: {exc}") from exc
        except Exception as exc:
            pool.failures_total += 1
            if isinstance(exc, TimeoutError):
                pool.timeouts_total += 1
            raise
        return response

    async def get_values(self, names: Iterable[bytes]) -> dict[bytes, bytes]:
        """Ask the backend for management variables (e.g. ``FCGI_MAX_CONNS``)."""
        conn = await self._pool.acquire()
        try:
            with trio.move_on_after(none_inf(self.timeouts.read)) as scope:
                result = await self._query_values(conn, tuple(names))
            if scope.cancelled_caught:
                raise ReadTimeout(self._name, "no GET_VALUES_RESULT before the read deadline")
        except BaseException as exc:
            self._pool.discard(conn)
            if isinstance(exc, RemoteProtocolError):
                raise RemoteProtocolError(f"{self._name}: {exc}") from exc
            raise
        self._pool.release(conn)
        return result

    async def _query_values(
        self, conn: FastCGIConnection, names: tuple[bytes, ...]
    ) -> dict[bytes, bytes]:
        await self._send_all(conn, conn.protocol.send(GetValues(names)))
        while True:
            event = conn.protocol.next_event()
            if event is NEED_DATA:
                await self._receive(conn)
            elif isinstance(event, GetValuesResult):
                return dict(event.values)
            elif isinstance(event, UnknownType):
                return {}
            else:
                raise RemoteProtocolError(f"unexpected {event!r} answering GET_VALUES")

    async def _exchange(
        self,
        conn: FastCGIConnection,
        protocol_events: tuple[BeginRequest, Params, Stdin],
        read: float | None,
    ) -> Response:
        protocol = conn.protocol
        wire = b"".join([protocol.send(event) for event in protocol_events])
        started = trio.current_time()
        write = self.timeouts.write
        # One cancel scope for the exchange (a scope per phase costs more than the phase on a
        # fast backend); its deadline moves from the write limit to the read limit.
        writing = True
        with trio.CancelScope(deadline=started + none_inf(write)) as scope:
            await self._send_all(conn, wire)
            scope.deadline = trio.current_time() + none_inf(read)
            writing = False
            stdout, stderr, end = await self._read_response(conn)
        if scope.cancelled_caught:
            if writing:
                raise WriteTimeout(self._name, f"request not written within {write}s")
            raise ReadTimeout(self._name, f"no complete response within {read}s")
        elapsed = trio.current_time() - started

        if not end.complete:
            raise RequestRejected(self._name, end.protocol_status)
        cgi = parse_cgi_response(b"".join(stdout), max_header_size=self.max_header_size)
        return Response(
            status=cgi.status,
            reason=cgi.reason,
            headers=cgi.headers,
            body=cgi.body,
            stderr=b"".join(stderr),
            app_status=end.app_status,
            elapsed=elapsed,
        )

    async def _read_response(
        self, conn: FastCGIConnection
    ) -> tuple[list[bytes], list[bytes], EndRequest]:
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        protocol = conn.protocol
        while True:
            event = protocol.next_event()
            if event is NEED_DATA:
                await self._receive(conn)
            elif isinstance(event, Stdout):
                stdout.append(event.data)
            elif isinstance(event, Stderr):
                stderr.append(event.data)
            elif isinstance(event, EndRequest):
                return stdout, stderr, event
            else:
                raise RemoteProtocolError(f"unexpected {event!r} in a response")

    async def _send_all(self, conn: FastCGIConnection, data: bytes) -> None:
        try:
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(self._name, f"connection broke while writing: {exc}") from exc

    async def _receive(self, conn: FastCGIConnection) -> None:
        try:
            data = await conn.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(self._name, f"connection broke while reading: {exc}") from exc
        conn.protocol.receive_data(data)

    async def _connect(self) -> FastCGIConnection:
        address = self.address
        with trio.move_on_after(none_inf(self.timeouts.connect)) as scope:
            try:
                if address.is_unix:
                    stream = await trio.open_unix_socket(address.path)
                else:
                    stream = await trio.open_tcp_stream(address.host, address.port)
            except OSError as exc:
                raise ConnectError(self._name, f"cannot connect: {os_reason(exc)}") from exc
        if scope.cancelled_caught:
            raise ConnectTimeout(self._name, f"not connected within {self.timeouts.connect}s")
        return FastCGIConnection(stream, self.response_limits, trio.current_time())
