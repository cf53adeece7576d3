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
from dataclasses import dataclass

import trio

from gateway import resp
from gateway.config import Listen, ProducerLimits
from gateway.producer import ProducerService
from gateway.resp_session import RespSession

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
        parser = resp.RequestParser(max_bulk_len=self.service.directory.max_payload + _PARSER_SLACK)
        max_pipeline = self.limits.max_pipeline
        while True:
            with trio.move_on_after(self.limits.idle_timeout) as idle:
                data = await stream.receive_some(_RECEIVE_SIZE)
            if idle.cancelled_caught:
                self._idle_closed += 1
                return
            if not data:
                return
            parser.feed(data)
            replies: list[bytes] = []
            try:
                while (event := parser.next_event()) is not None:
                    if isinstance(event, resp.OversizedCommand):
                        reply = resp.error(
                            f"ERR payload of {event.size} bytes is over the limit of"
                            f" {event.limit} bytes"
                        )
                    else:
                        reply = await session.execute(event.args)
                    self._commands += 1
                    if reply[:1] == b"-":
                        self._errors += 1
                    replies.append(reply)
                    if session.closing:
                        break
                    if len(replies) >= max_pipeline:
                        await self._send(stream, replies)
                        replies = []
            except resp.RESPProtocolError as exc:
                self._protocol_errors += 1
                replies.append(resp.error(f"ERR {exc}"))
                await self._send(stream, replies)
                log.info("closed a producer connection: %s", exc)
                return
            if replies:
                await self._send(stream, replies)
            if session.closing:
                return

    @staticmethod
    async def _send(stream: trio.SocketStream, replies: list[bytes]) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            await stream.send_all(b"".join(replies))
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("the producer stopped reading its replies")
