"""A small trio Redis client on hiredis: pipelining, a capped pool, reconnect, deadlines.

redis-py has no trio support, so the Redis store talks through this.  hiredis does the RESP
work in C both ways (``pack_command`` and ``Reader``); the pool is the same bookkeeping as the
FastCGI pool (``fastcgi.pooling``).  Every call has a deadline; a connection that timed out or
broke is closed, never reused.  Connecting retries with backoff until the call's deadline, so a
Redis restart costs the calls made during it an error, and the ones after it nothing; a cluster
router turns that off and retries itself, asking the cluster first where the slot went.
"""

from __future__ import annotations

import hashlib
import logging
import socket as stdlib_socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import trio

from adapters.storage.errors import StoreError, StoreRefused, StoreUnavailable, StoreUncertain
from fastcgi.errors import BackendError
from fastcgi.pooling import (
    Pool,
    PooledStream,
    PoolLimits,
    PoolStatistics,
    os_reason,
    send_all,
    tls_reason,
)

log = logging.getLogger("busgate.redis")

Arg = bytes | str | int | float
Command = Sequence[Arg]

_RECEIVE_SIZE = 64 * 1024
_BACKOFF_START = 0.05
_BACKOFF_MAX = 1.0
#: How long one connection attempt (TCP, TLS, login) and one call (connecting included) may
#: take, unless the store URL says otherwise (``?connect_timeout=…&timeout=…``).
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_COMMAND_TIMEOUT = 10.0
#: How long a push waits for replicas to confirm it (``WAIT``) when the store URL asks for
#: some (``?replicas=N``) and gives no ``replica_timeout``.  A replica that keeps up confirms
#: within a round trip (WAIT asks it at once); a second rides out a hiccup (a replica's fsync
#: stall, a retransmit) without making every push wait the whole call ``timeout`` when one
#: is down.
DEFAULT_REPLICA_TIMEOUT = 1.0


class ServerError(StoreError):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``, ``-MOVED ...``)."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class RedisConnection(PooledStream):
    """One connection to Redis and its reply parser.

    Over plain TCP a call talks to the socket itself (``sock``), as the FastCGI pool does: the
    commands are one ``send()``, and the wait for the replies one ``wait_readable`` before
    each read.  Through trio's ``SocketStream`` the same call took two more trips through the
    scheduler, a ``recv()`` that failed before the wait, and four context managers: a push
    of 24 jobs went from 888,600 to 825,500 instructions (callgrind), and every reserve and
    ack is a call too.  ``stream`` is the same socket as a trio stream (or the TLS stream,
    when ``sock`` is None), for the subscription, which reads as messages come.
    """

    __slots__ = ("reader", "sock", "stream")

    def __init__(
        self,
        stream: trio.abc.Stream,
        socket: trio.socket.SocketType,
        now: float,
        sock: stdlib_socket.socket | None = None,
    ) -> None:
        super().__init__(socket, now)
        self.stream = stream
        self.sock = sock
        # hiredis builds error replies as ServerError itself, at any depth of a reply: no
        # pass over every reply to convert them afterwards.
        self.reader = hiredis.Reader(replyError=ServerError)

    def reusable(self) -> bool:
        # A reply no command asked for (a server or proxy that sent one twice) would be read
        # as the answer to the next call on this connection, and every call after would be
        # one behind.  The socket's own leftovers the pool sees before reuse; these are read.
        return not self.reader.has_data()

    async def roundtrip(self, payload: bytes, count: int) -> list[Any]:
        sock = self.sock
        if sock is None:
            return await self._roundtrip_stream(payload, count)
        # Nothing goes to Redis from a call already cancelled (out of time): it would run the
        # commands for nobody.  An idle connection from the pool came without a checkpoint.
        await trio.lowlevel.checkpoint_if_cancelled()
        await send_all(sock, payload, _no_deadline_to_start)
        replies: list[Any] = []
        reader = self.reader
        while len(replies) < count:
            reply = reader.gets()
            if reply is not False:
                replies.append(reply)
                continue
            # Wait before reading (a checkpoint too): the replies are seldom there yet.
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(_RECEIVE_SIZE)
            except BlockingIOError:
                continue
            if not data:
                raise trio.BrokenResourceError("Redis closed the connection")
            reader.feed(data)
        return replies

    async def _roundtrip_stream(self, payload: bytes, count: int) -> list[Any]:
        await self.stream.send_all(payload)
        replies: list[Any] = []
        reader = self.reader
        while len(replies) < count:
            reply = reader.gets()
            if reply is False:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    raise trio.BrokenResourceError("Redis closed the connection")
                reader.feed(bytes(data))
                continue
            replies.append(reply)
        return replies


def _no_deadline_to_start() -> None:
    """``send_all``'s hook before it waits: the call's deadline already runs."""


def pack(command: Command) -> bytes:
    # hiredis's stub types the argument as a 1-tuple; any tuple of arguments is accepted.
    packed: bytes = hiredis.pack_command(tuple(command))  # type: ignore[arg-type]
    return packed


class Script:
    """A Lua script: sent as EVAL to a server that has not run it yet, then by SHA (EVALSHA)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def tls_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """What a ``rediss://`` connection checks and shows: the server's certificate against
    ``ca_file``'s CAs (the system's without one), and ``cert_file`` (its key in ``key_file``,
    or in the same file) to a Redis that asks for a client's (``tls-auth-clients``).

    Raises ``OSError`` (``ssl.SSLError`` is one) for a file that cannot be used, and
    ``ValueError`` for an encrypted key: there is no terminal to ask a passphrase on.
    """
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    return context


def _no_passphrase() -> str:
    raise ValueError("the key is encrypted; busgate needs it unencrypted (readable only by it)")


class RedisClient:
    """Connections to one Redis server."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        tls: bool | ssl.SSLContext = False,
        max_connections: int = 32,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        idle_timeout: float = 60.0,
    ) -> None:
        """``tls``: True checks the server's certificate against the system's CAs; a context
        (``tls_context``) says what else to trust or show.  One context serves every client
        of a store, so a cluster's nodes do not each read the files."""
        self.address = address
        self.name = f"{'rediss' if tls else 'redis'}://{address}"  # the scheme configured
        self.username = username
        self.password = password
        self.db = db
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._ssl = tls_context() if tls is True else tls or None
        #: CLIENT SETNAME was refused once (said once, then no more).
        self._unnamed = False
        self._pool: Pool[RedisConnection] = Pool(
            self.name,
            self._connect,
            limits=PoolLimits(max_connections=max_connections, idle_timeout=idle_timeout),
        )
        #: Calls that hold their connection for long (``lingers``): at most half the pool.
        self._lingering = trio.CapacityLimiter(max(1, max_connections // 2))
        #: SHA1s of the scripts this server has run for us: sent by SHA from then on, and as
        #: source before (``redis_routing._eval_on``).
        self.scripts: set[str] = set()

    def statistics(self) -> PoolStatistics:
        return self._pool.statistics()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._pool.run(task_status=task_status)

    async def aclose(self) -> None:
        await self._pool.aclose()

    # -- commands -----------------------------------------------------------------------------

    async def execute(self, *args: Arg) -> Any:
        """One command; an error reply is raised as ``ServerError``."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, ServerError):
            raise reply
        return reply

    async def pipeline(
        self,
        commands: Sequence[Command],
        *,
        deadline: float | None = None,
        reconnect: bool = True,
        lingers: bool = False,
    ) -> list[Any]:
        """Send commands in one write and read their replies; error replies are returned.

        Raises ``StoreUnavailable`` when Redis cannot be reached or does not answer in time:
        ``StoreUncertain`` once the commands may have reached it, so that only a plain
        ``StoreUnavailable`` may be retried.  ``deadline`` (trio time) replaces the command
        timeout for a call that spans several attempts (a cluster router's).  Unless
        ``reconnect``, a failed connect is raised at once rather than retried until the
        deadline: on a cluster, retrying a dead master would only wait for nothing.
        ``lingers``: the commands may hold the connection for long (a ``WAIT`` for replicas
        that are down runs to its timeout); at most half the pool's connections do at once.
        """
        if lingers:
            return await self._pipeline_lingering(commands, deadline, reconnect)
        payload = b"".join([pack(command) for command in commands])
        limit = self.command_timeout
        if deadline is None:
            deadline = trio.current_time() + limit
        pool = self._pool
        pool.requests_total += 1
        sent = False
        with trio.CancelScope(deadline=deadline):
            conn = await self._acquire(deadline, reconnect)
            sent = True  # from here on, Redis may have the commands (and may run them)
            try:
                replies = await conn.roundtrip(payload, len(commands))
            except BaseException as exc:
                pool.discard(conn)
                if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
                    pool.failures_total += 1
                    raise StoreUncertain(f"{self.name}: connection lost: {_reason(exc)}") from exc
                if isinstance(exc, hiredis.ProtocolError):
                    # The commands went out: Redis may have run them, whatever came back.
                    pool.failures_total += 1
                    raise StoreUncertain(f"{self.name}: protocol error: {exc}") from exc
                raise
            pool.release(conn)
            return replies
        pool.failures_total += 1
        pool.timeouts_total += 1
        lost = StoreUncertain if sent else StoreUnavailable
        raise lost(f"{self.name}: no answer within {limit:g}s")

    async def _pipeline_lingering(
        self, commands: Sequence[Command], deadline: float | None, reconnect: bool
    ) -> list[Any]:
        # Pushes of forty queues, each waiting out a WAIT while a replica was down, held every
        # connection: reserves, outcomes and the readiness check queued behind them, and
        # deliveries on every topic fell to a few a second.  Now only such calls wait.
        if deadline is None:
            deadline = trio.current_time() + self.command_timeout
        # Only the wait for a turn is bounded here: once sent, the call's own deadline
        # says whether the commands may have run (StoreUncertain), not this.
        with trio.move_on_at(deadline) as waiting:
            await self._lingering.acquire()  # cancelled only while it has not acquired
        if waiting.cancelled_caught:
            self._pool.failures_total += 1
            self._pool.timeouts_total += 1
            raise StoreUnavailable(
                f"{self.name}: no connection free within {self.command_timeout:g}s: as many"
                f" calls as may ({self._lingering.total_tokens}) wait for replicas (WAIT)"
            )
        try:
            return await self.pipeline(commands, deadline=deadline, reconnect=reconnect)
        finally:
            self._lingering.release()

    # -- connections --------------------------------------------------------------------------

    async def _acquire(self, deadline: float, reconnect: bool) -> RedisConnection:
        """A connection; if ``reconnect``, retrying the connect with backoff until ``deadline``."""
        delay = _BACKOFF_START
        while True:
            try:
                return await self._pool.acquire()
            except StoreRefused:
                raise
            except (StoreUnavailable, BackendError) as exc:
                if not reconnect or trio.current_time() + delay >= deadline:
                    raise StoreUnavailable(str(exc)) from exc
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    async def connect_dedicated(self) -> RedisConnection:
        """A connection outside the pool (a subscription); the caller closes it."""
        return await self._connect()

    async def _connect(self) -> RedisConnection:
        address = self.address
        with trio.move_on_after(self.connect_timeout):
            try:
                tcp = await trio.open_tcp_stream(address.host, address.port)
            except OSError as exc:
                raise StoreUnavailable(f"{self.name}: cannot connect: {os_reason(exc)}") from exc
            if self._ssl is not None:
                tls = trio.SSLStream(tcp, self._ssl, server_hostname=address.host)
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    tcp.socket.close()
                    raise StoreUnavailable(
                        f"{self.name}: TLS handshake failed: {tls_reason(exc)}{_tls_hint(exc)}"
                    ) from exc
                except BaseException:  # out of time (connect_timeout), or cancelled
                    tcp.socket.close()
                    raise
                conn = RedisConnection(tls, tcp.socket, trio.current_time())
            else:
                # trio connected it (TCP_NODELAY); calls use the socket itself.
                sock = stdlib_socket.socket(fileno=tcp.socket.detach())
                sock.setblocking(False)
                wrapped = trio.socket.from_stdlib_socket(sock)
                stream = trio.SocketStream(wrapped)
                conn = RedisConnection(stream, wrapped, trio.current_time(), sock)
            try:
                await self._handshake(conn)
            except BaseException:
                conn.close()
                raise
            return conn
        raise StoreUnavailable(f"{self.name}: not connected within {self.connect_timeout:g}s")

    async def _handshake(self, conn: RedisConnection) -> None:
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            if self.username:
                commands.append(("AUTH", self.username, self.password))
            else:
                commands.append(("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        commands.append(("CLIENT", "SETNAME", "busgate"))
        payload = b"".join(pack(c) for c in commands)
        try:
            replies = await conn.roundtrip(payload, len(commands))
        except (trio.BrokenResourceError, OSError) as exc:
            hint = _tls_hint(exc)
            if not hint and self._ssl is not None and _was_reset(exc):
                # Redis's alert and its reset race our login: the reset may come first.
                hint = " (does Redis ask for a client certificate? name it with ?cert_file=…)"
            raise StoreUnavailable(
                f"{self.name}: connection lost during login: {_reason(exc)}{hint}"
            ) from exc
        except hiredis.ProtocolError as exc:  # the URL names something else: an HTTP port
            raise StoreRefused(
                f"{self.name}: the server does not speak the Redis protocol ({exc});"
                " is this the address of a Redis server?"
            ) from exc
        for command, reply in zip(commands, replies, strict=True):
            if not isinstance(reply, ServerError):
                continue
            if command[0] == "CLIENT":
                # The name only labels our connections in CLIENT LIST: a Redis that renamed
                # CLIENT away, or a user not granted it (-NOPERM), serves the store all the
                # same.  Said once: every connection would say it again.
                if not self._unnamed:
                    self._unnamed = True
                    log.info("%s: connections go unnamed: CLIENT SETNAME: %s", self.name, reply)
                continue
            raise StoreRefused(f"{self.name}: {command[0]!s} failed: {reply}")


def _reason(exc: BaseException) -> str:
    """What broke a connection: over TLS, trio's BrokenResourceError says nothing itself, the
    ``ssl.SSLError`` it was raised from does (a Redis that wants a client certificate sends
    its alert after the handshake, at the first read)."""
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return tls_reason(exc)
    return str(exc) or type(exc).__name__


def _was_reset(exc: BaseException) -> bool:
    return any(isinstance(e, ConnectionResetError) for e in (exc, exc.__cause__, exc.__context__))


def _tls_hint(exc: BaseException) -> str:
    """Which store URL option mends a refused certificate, either way."""
    cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return " (a private CA is named with ?ca_file=…)"
    if isinstance(cause, ssl.SSLError) and "CERTIFICATE_REQUIRED" in (cause.reason or ""):
        return " (Redis asks for a client certificate: name it with ?cert_file=…&key_file=…)"
    return ""
