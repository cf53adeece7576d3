"""A trio connection pool for one FastCGI backend.

php-fpm facts that shape this pool:

* a kept-open connection pins one php-fpm worker even while idle, so the number of open
  connections is hard-capped (``max_connections``) and idle ones are closed after
  ``idle_timeout``;
* connections beyond what the pool can serve wait in the listen queue without limit, so the
  cap is enforced *here*, before connecting;
* workers are recycled (``pm.max_requests``) and pools restarted, so an idle connection is
  checked for EOF before it is reused.

Bookkeeping is synchronous (httpcore's rule): a connection changes hands between idle list,
caller and closed without an ``await`` in between, so a cancellation can never leave one
counted twice or lost.  A connection that timed out or failed in any way is closed, never
reused, because the bytes still in flight on it would be read as the next response.
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import trio

from fastcgi.address import Address
from fastcgi.cgi import DEFAULT_MAX_HEADER_SIZE, parse_cgi_response
from fastcgi.connection import NEED_DATA, ClientConnection, Limits, State
from fastcgi.errors import (
    BackendError,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    PoolTimeout,
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

_RECEIVE_SIZE = 256 * 1024


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
class PoolLimits:
    max_connections: int = 8
    idle_timeout: float = 60.0
    max_requests: int | None = None  # per connection, then it is closed
    max_age: float | None = None  # seconds a connection may live, then it is closed
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    response: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")


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
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    address: str
    max_connections: int
    open: int  # connected or connecting
    idle: int
    in_use: int
    waiting: int  # callers queued for a free connection
    opened_total: int
    closed_total: int
    requests_total: int
    failures_total: int  # requests that ended in any exception
    timeouts_total: int


def _is_readable(sock: trio.socket.SocketType) -> bool:
    """True if an idle socket has something to read: EOF from a closed server, or junk."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class PooledConnection:
    """One open socket to the backend and its protocol state."""

    __slots__ = ("created_at", "idle_since", "protocol", "requests", "stream")

    def __init__(self, stream: trio.SocketStream, limits: Limits, now: float) -> None:
        self.stream = stream
        self.protocol = ClientConnection(limits)
        self.created_at = now
        self.idle_since = now
        self.requests = 0

    def close(self) -> None:
        # SocketStream.aclose() only closes the socket and checkpoints; closing synchronously
        # keeps the pool's bookkeeping free of awaits.
        self.stream.socket.close()

    def is_stale(self) -> bool:
        return self.protocol.state is not State.IDLE or _is_readable(self.stream.socket)


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
    ) -> None:
        self.address = address
        self.limits = limits
        self.timeouts = timeouts
        self._name = str(address)
        self._slots = trio.Semaphore(limits.max_connections)
        self._idle: list[PooledConnection] = []  # a stack: the warmest connection is reused
        self._in_use = 0
        self._connecting = 0
        self._closed = False
        self._idle_changed = trio.Event()
        self._opened_total = 0
        self._closed_total = 0
        self._requests_total = 0
        self._failures_total = 0
        self._timeouts_total = 0

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the public API -----------------------------------------------------------------------

    async def request(
        self,
        params: Mapping[bytes, bytes] | Iterable[Pair],
        body: bytes = b"",
        *,
        read_timeout: float | None = None,
    ) -> Response:
        """Send one RESPONDER request and return the parsed response.

        ``read_timeout`` replaces ``timeouts.read`` for this request (a topic's job timeout).
        Raises a ``BackendError`` subclass or ``RemoteProtocolError``; in either case the
        connection used has been closed.
        """
        protocol_events = (BeginRequest(keep_conn=True), Params.of(params), Stdin(body))
        read = self.timeouts.read if read_timeout is None else read_timeout
        self._requests_total += 1
        try:
            return await self._request(protocol_events, read)
        except Exception as exc:
            self._failures_total += 1
            if isinstance(exc, TimeoutError):
                self._timeouts_total += 1
            raise

    async def get_values(self, names: Iterable[bytes]) -> dict[bytes, bytes]:
        """Ask the backend for management variables (e.g. ``FCGI_MAX_CONNS``)."""
        conn = await self._acquire()
        try:
            wire = conn.protocol.send(GetValues(tuple(names)))
            result: dict[bytes, bytes] = {}
            with trio.move_on_after(_none_inf(self.timeouts.read)) as scope:
                await self._send_all(conn, wire)
                while True:
                    event = conn.protocol.next_event()
                    if event is NEED_DATA:
                        await self._receive(conn)
                        continue
                    if isinstance(event, GetValuesResult):
                        result = dict(event.values)
                        break
                    if isinstance(event, UnknownType):
                        break
                    raise RemoteProtocolError(f"unexpected {event!r} answering GET_VALUES")
            if scope.cancelled_caught:
                raise ReadTimeout(self._name, "no GET_VALUES_RESULT before the read deadline")
        except BaseException as exc:
            self._discard(conn)
            if isinstance(exc, RemoteProtocolError):
                raise RemoteProtocolError(f"{self._name}: {exc}") from exc
            raise
        self._release(conn)
        return result

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            address=self._name,
            max_connections=self.limits.max_connections,
            open=len(self._idle) + self._in_use,
            idle=len(self._idle),
            in_use=self._in_use,
            waiting=self._slots.statistics().tasks_waiting,
            opened_total=self._opened_total,
            closed_total=self._closed_total,
            requests_total=self._requests_total,
            failures_total=self._failures_total,
            timeouts_total=self._timeouts_total,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close idle connections when they expire, until the pool is closed."""
        task_status.started()
        while not self._closed:
            self._close_expired(trio.current_time())
            deadline = min(
                (c.idle_since + self.limits.idle_timeout for c in self._idle), default=math.inf
            )
            self._idle_changed = trio.Event()
            with trio.move_on_at(deadline):
                await self._idle_changed.wait()

    async def aclose(self) -> None:
        """Close idle connections now; in-use ones are closed when their request ends."""
        self._closed = True
        while self._idle:
            self._close(self._idle.pop())
        self._idle_changed.set()
        await trio.lowlevel.checkpoint()

    # -- one request --------------------------------------------------------------------------

    async def _request(
        self, protocol_events: tuple[BeginRequest, Params, Stdin], read: float | None
    ) -> Response:
        conn = await self._acquire()
        try:
            response = await self._exchange(conn, protocol_events, read)
        except BaseException as exc:
            # Timed out, cancelled or broken: unread bytes may still arrive on this socket.
            self._discard(conn)
            if isinstance(exc, RemoteProtocolError):
                raise RemoteProtocolError(f"{self._name}: {exc}") from exc
            raise
        self._release(conn)
        return response

    async def _exchange(
        self,
        conn: PooledConnection,
        protocol_events: tuple[BeginRequest, Params, Stdin],
        read: float | None,
    ) -> Response:
        protocol = conn.protocol
        wire = b"".join([protocol.send(event) for event in protocol_events])
        conn.requests += 1
        started = trio.current_time()

        with trio.move_on_after(_none_inf(self.timeouts.write)) as write_scope:
            await self._send_all(conn, wire)
        if write_scope.cancelled_caught:
            raise WriteTimeout(self._name, f"request not written within {self.timeouts.write}s")

        with trio.move_on_after(_none_inf(read)) as read_scope:
            stdout, stderr, end = await self._read_response(conn)
        if read_scope.cancelled_caught:
            raise ReadTimeout(self._name, f"no complete response within {read}s")
        elapsed = trio.current_time() - started

        if not end.complete:
            raise RequestRejected(self._name, end.protocol_status)
        cgi = parse_cgi_response(b"".join(stdout), max_header_size=self.limits.max_header_size)
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
        self, conn: PooledConnection
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

    async def _send_all(self, conn: PooledConnection, data: bytes) -> None:
        try:
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(self._name, f"connection broke while writing: {exc}") from exc

    async def _receive(self, conn: PooledConnection) -> None:
        try:
            data = await conn.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(self._name, f"connection broke while reading: {exc}") from exc
        conn.protocol.receive_data(data)

    # -- acquiring and releasing connections ----------------------------------------------------

    async def _acquire(self) -> PooledConnection:
        if self._closed:
            raise BackendError(self._name, "the connection pool is closed")
        with trio.move_on_after(_none_inf(self.timeouts.pool)) as scope:
            await self._slots.acquire()
        if scope.cancelled_caught:
            self._timeouts_total += 1
            raise PoolTimeout(
                self._name,
                f"no free connection within {self.timeouts.pool}s"
                f" ({self.limits.max_connections} in use)",
            )
        try:
            conn = self._take_idle()
            if conn is None:
                conn = await self._connect()
        except BaseException:
            self._slots.release()
            raise
        self._in_use += 1
        return conn

    def _take_idle(self) -> PooledConnection | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            if self._expired(conn, now) or conn.is_stale():
                self._close(conn)
                continue
            return conn
        return None

    async def _connect(self) -> PooledConnection:
        address = self.address
        self._connecting += 1
        try:
            with trio.move_on_after(_none_inf(self.timeouts.connect)) as scope:
                try:
                    if address.is_unix:
                        stream = await trio.open_unix_socket(address.path)
                    else:
                        stream = await trio.open_tcp_stream(address.host, address.port)
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    raise ConnectError(self._name, f"cannot connect: {reason}") from exc
            if scope.cancelled_caught:
                raise ConnectTimeout(self._name, f"not connected within {self.timeouts.connect}s")
        finally:
            self._connecting -= 1
        self._opened_total += 1
        return PooledConnection(stream, self.limits.response, trio.current_time())

    def _release(self, conn: PooledConnection) -> None:
        """Return a connection after a successful exchange: to the idle stack, or closed."""
        self._in_use -= 1
        self._slots.release()
        protocol = conn.protocol
        if protocol.state is State.DONE and protocol.keep_conn:
            protocol.start_next_cycle()
        now = trio.current_time()
        if (
            self._closed
            or protocol.state is not State.IDLE
            or protocol.buffered_bytes  # bytes after END_REQUEST: the stream is out of step
            or self._worn_out(conn, now)
        ):
            self._close(conn)
            return
        conn.idle_since = now
        self._idle.append(conn)
        if len(self._idle) == 1:
            self._idle_changed.set()  # the reaper may be sleeping with no deadline

    def _discard(self, conn: PooledConnection) -> None:
        self._in_use -= 1
        self._slots.release()
        self._close(conn)

    def _close(self, conn: PooledConnection) -> None:
        conn.close()
        self._closed_total += 1

    def _worn_out(self, conn: PooledConnection, now: float) -> bool:
        limits = self.limits
        return (limits.max_requests is not None and conn.requests >= limits.max_requests) or (
            limits.max_age is not None and now - conn.created_at >= limits.max_age
        )

    def _expired(self, conn: PooledConnection, now: float) -> bool:
        return now - conn.idle_since >= self.limits.idle_timeout or self._worn_out(conn, now)

    def _close_expired(self, now: float) -> None:
        keep = []
        for conn in self._idle:
            if now - conn.idle_since >= self.limits.idle_timeout:
                self._close(conn)
            else:
                keep.append(conn)
        self._idle = keep


def _none_inf(value: float | None) -> float:
    return math.inf if value is None else value
