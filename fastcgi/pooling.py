"""Connection-pool bookkeeping that does not depend on the protocol spoken on the connections.

The FastCGI pool (``fastcgi.pool``) and the HTTP delivery adapter both keep kept-alive
connections to one backend under a hard cap; this module is that part, once:

* at most ``max_connections`` open (connecting, in use or idle) — a FIFO semaphore hands out
  the right to hold one, so waiters are served in arrival order;
* idle connections are a stack (the warmest is reused), closed after ``idle_timeout``, after
  ``max_requests`` exchanges or ``max_age`` seconds;
* before reuse, a socket that became readable while idle (EOF from a restarted server, or
  stray bytes) is closed instead;
* bookkeeping is synchronous: a connection moves between idle stack, caller and closed with
  no ``await`` in between, so cancellation cannot leave it counted twice or lost;
* optionally, exchange deadlines (``arm``/``disarm``): ``run()`` closes the socket of an
  exchange that overran, which wakes its task with ``trio.ClosedResourceError``.  A cancel
  scope per exchange costs more than the whole exchange with a fast backend (about 6 µs to
  enter and leave); a dict entry per exchange and one timer for the pool cost next to nothing.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from fastcgi.errors import (
    BackendError,
    ConnectError,
    ConnectTimeout,
    OutOfDescriptors,
    PoolTimeout,
)


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = 8
    idle_timeout: float = 60.0
    max_requests: int | None = None  # exchanges per connection, then it is closed
    max_age: float | None = None  # seconds a connection may live, then it is closed

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")


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
    failures_total: int  # requests that ended in an exception
    timeouts_total: int


class PooledStream:
    """A pooled connection: its socket, and what the pool tracks about it.

    Subclasses add how they talk (a trio stream, or the socket itself) and the protocol
    state, and say, through ``reusable``, whether the exchange left the connection fit for
    another one.
    """

    __slots__ = (
        "_poller",
        "connect_time",
        "created_at",
        "expired",
        "idle_since",
        "requests",
        "socket",
    )

    def __init__(self, socket: trio.socket.SocketType, now: float) -> None:
        self.socket = socket
        self.connect_time = 0.0  # seconds connecting took (TCP, and TLS): about a round trip
        self.created_at = now
        self.idle_since = now
        self.requests = 0
        self.expired = False  # an armed deadline passed and run() closed the connection
        # Registered once: the check before every reuse is then a single poll(0) call.
        self._poller = select.poll()
        self._poller.register(socket.fileno(), select.POLLIN)

    def reusable(self) -> bool:
        """Called after a successful exchange: may this connection serve another?"""
        return True

    def close(self) -> None:
        # Closing the socket synchronously keeps the pool's bookkeeping free of awaits; a
        # TLS close_notify is not worth a round trip on a connection we are dropping.
        self.socket.close()

    def expire(self) -> None:
        """The exchange overran its deadline: close, so the task waiting on the socket wakes."""
        self.expired = True
        self.close()

    def has_unread_input(self) -> bool:
        """True if the idle socket has something to read: EOF from a closed server, or junk."""
        return bool(self._poller.poll(0))


#: How soon after a request went out on a reused connection its loss, before any byte of an
#: answer, reads as that connection having been closed while idle, and the request goes once
#: more on a new connection: this, plus two of the round trips connecting took (a distant
#: server).  A server's keep-alive close crossing the request answers it with a reset
#: within a round trip; a later loss is a backend that took the request and died working on
#: it (a killed worker), whose attempt ends there, spent: sent again, the job would run
#: twice as one attempt, and twice at every attempt on a backend it kills.
STALE_WINDOW = 0.1


def closed_while_idle(conn: PooledStream, answered: bool, sent_at: float) -> bool:
    """Whether a request lost on ``conn`` (sent at ``sent_at``, trio time) may go once more
    on a new connection: ``conn`` was reused, had answered nothing, and failed at once."""
    window = STALE_WINDOW + 2 * conn.connect_time
    return conn.requests > 1 and not answered and trio.current_time() - sent_at <= window


C = TypeVar("C", bound=PooledStream)


class Pool(Generic[C]):
    def __init__(
        self,
        name: str,
        connect: Callable[[], Awaitable[C]],
        *,
        limits: PoolLimits = PoolLimits(),
        pool_timeout: float | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.pool_timeout = pool_timeout
        self._connect = connect
        self._slots = trio.Semaphore(limits.max_connections)
        self._idle: list[C] = []
        self._in_use = 0
        self._closed = False
        self._wake = trio.Event()  # set when run() must look again before its deadline
        self._timer_at = math.inf  # when run() will look next
        self._deadlines: dict[C, float] = {}  # armed exchanges
        #: Whether ``run()`` is running, so that armed deadlines are enforced.  An attribute
        #: rather than a property: every request checks it.
        self.running = False
        # Without either limit no connection wears out: release and reuse skip the check.
        self._may_wear_out = limits.max_requests is not None or limits.max_age is not None
        #: trio's clock, read without the three calls behind trio.current_time(): the hot
        #: path reads it several times per exchange.  Bound to the run's clock by run().
        self.now: Callable[[], float] = trio.current_time
        self.opened_total = 0
        self.closed_total = 0
        self.requests_total = 0
        self.failures_total = 0
        self.timeouts_total = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            address=self.name,
            max_connections=self.limits.max_connections,
            open=len(self._idle) + self._in_use,
            idle=len(self._idle),
            in_use=self._in_use,
            waiting=self._slots.statistics().tasks_waiting,
            opened_total=self.opened_total,
            closed_total=self.closed_total,
            requests_total=self.requests_total,
            failures_total=self.failures_total,
            timeouts_total=self.timeouts_total,
        )

    async def acquire(self, deadline: float = math.inf, *, fresh: bool = False) -> C:
        """A connection for one exchange: an idle one if it is still good, else a new one
        (always a new one if ``fresh``).

        ``deadline`` (trio time) bounds the wait for a free slot and the connect, on top of
        the pool's own limits; only those slow paths pay for a cancel scope.
        """
        if self._closed:
            raise BackendError(self.name, "the connection pool is closed")
        try:
            # The common case, a free slot, skips the scheduler round trip of acquire().
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._wait_for_slot(deadline)
        try:
            conn = None if fresh else self._take_idle()
            if conn is None:
                connecting = trio.current_time()
                with trio.move_on_at(deadline):
                    conn = await self._connect()
                if conn is None:
                    raise ConnectTimeout(self.name, "not connected before the deadline")
                conn.connect_time = trio.current_time() - connecting
                self.opened_total += 1
        except BaseException:
            self._slots.release()
            raise
        self._in_use += 1
        conn.requests += 1
        return conn

    async def _wait_for_slot(self, deadline: float) -> None:
        timeout_at = trio.current_time() + none_inf(self.pool_timeout)
        with trio.move_on_at(min(timeout_at, deadline)) as scope:
            await self._slots.acquire()
        if scope.cancelled_caught:
            self.timeouts_total += 1
            raise PoolTimeout(
                self.name,
                f"no free connection within {self.pool_timeout}s"
                f" ({self.limits.max_connections} in use)"
                if timeout_at <= deadline
                else f"no free connection before the deadline ({self.limits.max_connections}"
                " in use)",
            )

    def release(self, conn: C) -> None:
        """Give back a connection after a successful exchange: to the idle stack, or closed."""
        self._in_use -= 1
        self._slots.release()
        now = self.now()
        if (
            self._closed
            or not conn.reusable()
            or (self._may_wear_out and self._worn_out(conn, now))
        ):
            self._close(conn)
            return
        conn.idle_since = now
        self._idle.append(conn)
        self._remind(now + self.limits.idle_timeout)

    def arm(self, conn: C, deadline: float) -> None:
        """Close ``conn`` (see ``PooledStream.expire``) if it is still armed at ``deadline``.

        Re-arming replaces the deadline.  Only ``run()`` enforces it: check ``running``.
        """
        self._deadlines[conn] = deadline
        self._remind(deadline)

    def _remind(self, at: float) -> None:
        """Have run() look at ``at`` if it would otherwise sleep past it."""
        if at < self._timer_at:
            self._timer_at = at
            self._wake.set()

    def disarm(self, conn: C) -> None:
        # The timer is left as it is: it wakes once at the stale deadline and finds nothing;
        # with a fixed timeout per pool that is one wake-up per timeout, not per exchange.
        self._deadlines.pop(conn, None)

    def discard(self, conn: C) -> None:
        """Close a connection whose exchange failed: unread bytes may still be on its way."""
        self._in_use -= 1
        self._slots.release()
        self._close(conn)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close idle connections as they expire and expire overdue exchanges, until closed."""
        if self.running:
            raise RuntimeError(f"{self.name}: the pool's run() is already running")
        self.running = True
        self.now = trio.lowlevel.current_clock().current_time
        try:
            task_status.started()
            while not self._closed:
                now = trio.current_time()
                idle_timeout = self.limits.idle_timeout
                keep = []
                for conn in self._idle:
                    if now - conn.idle_since >= idle_timeout:
                        self._close(conn)
                    else:
                        keep.append(conn)
                self._idle = keep
                for conn, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[conn]
                        conn.expire()
                self._timer_at = min(
                    min((c.idle_since + idle_timeout for c in keep), default=math.inf),
                    min(self._deadlines.values(), default=math.inf),
                )
                self._wake = trio.Event()
                with trio.move_on_at(self._timer_at):
                    await self._wake.wait()
        finally:
            self.running = False
            self.now = trio.current_time

    def close(self) -> None:
        """Close idle connections now; in-use ones are closed when their exchange ends."""
        self._closed = True
        while self._idle:
            self._close(self._idle.pop())
        self._wake.set()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close_oldest_idle(self) -> bool:
        """Close the connection idle the longest, if there is one: another pool to the same
        backend needs the worker it holds."""
        if not self._idle:
            return False
        self._close(self._idle.pop(0))  # the stack's bottom: reuse takes from the top
        return True

    def _take_idle(self) -> C | None:
        now = self.now()
        while self._idle:
            conn = self._idle.pop()
            expired = now - conn.idle_since >= self.limits.idle_timeout
            worn_out = self._may_wear_out and self._worn_out(conn, now)
            if expired or worn_out or conn.has_unread_input():
                self._close(conn)
                continue
            return conn
        return None

    def _worn_out(self, conn: C, now: float) -> bool:
        limits = self.limits
        return (limits.max_requests is not None and conn.requests >= limits.max_requests) or (
            limits.max_age is not None and now - conn.created_at >= limits.max_age
        )

    def _close(self, conn: C) -> None:
        conn.close()
        self.closed_total += 1


def os_reason(exc: BaseException) -> str:
    """The operating system's words for a failed connect ("Connection refused").

    trio's open_tcp_stream raises a summary ("all attempts to connect to ... failed") whose
    cause is a group of the per-address errors; those are what an operator needs.
    """
    code = os_errno(exc)
    return str(exc) if code is None else os.strerror(code)


def os_errno(exc: BaseException) -> int | None:
    """The errno behind ``exc`` (see ``os_reason``), if any."""
    pending: list[BaseException] = [exc]
    while pending:
        seen = pending.pop(0)
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        if isinstance(seen, BaseExceptionGroup):
            pending.extend(seen.exceptions)
        for linked in (seen.__cause__, seen.__context__):
            if linked is not None:
                pending.append(linked)
    return None


#: socket() failing for want of descriptors, the process's (EMFILE) or the system's.
_NO_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})


def connect_error(name: str, exc: OSError) -> ConnectError:
    """A failed connect as the error to raise: ``OutOfDescriptors`` when busgate itself
    could not open a socket, which is no failure of the backend's."""
    code = os_errno(exc)
    if code in _NO_DESCRIPTORS:
        return OutOfDescriptors(
            name,
            f"cannot connect: busgate is out of file descriptors ({os.strerror(code or 0)}):"
            " raise its open files limit (LimitNOFILE)",
        )
    return ConnectError(name, f"cannot connect: {os_reason(exc)}")


def tls_reason(exc: BaseException) -> str:
    """Why a TLS handshake failed, in OpenSSL's words: trio's BrokenResourceError says
    nothing itself, its cause (an ``ssl.SSLError``) does."""
    cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | trio.BrokenResourceError):
        return "the server closed the connection"
    if isinstance(cause, ssl.SSLError):
        # reason: "WRONG_VERSION_NUMBER" (an http:// server), "TLSV1_ALERT_PROTOCOL_VERSION"…
        return cause.reason.replace("_", " ").lower() if cause.reason else str(cause)
    return "the server closed the connection" if cause is None else os_reason(cause)


def none_inf(value: float | None) -> float:
    """A deadline length where None means no deadline."""
    return math.inf if value is None else value


async def send_all(
    sock: socket.socket, data: bytes | memoryview, before_waiting: Callable[[], None]
) -> None:
    """Send all of ``data`` on a non-blocking socket, waiting only if it does not fit.

    A request or reply that fits the socket buffer is one ``send()``, with no trip through
    the scheduler.  ``before_waiting`` runs once, before the first wait: where a caller
    starts its deadline.  ``OSError`` propagates for the caller to word.
    """
    view: bytes | memoryview = data
    waited = False
    while True:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            sent = 0
        if sent == len(view):
            return
        view = memoryview(view)[sent:]
        if not waited:
            before_waiting()
            waited = True
        await trio.lowlevel.wait_writable(sock)
