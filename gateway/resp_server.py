"""The producer server: the Redis protocol on ``listen.resp``.

Each connection reads what the client sent, runs every complete command in order, and
writes all their replies in one send, so a pipelining client (``redis-benchmark -P 16``)
costs one write per batch.  A malformed stream closes that connection only; an oversized
argument is skipped without being buffered and answered with an error, keeping the
connection usable.  An idle connection is closed quietly: writing an unasked-for error into
a pooled client connection would be read as the answer to its next command.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import trio

from gateway import resp
from gateway.config import Listen, ProducerLimits
from gateway.producer import ProducerService
from gateway.resp_session import PendingPush, RespSession

log = logging.getLogger("busgate.resp")

_RECEIVE_SIZE = 64 * 1024
#: A reply the client does not read within this long ends the connection.
SEND_TIMEOUT = 30.0
#: Bulk arguments (payloads) at most this much over the largest max_payload are parsed and
#: answered by the payload check; beyond it the parser discards them without buffering.
_PARSER_SLACK = 1024


@dataclass(frozen=True, slots=True)
class RespStatistics:
    address: str
    connections: int
    connections_total: int
    rejected_total: int  # refused at max_connections
    commands_total: int
    errors_total: int  # error replies
    protocol_errors_total: int  # connections closed for malformed input
    idle_closed_total: int


#: The commands that run together when pipelined: those the command table prepares.
_PUSHES = frozenset(name for name, spec in RespSession.commands.items() if spec.prepare)


def _next_group(
    events: list[resp.Command | resp.OversizedCommand],
) -> list[resp.Command | resp.OversizedCommand]:
    """The next run of push commands (stored together), or the next single command."""
    run = 0
    while run < len(events) and events[run].name in _PUSHES:
        run += 1
    return events[: run or 1]


_IDLE = "waiting for a command"
_SENDING = "sending replies"


class _Timer:
    """The one cancel scope of a connection, its deadline set for what it waits for now.

    Moving one scope's deadline costs about half of entering and leaving a fresh scope
    (3.6 against 6.4 us for two), and unpipelined traffic pays it on every command.
    """

    __slots__ = ("scope", "waiting_for")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.waiting_for = ""

    def wait(self, what: str, seconds: float) -> None:
        self.waiting_for = what
        self.scope.deadline = trio.current_time() + seconds

    def stop(self) -> None:
        self.waiting_for = ""
        self.scope.deadline = math.inf


def _oversized(event: resp.OversizedCommand) -> bytes:
    return resp.error(f"ERR payload of {event.size} bytes is over the limit of {event.limit} bytes")


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
        self._protocol_errors = 0
        self._idle_closed = 0

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

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``started`` reports the bound ``host:port``."""
        listeners = await trio.open_tcp_listeners(self.listen.port, host=self.listen.host)
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("producers: Redis protocol on %s", self.address)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started(self.address)

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self._connections >= self.limits.max_connections:
            self._rejected += 1
            with trio.move_on_after(1):
                await stream.send_all(resp.error("ERR max number of clients reached"))
            await stream.aclose()
            return
        self._connections += 1
        self._connections_total += 1
        try:
            await self._converse(stream, RespSession(self.service, next(self._client_ids)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the producer went away; whatever was acknowledged is stored
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    async def _converse(self, stream: trio.SocketStream, session: RespSession) -> None:
        timer = _Timer()
        with timer.scope:
            await self._serve_commands(stream, session, timer)
        if timer.scope.cancelled_caught:
            if timer.waiting_for is _IDLE:
                self._idle_closed += 1
                return
            raise trio.BrokenResourceError("the producer stopped reading its replies")

    async def _serve_commands(
        self, stream: trio.SocketStream, session: RespSession, timer: _Timer
    ) -> None:
        parser = resp.RequestParser(max_bulk_len=self.service.directory.max_payload + _PARSER_SLACK)
        max_pipeline = self.limits.max_pipeline
        idle_timeout = self.limits.idle_timeout
        while True:
            timer.wait(_IDLE, idle_timeout)
            data = await stream.receive_some(_RECEIVE_SIZE)
            timer.stop()  # running commands: the store calls have deadlines of their own
            if not data:
                return
            parser.feed(data)
            events: list[resp.Command | resp.OversizedCommand] = []
            broken: resp.RESPProtocolError | None = None
            try:
                while len(events) < max_pipeline and (event := parser.next_event()) is not None:
                    events.append(event)
            except resp.RESPProtocolError as exc:
                broken = exc  # answer what came before it, then the error, then close
            replies: list[bytes] = []
            while events:
                group = _next_group(events)
                del events[: len(group)]
                replies += await self._run_group(session, group)
                if session.closing:
                    break
                if not events and broken is None and parser.buffered:
                    # Past max_pipeline: answer what we have, then parse the rest.
                    await self._send(stream, replies, timer)
                    timer.stop()
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
                await self._send(stream, replies, timer)
            if session.closing:
                return
            if broken is not None:
                self._protocol_errors += 1
                await self._send(stream, [resp.error(f"ERR {broken}")], timer)
                log.info("closed a producer connection: %s", broken)
                return

    async def _run_group(
        self, session: RespSession, group: list[resp.Command | resp.OversizedCommand]
    ) -> list[bytes]:
        """Run one command, or a run of pushes: those are all checked first, then stored in
        one store call per queue, and answered in order."""
        if group[0].name not in _PUSHES:  # one command of another kind
            event = group[0]
            replies = [
                await session.execute(event.args)
                if isinstance(event, resp.Command)
                else _oversized(event)
            ]
        else:
            replies = [b""] * len(group)
            pending: list[PendingPush] = []
            slots: list[int] = []
            for index, event in enumerate(group):
                prepared = (
                    session.prepare(event.args)
                    if isinstance(event, resp.Command)
                    else _oversized(event)
                )
                if isinstance(prepared, bytes):
                    replies[index] = prepared
                else:
                    pending.append(prepared)
                    slots.append(index)
            if pending:
                for index, reply in zip(slots, await session.commit(pending), strict=True):
                    replies[index] = reply
        self._commands += len(group)
        self._errors += sum(reply[:1] == b"-" for reply in replies)
        return replies

    @staticmethod
    async def _send(stream: trio.SocketStream, replies: list[bytes], timer: _Timer) -> None:
        timer.wait(_SENDING, SEND_TIMEOUT)
        await stream.send_all(b"".join(replies))
