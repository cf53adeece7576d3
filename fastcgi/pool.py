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

import errno
import math
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import trio

from fastcgi.address import Address
from fastcgi.cgi import DEFAULT_MAX_HEADER_SIZE, find_header, parse_cgi_response
from fastcgi.connection import NEED_DATA, ClientConnection, Limits, NeedData, State
from fastcgi.errors import (
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    ReadTimeout,
    RemoteProtocolError,
    RequestRejected,
    WriteTimeout,
)
from fastcgi.events import GetValues, GetValuesResult, Pair, Params, UnknownType
from fastcgi.pooling import (
    Pool,
    PooledStream,
    PoolLimits,
    PoolStatistics,
    closed_while_idle,
    connect_error,
    none_inf,
    send_all,
)
from fastcgi.spec import ProtocolStatus

__all__ = ["ConnectionPool", "PoolLimits", "PoolStatistics", "Response", "Timeouts"]

# recv() allocates its whole buffer each call; above glibc's 128 KiB mmap threshold every
# call would be an mmap/munmap pair, so stay at 64 KiB.
_RECEIVE_SIZE = 64 * 1024

T = TypeVar("T")

_REQUEST_COMPLETE = int(ProtocolStatus.REQUEST_COMPLETE)

#: How long a new connection's first answer may take to begin before a child is freed for it.
_NUDGE = 0.02

#: The running pools, by backend address.  The php-fpm workers behind an address are shared
#: by every pool connected to it (one per topic delivering there), and each kept-open
#: connection holds one of them, even idle.
_RUNNING: dict[Address, set[ConnectionPool]] = {}


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


@dataclass(slots=True)
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
    """One open socket to the backend and its FastCGI protocol state.

    The exchange talks to the plain socket (``sock``) rather than through a trio stream: a
    request fits the socket buffer, so it is one ``send()`` with no scheduler round trip, and
    the wait for the answer is one ``wait_readable``.  ``socket`` (the trio wrapper of the
    same socket) is what the pool closes, which wakes a task waiting on it.
    """

    __slots__ = ("protocol", "sock")

    def __init__(self, sock: socket.socket, limits: Limits, now: float) -> None:
        super().__init__(trio.socket.from_stdlib_socket(sock), now)
        self.sock = sock
        self.protocol = ClientConnection(limits)

    def reusable(self) -> bool:
        protocol = self.protocol
        if protocol.state is State.DONE and protocol.keep_conn:
            protocol.start_next_cycle()
        # Bytes after END_REQUEST mean the stream is out of step: never reuse it.
        return protocol.state is State.IDLE and not protocol.buffered_bytes


class ConnectionPool:
    """Kept-alive, capped FastCGI connections to one backend address.

    Deadlines and idle expiry are enforced by ``run()``: either use the pool as
    ``async with ConnectionPool(...) as pool``, which runs it in a nursery of its own, or run
    ``run()`` in yours (``await nursery.start(pool.run)``) and call ``aclose`` when done.
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
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None

    @property
    def limits(self) -> PoolLimits:
        return self._pool.limits

    async def __aenter__(self) -> ConnectionPool:
        manager = trio.open_nursery()
        nursery = await manager.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException:
            self._pool.close()
            await manager.__aexit__(None, None, None)
            raise
        self._nursery_manager = manager
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Closing is synchronous, so run() ends at its next wake-up and the nursery exits
        # cleanly; the body's own exception propagates as it is, not wrapped in a group.
        self._pool.close()
        manager, self._nursery_manager = self._nursery_manager, None
        if manager is not None:
            await manager.__aexit__(None, None, None)

    def statistics(self) -> PoolStatistics:
        return self._pool.statistics()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close idle connections when they expire, until the pool is closed."""
        neighbours = _RUNNING.setdefault(self.address, set())
        neighbours.add(self)
        try:
            await self._pool.run(task_status=task_status)
        finally:
            neighbours.discard(self)
            if not neighbours:
                _RUNNING.pop(self.address, None)

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
        deadline: float = math.inf,
    ) -> Response:
        """Send one RESPONDER request and return the parsed response.

        ``read_timeout`` replaces ``timeouts.read`` for this request.  ``deadline`` (trio
        time) bounds the whole request as well, waiting for a connection and connecting
        included: a job's timeout.  Raises a ``BackendError`` subclass or
        ``RemoteProtocolError``; in either case the connection used has been closed.
        """
        if not isinstance(params, Params):
            params = Params.of(params)
        read = self.timeouts.read if read_timeout is None else read_timeout
        pool = self._pool
        if not pool.running:
            raise RuntimeError(
                f"{self._name}: the pool is not running; use `async with` or run() it"
            )
        pool.requests_total += 1
        try:
            conn = await pool.acquire(deadline)
            sent_at = trio.current_time()
            try:
                response = await self._exchange(conn, params, body, read, deadline)
            except (RemoteProtocolError, ConnectionLost):
                pool.discard(conn)
                if not closed_while_idle(conn, not conn.protocol.answered_nothing, sent_at):
                    raise
                # A kept-alive connection found closed when reused, before any byte of an
                # answer: the backend closed it while it sat idle, too recently for the
                # check before reuse to see (a php-fpm child leaving after pm.max_requests
                # closes right after its last answer).  Once more, on a new connection.
                conn = await pool.acquire(deadline, fresh=True)
                try:
                    response = await self._exchange(conn, params, body, read, deadline)
                except BaseException:
                    pool.discard(conn)
                    raise
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
        pool = self._pool
        conn = await pool.acquire()
        try:
            protocol = conn.protocol
            await self._write(conn, protocol.send(GetValues(tuple(names))))
            event = await self._read(
                conn, self.timeouts.read, protocol.next_event, trio.current_time()
            )
            if isinstance(event, GetValuesResult):
                result = dict(event.values)
            elif isinstance(event, UnknownType):
                result = {}
            else:
                raise RemoteProtocolError(f"unexpected {event!r} answering GET_VALUES")
        except BaseException as exc:
            pool.discard(conn)
            if isinstance(exc, RemoteProtocolError):
                raise RemoteProtocolError(f"{self._name}: {exc}") from exc
            raise
        pool.release(conn)
        return result

    async def _exchange(
        self,
        conn: FastCGIConnection,
        params: Params,
        body: bytes,
        read: float | None,
        deadline: float = math.inf,
    ) -> Response:
        protocol = conn.protocol
        wire = protocol.send_request(params, body)
        # Nothing is sent to a task that is already cancelled: the backend would run the job
        # for nobody.
        await trio.lowlevel.checkpoint_if_cancelled()
        now = self._pool.now
        started = now()
        waited = await self._write(conn, wire, deadline)
        # The read limit runs from the end of the write (see Timeouts).  A write that went
        # out in one send() ended microseconds after ``started``: no second clock read.
        written = now() if waited else started
        answer = await self._read(conn, read, protocol.receive_response, written, deadline)
        elapsed = now() - started

        if answer.protocol_status != _REQUEST_COMPLETE:  # answer.complete, without its call
            raise RequestRejected(self._name, answer.protocol_status)
        cgi = parse_cgi_response(answer.stdout, max_header_size=self.max_header_size)
        # Positional: binding seven keywords costs more than building the object.
        return Response(
            cgi.status, cgi.reason, cgi.headers, cgi.body, answer.stderr, answer.app_status, elapsed
        )

    async def _write(
        self, conn: FastCGIConnection, data: bytes, deadline: float = math.inf
    ) -> bool:
        """Send all of ``data``; only a send that does not fit the socket buffer waits.

        Returns whether it waited.
        """
        # A request nearly always fits the socket buffer: one send(), without the deadline
        # bookkeeping of a wait (a closure and a coroutine) built for nothing.
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise ConnectionLost(self._name, f"connection broke while writing: {exc}") from exc
        if sent == len(data):
            return False
        return await self._write_waiting(conn, memoryview(data)[sent:], deadline)

    async def _write_waiting(
        self, conn: FastCGIConnection, data: memoryview, deadline: float
    ) -> bool:
        """The rest of ``_write``: send ``data``, waiting for room under the write deadline."""
        armed, allowed = False, math.inf

        def arm() -> None:
            nonlocal armed, allowed, deadline
            now = trio.current_time()
            deadline = min(now + none_inf(self.timeouts.write), deadline)
            self._pool.arm(conn, deadline)
            armed, allowed = True, deadline - now

        try:
            await send_all(conn.sock, data, arm)
        except (trio.ClosedResourceError, OSError) as exc:
            if conn.expired:
                raise WriteTimeout(
                    self._name, f"request not written within {allowed:.3g}s"
                ) from None
            raise ConnectionLost(self._name, f"connection broke while writing: {exc}") from exc
        else:
            return armed
        finally:
            if armed:
                self._pool.disarm(conn)

    async def _read(
        self,
        conn: FastCGIConnection,
        limit: float | None,
        fold: Callable[[], T | NeedData],
        started: float,
        deadline: float = math.inf,
    ) -> T:
        """Receive until ``fold`` (a ``ClientConnection`` method) has a result.

        It must have one within ``limit`` seconds of ``started`` and before ``deadline``.
        """
        sock = conn.sock
        protocol = conn.protocol
        if limit is not None:
            deadline = min(started + limit, deadline)
        # A new connection's first answer not begun by then: php-fpm may have no child free
        # for it while other pools hold some idle (_free_a_child).  Once, and only then, so
        # pools busy by turns do not close each other's connections for nothing.  (Reused
        # connections, nearly every request, skip the look-up: hashing the address is a call.)
        nudge_at = 0.0
        if conn.requests == 1 and len(_RUNNING.get(self.address, ())) > 1:
            nudge_at = started + _NUDGE
        self._pool.arm(conn, deadline)
        try:
            # One yield first: by then a quick backend has usually answered, and recv()
            # finds the response without an epoll round.
            await trio.lowlevel.cancel_shielded_checkpoint()
            while True:
                try:
                    data = sock.recv(_RECEIVE_SIZE)
                except BlockingIOError:
                    pass
                else:
                    nudge_at = 0
                    protocol.receive_data(data)
                    try:
                        result = fold()
                    except RemoteProtocolError as exc:
                        if data:
                            raise
                        # An EOF mid-answer is a worker gone (crashed, killed by php-fpm's
                        # request_terminate_timeout), not a backend breaking the protocol:
                        # the HTTP adapter calls it the same.
                        raise ConnectionLost(
                            self._name,
                            f"the backend closed the connection before the response ended: {exc}",
                        ) from None
                    if result is not NEED_DATA:
                        return result
                if nudge_at:
                    with trio.move_on_at(nudge_at):
                        await trio.lowlevel.wait_readable(sock)
                        continue
                    nudge_at = 0
                    self._free_a_child()
                    continue
                # Between reads, always wait_readable (a checkpoint): a backend that keeps
                # the socket full must not hold the event loop, or its deadline, off.
                await trio.lowlevel.wait_readable(sock)
        except (trio.ClosedResourceError, OSError) as exc:
            if conn.expired:
                allowed = deadline - started
                raise ReadTimeout(
                    self._name, f"no complete response within {allowed:.3g}s"
                ) from None
            raise ConnectionLost(self._name, f"connection broke while reading: {exc}") from exc
        finally:
            self._pool.disarm(conn)

    def _free_a_child(self) -> None:
        """Close the longest-idle connection another running pool keeps to this address.

        A new connection that php-fpm does not take up may be waiting in its listen queue
        behind children held by other pools' idle connections: letting one go frees its
        child for the new one, sooner than that pool's idle timeout would.
        """
        for other in _RUNNING.get(self.address, ()):
            if other is not self and other._pool.close_oldest_idle():
                return

    async def _connect(self) -> FastCGIConnection:
        address = self.address
        with trio.move_on_after(none_inf(self.timeouts.connect)) as scope:
            try:
                if address.is_unix:
                    stream = await trio.open_unix_socket(address.path)
                else:
                    stream = await trio.open_tcp_stream(address.host, address.port)
            except OSError as exc:
                raise connect_error(self._name, exc) from exc
        if scope.cancelled_caught:
            raise ConnectTimeout(self._name, f"not connected within {self.timeouts.connect}s")
        # trio connected it (happy eyeballs, TCP_NODELAY); the exchange uses the socket itself.
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        if address.is_unix:
            _check_connected(sock, self._name)
        return FastCGIConnection(sock, self.response_limits, trio.current_time())


def _check_connected(sock: socket.socket, name: str) -> None:
    """Raise ConnectError if a unix socket trio reported connected is not.

    A unix socket whose listen queue is full (every php-fpm child busy, ``listen.backlog``
    reached) refuses connect() with EAGAIN, which trio takes for "in progress" and then
    reports as connected.  The request would go nowhere, a lost connection spending an
    attempt of a job php never saw; TCP says so as a connect failure, and so does this.
    """
    try:
        sock.getpeername()
    except OSError as exc:
        sock.close()
        if exc.errno != errno.ENOTCONN:
            raise ConnectError(name, f"cannot connect: {os.strerror(exc.errno or 0)}") from exc
        raise ConnectError(
            name, "cannot connect: its listen queue is full (every worker busy)"
        ) from None
