"""The producer server: the Redis protocol on ``listen.resp``.

Each connection reads what the client sent, runs every complete command in order, and
writes all their replies in one send, so a pipelining client (``redis-benchmark -P 16``)
costs one write per batch.  A malformed stream closes that connection only; an oversized
argument is skipped without being buffered and answered with an error, keeping the
connection usable.  An idle connection is closed quietly: writing an unasked-for error into
a pooled client connection would be read as the answer to its next command.

A connection reads and writes its socket directly rather than through a trio stream: a reply
fits the socket buffer, so it is one ``send()``, and a read is one ``recv()`` once the socket
is reported readable.  That is what unpipelined traffic pays per command: a bare trio server
replying through ``SocketStream`` reached 0.62x of redis-server at ``-P 1`` here, and 0.99x on
the socket (``bench.daemon ingest`` measures that server in every run).  Readability comes
from one edge-triggered epoll for all connections (``fastcgi.readiness``), not from trio's
``wait_readable``, which re-arms the socket with an ``epoll_ctl`` call on every wait: 4-6%
less gateway CPU per unpipelined push.  For the same reason the
idle deadline is not a cancel-scope deadline moved on every command: a connection notes when
it started to wait, and one sweeper task per server cancels those that have waited too long.
Replies are written without waiting (``_Connection.write``): what the socket does not take
at once is sent by a task of its own while the connection goes on reading, as Redis does, so
a client that writes a whole pipeline before reading a reply does not deadlock with us.

A push is acknowledged only once the store has it, and the pushes of many connections share
one store call (``ProducerService.submit``).  A connection whose read held only pushes does
not wait for that call: it goes back to reading, and the task making the call sends the
reply straight into its socket.  Each unpipelined push then wakes its connection's task once
rather than twice, which took ``redis-benchmark -t lpush -P 1`` from 13.1-14.7k to
21.5-29.4k pushes/s against the Redis store here (three interleaved runs of each; gateway CPU
per push from about 62 to 35-45 us), and ``-P 16`` from 43-47k to 58-63k.  Whatever
the producer sends next waits for that reply (``_Connection.settle``), so replies stay in
order.

Most pushes do not wake their connection's task at all.  While it waits for commands, what
arrives on its socket is read by the readiness task itself, which calls ``_take`` in place
of waking it (a ``Readiness`` handler).  A read of pushes only, to one queue, is checked
there and handed to the next store call for that queue (``ProducerService.submit_nowait``);
the task stays parked, and the reply is sent by the task making the call, as above.  If no
call is under way, the connection's task is woken to make it at once, and the pushes taken
in the same wake-up join it instead of waiting for the call after.  Anything else (another
command, a protocol error, the end of the stream, a read while a reply is still owed or the
output is over its limit, a read that filled the buffer) is handed to the task as read, and
it carries on as if it had read it.  So fifty producers pushing one job each cost one step
of the readiness task, the steps of the task making the store call, and one store call,
rather than fifty task steps and two or three store calls.  Measured with callgrind on the
ingest path in one process (this server, ``ProducerService``, the Redis store on a real
redis-server, fifty lockstep producers in the same process; repeatable to 0.3%): 178,500
instructions per unpipelined push instead of 213,100, of which the producers and a trio
server that only replies take 98,800.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from fastcgi.readiness import Readiness
from gateway import resp
from gateway.config import Listen, ProducerLimits
from gateway.http_server import open_listeners, serve_listeners
from gateway.producer import FLUSH_GRACE, Directory, PayloadTooLarge, ProducerService
from gateway.resp_fast import FastRequestParser
from gateway.resp_session import Peer, PendingPush, RespSession

log = logging.getLogger("busgate.resp")

_RECEIVE_SIZE = 64 * 1024
#: A reply the client does not read within this long ends the connection.
SEND_TIMEOUT = 30.0
#: Replies a connection may hold unsent while it goes on reading.  A client that writes a
#: whole pipeline before it reads a reply (redis-py's and phpredis's pipelines do) fills the
#: socket buffers both ways: were reading to wait for the replies to go out, the two ends
#: would wait on each other.  Redis keeps reading too.  Past this much (a million or so push
#: replies), reading waits, and a client that still does not read is dropped at SEND_TIMEOUT.
OUTPUT_LIMIT = 4 * 1024 * 1024
#: Bulk arguments (payloads) at most this much over the largest max_payload are parsed and
#: answered by the payload check; beyond it the parser discards them without buffering.
_PARSER_SLACK = 1024
#: Error codes counted apart in INFO's errorstats at most, as in Redis (ERRORSTATS_LIMIT).
MAX_ERROR_CODES = 128
#: After a protocol error, how long the rest of what the client sends is read and dropped
#: (``_Connection.linger``) before the socket closes: in all, and since its last bytes.
LINGER_TIME = 30.0
LINGER_QUIET = 2.0


@dataclass(frozen=True, slots=True)
class RespStatistics:
    address: str
    connections: int
    connections_total: int
    rejected_total: int  # refused at max_connections
    #: Commands run, as Redis counts total_commands_processed: not those refused before they
    #: run (unknown, the wrong number of arguments, an argument over the size limit) nor
    #: those queued by MULTI and never run.
    commands_total: int
    errors_total: int  # error replies, those inside EXEC's and the protocol errors' included
    protocol_errors_total: int  # connections closed for malformed input
    idle_closed_total: int


#: What the parser hands over: a command, or one refused for its size.
Parsed = resp.Command | resp.OversizedCommand

#: The commands that run together when pipelined: those the command table prepares.
_PUSHES = frozenset(name for name, spec in RespSession.commands.items() if spec.prepare)


def _next_group(events: list[Parsed]) -> list[Parsed]:
    """The next run of push commands (stored together), or the next single command."""
    run = 0
    while run < len(events) and events[run].name in _PUSHES:
        run += 1
    return events[: run or 1]


#: One read's commands, and the protocol error that came after them, if any.
_Read = tuple[list[Parsed], resp.RESPProtocolError | None]
#: The read that found the producer's end closed.
_ENDED: _Read = ([], None)
#: What is left to do for a connection's pushes in a task that may wait: the store call
#: (``RespSession.commit_nowait``).
_Left = Callable[[], Awaitable[None]]


def _only_pushes(read: _Read, parser: FastRequestParser) -> bool:
    """Whether a read holds pushes only, with nothing after them to answer: the usual case,
    a producer waiting for the reply to its one command."""
    events, broken = read
    if broken is not None or not events or parser.buffered:
        return False
    if len(events) == 1:  # the usual read
        return events[0].name in _PUSHES
    return all(event.name in _PUSHES for event in events)


@dataclass(slots=True)
class _Handed:
    """What the readiness handler (``RespServer._take``) leaves a connection's task when it
    wakes it: a read it did not answer, or the store call the pushes it took need, or what
    went wrong (the task ends the connection with it, as if its own)."""

    read: _Read | None = None
    left: _Left | None = None
    failure: Exception | None = None


_IDLE = "waiting for a command"
_SENDING = "sending replies"
#: The sweeper looks this often at most, and at least four times per timeout.
_SWEEP_INTERVAL = 1.0
#: How often a drain looks for connections still busy.
_DRAIN_POLL = 0.01


class _Connection:
    """One producer's socket, and what it waits for now (``RespServer._sweep`` reads that).

    ``waiting_for`` is set only while the task is parked on the socket; ``timed_out`` is what
    it was waiting for when the sweeper cancelled ``scope``.
    """

    __slots__ = (
        "_flushed",
        "_flushing",
        "_nursery",
        "_readiness",
        "_settled",
        "_unsent",
        "directory",
        "handed",
        "maybe_more",
        "now",
        "owed",
        "parser",
        "reading",
        "scope",
        "session",
        "since",
        "sock",
        "timed_out",
        "unsent_bytes",
        "waiting_for",
    )

    def __init__(self, sock: socket.socket, nursery: trio.Nursery, readiness: Readiness) -> None:
        self.sock = sock
        self._readiness = readiness
        self.parser = FastRequestParser(resp.RequestParser())
        #: The configuration the parser's size limit is from: set at the first read, and again
        #: after a reload (``RespServer._read_now``).
        self.directory: Directory | None = None
        #: The task waits for commands: the readiness handler may read them (RespServer._take).
        self.reading = False
        #: What the readiness handler read or checked and left to the task, which it woke.
        self.handed: _Handed | None = None
        #: The last read filled the buffer: more may be waiting, with no new event to say so.
        self.maybe_more = False
        self.now = trio.lowlevel.current_clock().current_time  # what trio.current_time() reads
        self.scope = trio.CancelScope()
        self.waiting_for = ""
        self.since = 0.0
        self.timed_out = ""
        #: A reply is owed from another task (``answer``): nothing else may be sent before it.
        self.owed = False
        self._settled: trio.Event | None = None
        #: Replies written but not yet taken by the socket, in order, and their size.
        self._unsent: collections.deque[bytes | memoryview] = collections.deque()
        self.unsent_bytes = 0
        self._flushing = False  # a task of its own is sending them (_flush)
        self._flushed: trio.Event | None = None  # set when they are all sent
        self._nursery = nursery  # where that task runs
        self.session: RespSession | None = None  # set once the server has made it

    async def receive(self) -> bytes:
        """What the producer sent next; ``b""`` once it has closed its end."""
        self.waiting_for, self.since = _IDLE, self.now()
        while True:
            await self.wait_readable()
            data = self.recv_now()
            if data is not None:
                self.waiting_for = ""
                return data

    async def wait_readable(self) -> None:
        """Wait until a read may find something.

        It waits for the socket before reading: a producer that waits for each reply has
        nothing to read yet when we ask, and a ``recv()`` that fails costs as much as one that
        succeeds.  Only a read that filled the buffer is followed by another without waiting:
        the edge-triggered wait reports new data, not data left behind.
        """
        if self.maybe_more:
            self.maybe_more = False
            await trio.lowlevel.checkpoint()
        else:
            await self._readiness.wait_readable(self.sock.fileno())

    def recv_now(self) -> bytes | None:
        """What the producer sent, without waiting: None if nothing has arrived, ``b""`` once
        it has closed its end."""
        try:
            data = self.sock.recv(_RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"the producer's connection broke: {exc}") from exc
        self.maybe_more = len(data) == _RECEIVE_SIZE
        return data

    def write(self, data: bytes) -> None:
        """Send ``data`` after what is already written, without waiting.

        What the socket buffer does not take now is sent by a task of its own (``_flush``)
        while this connection goes on reading.  A broken connection is left to its own
        task, which finds out on its next read.
        """
        if not self._unsent:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return
            if sent == len(data):
                return
            self._unsent.append(memoryview(data)[sent:])
        else:
            self._unsent.append(data)
        self.unsent_bytes += len(self._unsent[-1])
        if not self._flushing:
            self._flushing = True
            try:
                self._nursery.start_soon(self._flush)
            except RuntimeError:  # the server has shut down: nobody is left to read it
                self._flushing = False
                self._unsent.clear()
                self.unsent_bytes = 0

    def answer(self, data: bytes) -> None:
        """Write the owed reply, from the task that stored the push."""
        self.write(data)
        self._settle()

    def answer_stored(self, replies: list[bytes]) -> None:
        """``answer`` the one push a read held (``RespServer._push``), counting an error."""
        if replies[0][0] == 45:  # "-"
            assert self.session is not None
            self.session.server.count_errors(replies)
        self.answer(replies[0])

    def reply_now(self, data: bytes) -> None:
        """Write the reply to pushes refused before the store: nothing is owed."""
        self.write(data)
        self.since = self.now()  # idle from this reply on, as from a stored push's

    async def flushed(self) -> None:
        """Wait until every reply written is sent; SEND_TIMEOUT ends a client that does not
        read (``_flush`` cancels this connection)."""
        if self._flushing:
            self._flushed = trio.Event()
            await self._flushed.wait()

    async def _flush(self) -> None:
        unsent = self._unsent
        try:
            while unsent:
                # The limit runs from the last progress: a slow reader is not a stuck one.
                with trio.move_on_after(SEND_TIMEOUT) as waited:
                    await trio.lowlevel.wait_writable(self.sock)
                if waited.cancelled_caught:
                    self.timed_out = _SENDING
                    self.scope.cancel()
                    return
                while unsent:
                    piece = unsent[0]
                    try:
                        sent = self.sock.send(piece)
                    except BlockingIOError:
                        break
                    self.unsent_bytes -= sent
                    if sent < len(piece):
                        unsent[0] = memoryview(piece)[sent:]
                        break
                    unsent.popleft()
        except (OSError, trio.ClosedResourceError):
            # The connection broke or was closed: its own task finds out on its next read.
            unsent.clear()
            self.unsent_bytes = 0
        finally:
            self._flushing = False
            if self._flushed is not None:
                self._flushed.set()
                self._flushed = None

    def _settle(self) -> None:
        self.owed = False
        self.since = self.now()  # an idle producer is idle from its last reply on
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    async def settle(self) -> None:
        """Wait until the owed reply is written (not necessarily sent): bounded by the store
        call's FLUSH_GRACE."""
        if self.owed:
            self._settled = trio.Event()
            await self._settled.wait()

    async def linger(self) -> None:
        """Close gently after a protocol error: send the replies written (the error last),
        end our side, and read and drop what the client still sends, until it stops.

        Closing a socket with unread bytes makes the kernel send a reset.  A client still
        writing a command we refused at its start (a count of arguments over the limit, with
        megabytes of them to follow) then has its write fail and never reads our error:
        redis-py reports only "Connection reset by peer".  Bounded by LINGER_QUIET without
        bytes from the client, and LINGER_TIME in all.
        """
        await self.flushed()
        try:
            self.sock.shutdown(socket.SHUT_WR)  # the client reads the error, then EOF
        except OSError:
            return
        with trio.move_on_after(LINGER_TIME):
            while True:
                with trio.move_on_after(LINGER_QUIET) as quiet:
                    data = await self.receive()
                if quiet.cancelled_caught or not data:
                    return

    def close(self) -> None:
        self._readiness.unregister(self.sock)
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


def _oversized(session: RespSession, event: resp.OversizedCommand) -> bytes:
    # Refused before its queue's limit is looked at: the limit named is the largest queue's.
    largest = event.limit - _PARSER_SLACK
    too_large = PayloadTooLarge(
        f"payload of {event.size} bytes exceeds max_payload of {largest} bytes"
        " (the largest of any queue)"
    )
    return session.refuse_unread(event.name, event.target, too_large)


class RespServer:
    def __init__(self, service: ProducerService, listen: Listen, limits: ProducerLimits) -> None:
        self.service = service
        self.listen = listen
        self.limits = limits
        self.address = ""
        self._client_ids = itertools.count(1)
        self._connections = 0
        self._connections_total = 0
        self._rejected = 0
        self._commands = 0
        self._errors = 0
        self._error_codes: collections.Counter[str] = collections.Counter()
        self._protocol_errors = 0
        self._idle_closed = 0
        self._live: set[_Connection] = set()
        self.started = 0.0  # trio time run() started at (INFO's uptime)
        self._nursery: trio.Nursery | None = None
        self._readiness: Readiness | None = None
        self._accepting = trio.CancelScope()

    def statistics(self) -> RespStatistics:
        return RespStatistics(
            address=self.address,
            connections=self._connections,
            connections_total=self._connections_total,
            rejected_total=self._rejected,
            commands_total=self._commands,
            errors_total=self._errors,
            protocol_errors_total=self._protocol_errors,
            idle_closed_total=self._idle_closed,
        )

    def peers(self) -> list[Peer]:
        """The connections open now, oldest first (CLIENT LIST)."""
        now = trio.current_time()
        peers = [_peer(conn, now) for conn in self._live if conn.session is not None]
        peers.sort(key=lambda peer: peer.session.client_id)
        return peers

    def peer(self, session: RespSession) -> Peer:
        """The connection ``session`` runs on (CLIENT INFO)."""
        for conn in self._live:
            if conn.session is session:
                return _peer(conn, trio.current_time())
        raise LookupError(f"no connection runs session {session.client_id}")

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``started`` reports the bound ``host:port``."""
        self.started = trio.current_time()
        listeners = await open_listeners("listen.resp", self.listen.host, self.listen.port)
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("producers: Redis protocol on %s", self.address)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._readiness = Readiness()
            nursery.start_soon(self._sweep)
            nursery.start_soon(self._readiness.run)
            await nursery.start(self._accept, listeners)
            task_status.started(self.address)

    async def _accept(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]],
    ) -> None:
        assert self._nursery is not None
        with self._accepting:
            # Connections run in the server's nursery, not this task's: closing the port
            # (drain) leaves them be.
            await serve_listeners(
                self._serve,
                listeners,
                setting="listen.resp",
                handler_nursery=self._nursery,
                task_status=task_status,
            )

    async def drain(self) -> None:
        """Close the port; return once no connection is running a command or owed a reply.

        A command arriving meanwhile runs, and a push is refused (the service is stopped).
        Replies for pushes the store has are sent before this returns, so a producer is not
        left to push again what was stored.  Bounded by a store call's FLUSH_GRACE, and by
        SEND_TIMEOUT for a client that does not read (the sweeper ends it).
        """
        self._accepting.cancel()
        with trio.move_on_after(FLUSH_GRACE + SEND_TIMEOUT):
            # Polled, and only here: an event would cost a check on every command's path.
            while any(  # noqa: ASYNC110
                conn.owed or conn.unsent_bytes or conn.waiting_for is not _IDLE
                for conn in self._live
            ):
                await trio.sleep(_DRAIN_POLL)

    async def _sweep(self) -> None:
        """Cancel connections idle past ``idle_timeout`` (a client that does not read its
        replies is ended by the task sending them, ``_Connection._flush``).

        A deadline is enforced up to a quarter of it (at most ``_SWEEP_INTERVAL``) late.
        """
        while True:
            idle_timeout = self.limits.idle_timeout
            await trio.sleep(min(_SWEEP_INTERVAL, idle_timeout / 4))
            now = trio.current_time()
            for conn in self._live:
                if conn.waiting_for is not _IDLE or conn.owed or conn.unsent_bytes:
                    continue  # busy, or owed or sending a reply: not idle, whatever it reads
                if now - conn.since >= idle_timeout:
                    conn.timed_out = _IDLE
                    conn.scope.cancel()

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self._connections >= self.limits.max_connections:
            self._rejected += 1
            with trio.move_on_after(1):
                await stream.send_all(resp.error("ERR max number of clients reached"))
            await stream.aclose()
            return
        self._connections += 1
        self._connections_total += 1
        # The exchange uses the socket itself (see the module docstring).
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        # run() serves only once it has these
        assert self._nursery is not None and self._readiness is not None
        conn = _Connection(sock, self._nursery, self._readiness)
        conn.session = RespSession(self.service, next(self._client_ids), self)
        self._live.add(conn)
        try:
            self._readiness.register(sock, functools.partial(self._take, conn))
            with conn.scope:
                await self._serve_commands(conn, conn.session)
                await conn.flushed()  # the last replies go out before the socket closes
            if conn.timed_out is _IDLE:
                self._idle_closed += 1
        except trio.BrokenResourceError:
            pass  # the producer went away; whatever was acknowledged is stored
        except Exception:  # a bug: this connection ends, the daemon serves on
            log.exception("a producer connection failed")
        finally:
            self._live.discard(conn)
            self._connections -= 1
            conn.close()

    async def _serve_commands(self, conn: _Connection, session: RespSession) -> None:
        parser = conn.parser
        while True:
            if conn.unsent_bytes > OUTPUT_LIMIT:
                await conn.flushed()  # the client reads nothing: stop reading too
            read = await self._next_read(conn, session)
            if conn.owed:  # the last push's reply goes first, even if the producer left
                await conn.settle()
            if read is _ENDED:
                return
            if _only_pushes(read, parser):
                # The connection goes back to reading while they are stored, and the reply
                # is sent by the task making the store call, rather than waking this task
                # up a second time to send it.
                left = self._push(conn, session, read[0])
                if left is not None:
                    await left()
                continue
            events, broken = read  # answer those before the error, then the error, then close
            max_pipeline = self.limits.max_pipeline
            replies: list[bytes] = []
            while events:
                group = _next_group(events)
                del events[: len(group)]
                replies += await self._run_group(session, group)
                if session.closing:
                    break
                if not events and broken is None and parser.buffered:
                    # Past max_pipeline: answer what we have, then parse the rest.
                    conn.write(b"".join(replies))
                    replies = []
                    try:
                        while (
                            len(events) < max_pipeline
                            and (event := parser.next_event()) is not None
                        ):
                            events.append(event)
                    except resp.RESPProtocolError as exc:
                        broken = exc
            if replies:
                conn.write(b"".join(replies))
            if session.closing:
                return
            if broken is not None:
                self._protocol_errors += 1
                error = resp.error(f"ERR {broken}")
                self.count_errors([error])  # an error reply too, as Redis counts it
                conn.write(error)
                log.info("closed a producer connection: %s", broken)
                await conn.linger()
                return

    async def _run_group(self, session: RespSession, group: list[Parsed]) -> list[bytes]:
        """Run one command, or a run of pushes: those are all checked first, then stored in
        one store call per queue, and answered in order."""
        if group[0].name not in _PUSHES:  # one command of another kind
            event = group[0]
            replies = [
                await session.execute(event.args)
                if isinstance(event, resp.Command)
                else _oversized(session, event)
            ]
        else:
            replies, pending, slots = _prepare(session, group)
            if pending:
                for index, reply in zip(slots, await session.commit(pending), strict=True):
                    replies[index] = reply
        self._count(group, replies)
        return replies

    async def _next_read(self, conn: _Connection, session: RespSession) -> _Read:
        """The commands the producer sends next (``_ENDED`` once it has closed its end).

        While this task waits, the readiness task may read them instead (``_take``): it
        wakes this task only for what it cannot finish, handed over in ``conn.handed``.
        """
        conn.waiting_for, conn.since = _IDLE, conn.now()
        while True:
            conn.reading = True
            try:
                await conn.wait_readable()
            finally:
                conn.reading = False
            handed, conn.handed = conn.handed, None
            if handed is None:
                if conn.unsent_bytes > OUTPUT_LIMIT:  # why the handler left it to us
                    await conn.flushed()
                read = self._read_now(conn)
                if read is None:
                    continue  # nothing arrived after all
            elif handed.failure is not None:
                raise handed.failure
            elif handed.left is not None:
                conn.waiting_for = ""
                await handed.left()  # first, and at once: other pushes may have joined it
                conn.waiting_for = _IDLE  # since: the reply reset it
                continue
            else:
                assert handed.read is not None
                read = handed.read
            conn.waiting_for = ""
            return read

    def _read_now(self, conn: _Connection) -> _Read | None:
        """Read and parse what the producer sent, without waiting; None if nothing arrived."""
        data = conn.recv_now()
        if data is None:
            return None
        if not data:
            return _ENDED
        directory = self.service.directory
        if conn.directory is not directory:  # the first read, or a reload since the last
            conn.directory = directory
            conn.parser.set_max_bulk_len(directory.max_payload + _PARSER_SLACK)
        parser = conn.parser
        parser.feed(data)
        events: list[Parsed] = []
        max_pipeline = self.limits.max_pipeline
        try:
            while len(events) < max_pipeline and (event := parser.next_event()) is not None:
                events.append(event)
        except resp.RESPProtocolError as exc:
            return events, exc
        return events, None

    def _take(self, conn: _Connection) -> bool:
        """Read what arrived on a connection whose task waits for commands, from the readiness
        task (``Readiness.register``); True if it is dealt with and the task goes on waiting.

        That is so for pushes only, once handed to the store call under way for their queue:
        under load nearly every read of every producer, taken without a task step of its own
        (see the module docstring).  Pushes that find no call under way, to one queue, are
        the start of the next one: this task is woken to make it, and the pushes the handler
        takes meanwhile join it.  Anything else is handed to the task, which it wakes to
        finish it; so is a read that filled the buffer, which may have left more with no
        event to come.
        """
        if not conn.reading or conn.owed or conn.unsent_bytes > OUTPUT_LIMIT:
            return False  # the task waits for something first, then reads itself
        assert conn.session is not None  # the server makes it before it registers the socket
        try:
            read = self._read_now(conn)
            if read is None:
                return True  # nothing arrived after all
            if read is not _ENDED and not read[0] and read[1] is None:
                conn.since = conn.now()  # part of a command: not idle, nothing to answer yet
                return not conn.maybe_more
            if read is _ENDED or not _only_pushes(read, conn.parser):
                conn.handed = _Handed(read=read)
                return False
            left = self._push(conn, conn.session, read[0])
        except Exception as exc:  # a broken connection, or a bug: this connection only
            conn.handed = _Handed(failure=exc)
            return False
        if left is not None:
            conn.handed = _Handed(left=left)
            return False
        return not conn.maybe_more

    def _push(self, conn: _Connection, session: RespSession, group: list[Parsed]) -> _Left | None:
        """Check a run of pushes and hand them to the next store call for their queue; their
        replies are sent once stored (``conn.answer``), from the task making it.  What is
        left to await at once, in this connection's task: that call, if none was under way
        (``RespSession.commit_nowait``)."""
        if len(group) == 1 and isinstance(push := group[0], resp.Command):
            # A producer waiting for each reply: one push per read.  Checked, counted and
            # answered without the lists and closure a run of them needs (``_prepare``).
            prepared = session.prepare(push.args)
            if isinstance(prepared, bytes):  # refused, or queued by MULTI
                self._count(group, [prepared])
                conn.reply_now(prepared)
                return None
            self._commands += 1  # its reply, if an error, is counted by answer_stored
            conn.owed = True
            return session.commit_nowait([prepared], conn.answer_stored)
        replies, pending, slots = _prepare(session, group)
        if not pending:  # every one refused: nothing to wait for
            self._count(group, replies)
            conn.reply_now(b"".join(replies))
            return None

        def deliver(stored: list[bytes]) -> None:
            for index, reply in zip(slots, stored, strict=True):
                replies[index] = reply
            self._count(group, replies)
            conn.answer(replies[0] if len(replies) == 1 else b"".join(replies))

        conn.owed = True
        return session.commit_nowait(pending, deliver)

    def _count(self, group: list[Parsed], replies: list[bytes]) -> None:
        self._commands += len(group)
        # An error reply starts with "-" (45).  A list's count, not a generator's sum: this
        # runs for every push, and is a third of the cost.
        if [reply[0] for reply in replies].count(45):
            self.count_errors(replies)

    def count_errors(self, replies: Iterable[bytes]) -> None:
        """Count the error replies among ``replies``: in all (INFO's total_error_replies) and
        by their code, the first word (``# Errorstats``).  The session calls it for the
        replies of the commands EXEC ran, which the server sees as one array."""
        codes = self._error_codes
        for reply in replies:
            if reply[:1] == b"-":
                self._errors += 1
                words = reply[1:].split(None, 1)
                code = words[0].decode("utf-8", "replace") if words else "ERR"
                # Codes are busgate's own, so few; Redis stops at 128 distinct ones too.
                if code in codes or len(codes) < MAX_ERROR_CODES:
                    codes[code] += 1

    def error_counts(self) -> dict[str, int]:
        """Error replies sent, by code (INFO's errorstats), in Redis's order: sorted."""
        return dict(sorted(self._error_codes.items()))

    def recount(self, *, run: int) -> None:
        """Correct the count ``_count`` made from a command's reply, which the session knows
        better: -1 run for a command answered without running (refused before it ran, or
        queued by MULTI); at EXEC, the commands it ran.

        Only the session sees those; it says so here, off the path of a push that runs, so
        that counting every command answered stays one addition per read.
        """
        self._commands += run


def _peer(conn: _Connection, now: float) -> Peer:
    assert conn.session is not None
    idle = now - conn.since if conn.waiting_for is _IDLE else 0.0  # else running a command
    return Peer(
        conn.session,
        _address(conn.sock, peer=True),
        _address(conn.sock, peer=False),
        age=int(now - conn.session.created),
        idle=int(idle),
    )


def _address(sock: socket.socket, *, peer: bool) -> str:
    """An end of a connection as Redis writes it: ``ip:port``, ``[ipv6]:port``; ``?:0`` once
    the socket no longer knows (the peer reset it)."""
    try:
        host, port = (sock.getpeername() if peer else sock.getsockname())[:2]
    except OSError:
        return "?:0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _prepare(
    session: RespSession, group: list[Parsed]
) -> tuple[list[bytes], list[PendingPush], list[int]]:
    """Check a run of pushes: the replies so far (errors for those refused), the pushes to
    store, and the index of each one's reply."""
    replies = [b""] * len(group)
    pending: list[PendingPush] = []
    slots: list[int] = []
    for index, event in enumerate(group):
        prepared = (
            session.prepare(event.args)
            if isinstance(event, resp.Command)
            else _oversized(session, event)
        )
        if isinstance(prepared, bytes):
            replies[index] = prepared
        else:
            pending.append(prepared)
            slots.append(index)
    return replies, pending, slots
