"""The Redis-protocol command table: one producer connection's commands, turned into replies.

``execute(args)`` takes a parsed command and returns the encoded reply; the server around
it owns the socket.  A push is two steps, ``prepare`` (checks, jobs built, nothing stored)
and ``commit`` (the store call), so that a pipelined run of pushes costs one store call per
queue rather than one per command.  Replies have the types clients expect (integers for
pushes, a bulk string id for XADD), one reply per command, and an acknowledgement only once
the store has the job.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

import trio

from adapters.delivery.headers import trace_id_of
from adapters.storage.errors import StoreError, store_error_text
from adapters.storage.jobs import NewJob, Priority, PushResult, check_job_id
from gateway import resp
from gateway.producer import (
    Directory,
    ProducerError,
    ProducerService,
    QueueEntry,
    WrongPassword,
    split_target,
)

SERVER_NAME = "busgate"
#: What INFO and HELLO report as redis_version: clients gate features on it.
COMPATIBLE_REDIS_VERSION = "7.2.0"

_XADD_TRIM = {b"MAXLEN", b"MINID"}

Handler = Callable[["RespSession", tuple[bytes, ...]], Awaitable[bytes]]
Preparer = Callable[["RespSession", tuple[bytes, ...]], "PendingPush"]

log = logging.getLogger("busgate.resp")

_CONFIG_VALUES = {b"save": b"", b"appendonly": b"no", b"databases": b"1"}


class CommandError(Exception):
    """A reply-level error for one command; the connection carries on."""

    def __init__(self, message: str, code: str = "ERR") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Spec:
    arity: int  # Redis convention: N exactly, -N at least N (command name included)
    handler: Handler | None = None  # what any command but a push runs
    prepare: Preparer | None = None  # a push: checks it and builds its jobs (see commit)


@dataclass(slots=True)
class PendingPush:
    """A push command checked and turned into jobs, not yet stored."""

    entry: QueueEntry
    jobs: list[NewJob]
    reply_id: bool  # XADD answers with the job id; the list commands with a count

    def reply(self, result: PushResult) -> bytes:
        return (
            resp.bulk_string(result.ids[0].encode())
            if self.reply_id
            else resp.integer(len(self.jobs))
        )


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(f"{what} must be UTF-8") from None


def _integer(value: bytes, what: str = "value") -> int:
    try:
        return int(value)
    except ValueError:
        raise CommandError(f"{what} is not an integer or out of range") from None


class RespSession:
    """The state of one producer connection: whom it is authenticated for, its name."""

    commands: ClassVar[dict[bytes, Spec]] = {}

    def __init__(self, service: ProducerService, client_id: int) -> None:
        self.service = service
        self.client_id = client_id
        #: The queues logged in to, with the password given (``ProducerService.resolve``).
        self.authenticated: dict[str, str] = {}
        # Push targets (b"queue" or b"queue/topic") found allowed, with the queue and topic
        # they name: a producer pushes to the same few again and again.  Valid for one
        # configuration; logins only ever add queues, so they never make one stale.
        self._targets: dict[bytes, tuple[QueueEntry, str | None]] = {}
        self._targets_of: Directory | None = None  # the configuration they were checked in
        self.name = b""
        self.protocol = 2  # HELLO 3 switches to RESP3
        self.closing = False  # set by QUIT: the server closes after sending the reply
        #: Commands queued since MULTI (None outside a transaction); any refused while
        #: queueing makes EXEC discard them all, as Redis does.
        self._queued: list[tuple[bytes, ...]] | None = None
        self._queue_refused = False

    async def execute(self, args: tuple[bytes, ...]) -> bytes:
        if self._queued is not None and args[0].upper() not in _TRANSACTION:
            return self._queue(args)
        spec = self._spec(args)
        if isinstance(spec, bytes):
            return spec
        if spec.prepare is not None:
            prepared = self._prepare(spec.prepare, args)
            return prepared if isinstance(prepared, bytes) else (await self.commit([prepared]))[0]
        assert spec.handler is not None
        try:
            return await spec.handler(self, args)
        except (CommandError, ProducerError) as exc:
            return resp.error(f"{exc.code} {exc}")
        except StoreError as exc:
            return _store_error(exc)
        except Exception as exc:  # a bug: answer it, log it, keep the daemon serving
            return _internal_error(exc, args)

    def prepare(self, args: tuple[bytes, ...]) -> PendingPush | bytes:
        """Check a push command and build its jobs, storing nothing; or its error reply.

        Pushes are split from their store call so that the server can take a pipelined run
        of them to the store in one call per queue (``commit``).
        """
        if self._queued is not None:
            return self._queue(args)
        spec = self._spec(args)
        if isinstance(spec, bytes):
            return spec
        if spec.prepare is None:
            raise TypeError(f"{args[0]!r} is not a push command")
        return self._prepare(spec.prepare, args)

    def _prepare(self, prepare: Preparer, args: tuple[bytes, ...]) -> PendingPush | bytes:
        try:
            return prepare(self, args)
        except (CommandError, ProducerError) as exc:
            return resp.error(f"{exc.code} {exc}")
        except Exception as exc:
            return _internal_error(exc, args)

    async def commit(self, pushes: list[PendingPush]) -> list[bytes]:
        """Store prepared pushes, one store call per queue; their replies, in order.

        Each reply is sent only after the store has the job; a failed store call answers
        every push it carried with an error, and pushes to other queues are unaffected.
        """
        replies: list[bytes] = [b""] * len(pushes)
        by_queue: dict[str, list[int]] = {}
        for index, push in enumerate(pushes):
            by_queue.setdefault(push.entry.config.name, []).append(index)

        async def store(indexes: list[int]) -> None:
            some = [pushes[i] for i in indexes]
            jobs = [job for push in some for job in push.jobs]
            try:
                outcome: PushResult | Exception = await self.service.push(some[0].entry, jobs)
            except Exception as exc:  # _replies words it
                outcome = exc
            for i, reply in zip(indexes, _replies(some, outcome), strict=True):
                replies[i] = reply

        if len(by_queue) == 1:
            await store(next(iter(by_queue.values())))
        else:
            async with trio.open_nursery() as nursery:
                for indexes in by_queue.values():
                    nursery.start_soon(store, indexes)
        return replies

    async def commit_then(
        self, pushes: list[PendingPush], deliver: Callable[[list[bytes]], None]
    ) -> None:
        """``commit``, handing the replies to ``deliver`` instead of returning them.

        It may return before they exist: a push that joins a store call another connection
        is making is answered from that connection's task (``ProducerService.submit``).
        ``deliver`` runs exactly once and must not raise.
        """
        entry = pushes[0].entry
        if any(push.entry is not entry for push in pushes):  # several queues: stored apart
            deliver(await self.commit(pushes))
            return
        jobs = pushes[0].jobs if len(pushes) == 1 else [j for p in pushes for j in p.jobs]

        def on_stored(outcome: PushResult | Exception) -> None:
            deliver(_replies(pushes, outcome))

        await self.service.submit(entry, jobs, on_stored)

    def _spec(self, args: tuple[bytes, ...]) -> Spec | bytes:
        """The command's table entry, or the error reply for an unknown command or a wrong
        number of arguments."""
        name = args[0].upper()
        spec = self.commands.get(name)
        if spec is None:
            shown = " ".join(f"'{a[:40].decode('utf-8', 'replace')}'" for a in args[1:4])
            return resp.error(
                f"ERR unknown command '{args[0][:40].decode('utf-8', 'replace')}',"
                f" with args beginning with: {shown}"
            )
        if (spec.arity >= 0 and len(args) != spec.arity) or len(args) < -spec.arity:
            return resp.error(
                f"ERR wrong number of arguments for '{name.decode().lower()}' command"
            )
        return spec

    # -- pushes -------------------------------------------------------------------------------

    def _resolve(self, target: bytes) -> tuple[QueueEntry, str | None]:
        """The queue and topic (if named) a push to ``target`` goes to, if it is allowed."""
        if self._targets_of is not self.service.directory:  # reloaded since
            self._targets.clear()
            self._targets_of = self.service.directory
        resolved = self._targets.get(target)
        if resolved is None:
            entry = self.service.resolve(_text(target, "queue name"), self.authenticated)
            resolved = self._targets[target] = (entry, split_target(target.decode())[1])
        return resolved

    def lpush(self, args: tuple[bytes, ...]) -> PendingPush:
        entry, topic = self._resolve(args[1])
        payloads = args[2:]
        self.service.check_sizes(entry, payloads)
        return PendingPush(entry, [NewJob(p, topic=topic) for p in payloads], reply_id=False)

    def zadd(self, args: tuple[bytes, ...]) -> PendingPush:
        rest = list(args[2:])
        while rest and rest[0].upper() in (b"NX", b"XX", b"GT", b"LT", b"CH"):
            rest.pop(0)  # every job is a new member: these flags change nothing
        if rest and rest[0].upper() == b"INCR":
            raise CommandError("INCR is not supported: ZADD schedules jobs")
        if not rest or len(rest) % 2:
            raise CommandError("syntax error")
        times = []
        for score in rest[0::2]:
            try:
                run_at = float(score)
            except ValueError:
                raise CommandError("value is not a valid float") from None
            if not math.isfinite(run_at):
                raise CommandError("the score (unix seconds to run at) must be finite")
            times.append(run_at)
        entry, topic = self._resolve(args[1])
        payloads = rest[1::2]
        self.service.check_sizes(entry, payloads)
        jobs = [NewJob(p, topic=topic, run_at=t) for t, p in zip(times, payloads, strict=True)]
        return PendingPush(entry, jobs, reply_id=False)

    def xadd(self, args: tuple[bytes, ...]) -> PendingPush:
        i = 2
        # Stream options some clients always send; a job stream has nothing to trim.
        while i < len(args):
            word = args[i].upper()
            if word == b"NOMKSTREAM":
                i += 1
            elif word in _XADD_TRIM:
                i += 1
                if i < len(args) and args[i] in (b"=", b"~"):
                    i += 1
                i += 1
                if i < len(args) and args[i].upper() == b"LIMIT":
                    i += 2
            else:
                break
        fields = args[i + 1 :]
        if i >= len(args) or not fields or len(fields) % 2:
            raise CommandError("wrong number of arguments for 'xadd' command")
        job_id = None
        if args[i] != b"*":
            try:
                job_id = check_job_id(_text(args[i], "job id"))
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        payload: bytes | None = None
        priority = Priority.NORMAL
        run_at: float | None = None
        trace_id: str | None = None
        attributes: dict[str, str] = {}
        for key, value in zip(fields[::2], fields[1::2], strict=True):
            name = _text(key, "field name").lower()
            if name == "payload":
                payload = value
            elif name == "delay":
                run_at = self.service.run_at(_integer(value, "delay"))
            elif name == "priority":
                try:
                    priority = Priority.parse(_text(value, "priority"))
                except ValueError as exc:
                    raise CommandError(str(exc)) from None
            elif name == "traceparent":
                trace_id = trace_id_of(_text(value, "traceparent"))
                if trace_id is None:
                    raise CommandError("traceparent is not a W3C trace context")
            else:
                attributes[_text(key, "field name")] = _text(value, f"attribute {name}")
        if payload is None:
            raise CommandError("XADD needs a 'payload' field")
        entry, topic = self._resolve(args[1])
        self.service.check_sizes(entry, [payload])
        job = NewJob(
            payload,
            id=job_id,
            topic=topic,
            priority=priority,
            run_at=run_at,
            attributes=attributes,
            trace_id=trace_id,
        )
        return PendingPush(entry, [job], reply_id=True)

    async def llen(self, args: tuple[bytes, ...]) -> bytes:
        entry, topic = self._resolve(args[1])
        topics = [topic] if topic is not None else list(entry.topics)
        return resp.integer(await self.service.store.depth(entry.config.name, topics))

    # -- connection ---------------------------------------------------------------------------

    async def auth(self, args: tuple[bytes, ...]) -> bytes:
        if len(args) == 2:
            password = _text(args[1], "password")
            opened = self.service.queues_opened_by(password)
            if not opened:
                raise WrongPassword("invalid username-password pair or user is disabled.")
            self.authenticated.update(dict.fromkeys(opened, password))
            return resp.OK
        if len(args) == 3 and args[1] == b"default":
            # Redis's name for "no user": clients send it with a password-only login.
            return await self.auth((b"AUTH", args[2]))
        if len(args) == 3:
            queue, password = _text(args[1], "queue name"), _text(args[2], "password")
            self.service.check_password(queue, password)
            self.authenticated[queue] = password
            return resp.OK
        raise CommandError("syntax error")

    async def hello(self, args: tuple[bytes, ...]) -> bytes:
        protocol = self.protocol
        i = 1
        if len(args) > 1:
            if not args[1].isdigit() or len(args[1]) > 3:
                raise CommandError("Protocol version is not an integer or out of range")
            protocol = int(args[1])
            if protocol not in (2, 3):
                raise CommandError("unsupported protocol version", code="NOPROTO")
            i = 2
        while i < len(args):
            option = args[i].upper()
            if option == b"AUTH" and i + 2 < len(args):
                await self.auth((b"AUTH", args[i + 1], args[i + 2]))
                i += 3
            elif option == b"SETNAME" and i + 1 < len(args):
                self.name = args[i + 1]
                i += 2
            else:
                shown = option.decode(errors="replace")
                raise CommandError(f"syntax error in HELLO option '{shown}'")
        self.protocol = protocol
        fields = [
            (b"server", resp.bulk_string(SERVER_NAME.encode())),
            (b"version", resp.bulk_string(COMPATIBLE_REDIS_VERSION.encode())),
            (b"proto", resp.integer(protocol)),
            (b"id", resp.integer(self.client_id)),
            (b"mode", resp.bulk_string(b"standalone")),
            (b"role", resp.bulk_string(b"master")),
            (b"modules", resp.array([])),
        ]
        return resp.mapping([(resp.bulk_string(k), v) for k, v in fields], protocol)

    async def ping(self, args: tuple[bytes, ...]) -> bytes:
        if len(args) > 2:
            raise CommandError("wrong number of arguments for 'ping' command")
        return resp.PONG if len(args) == 1 else resp.bulk_string(args[1])

    async def echo(self, args: tuple[bytes, ...]) -> bytes:
        return resp.bulk_string(args[1])

    # -- MULTI/EXEC ---------------------------------------------------------------------------
    # redis-py's pipeline() is a transaction by default.  The queued pushes are checked and
    # stored at EXEC, each queue's in one store call; EXEC answers once they are stored.

    def _queue(self, args: tuple[bytes, ...]) -> bytes:
        assert self._queued is not None
        spec = self._spec(args)
        if isinstance(spec, bytes):  # unknown, or the wrong number of arguments
            self._queue_refused = True
            return spec
        self._queued.append(args)
        return b"+QUEUED\r\n"

    def refuse(self, reply: bytes) -> bytes:
        """A command refused before it got here (an argument over the size limit, never
        buffered): inside MULTI it makes EXEC discard the transaction, as Redis does."""
        if self._queued is not None:
            self._queue_refused = True
        return reply

    async def multi(self, args: tuple[bytes, ...]) -> bytes:
        if self._queued is not None:
            raise CommandError("MULTI calls can not be nested")
        self._queued, self._queue_refused = [], False
        return resp.OK

    async def discard(self, args: tuple[bytes, ...]) -> bytes:
        if self._queued is None:
            raise CommandError("DISCARD without MULTI")
        self._queued = None
        return resp.OK

    async def exec(self, args: tuple[bytes, ...]) -> bytes:
        queued, self._queued = self._queued, None
        if queued is None:
            raise CommandError("EXEC without MULTI")
        if self._queue_refused:
            raise CommandError(
                "Transaction discarded because of previous errors.", code="EXECABORT"
            )
        replies: list[bytes] = []
        pending: list[PendingPush] = []
        slots: list[int] = []

        async def store() -> None:  # the pushes so far, before what comes after them
            for slot, reply in zip(slots, await self.commit(pending), strict=True):
                replies[slot] = reply
            pending.clear()
            slots.clear()

        for command in queued:
            spec = self.commands[command[0].upper()]
            if spec.prepare is None:
                if pending:
                    await store()
                replies.append(await self.execute(command))
                continue
            prepared = self._prepare(spec.prepare, command)
            if not isinstance(prepared, bytes):
                pending.append(prepared)
                slots.append(len(replies))
                prepared = b""
            replies.append(prepared)
        if pending:
            await store()
        return resp.array(replies)

    async def quit(self, args: tuple[bytes, ...]) -> bytes:
        self.closing = True
        return resp.OK

    async def select(self, args: tuple[bytes, ...]) -> bytes:
        if _integer(args[1]) != 0:
            raise CommandError("DB index is out of range")
        return resp.OK

    async def client(self, args: tuple[bytes, ...]) -> bytes:
        sub = args[1].upper()
        if sub == b"SETNAME" and len(args) == 3:
            self.name = args[2]
            return resp.OK
        if sub == b"GETNAME" and len(args) == 2:
            return resp.bulk_string(self.name) if self.name else resp.null(self.protocol)
        if sub == b"ID" and len(args) == 2:
            return resp.integer(self.client_id)
        if sub == b"SETINFO" and len(args) == 4:
            return resp.OK
        raise CommandError(
            f"unknown subcommand '{args[1].decode(errors='replace')}'. Try SETNAME, GETNAME,"
            " ID or SETINFO."
        )

    async def command(self, args: tuple[bytes, ...]) -> bytes:
        # redis-cli asks for COMMAND DOCS to offer hints; an empty answer means "no hints".
        if len(args) > 1 and args[1].upper() == b"COUNT":
            return resp.integer(len(self.commands))
        return resp.array([])

    async def config(self, args: tuple[bytes, ...]) -> bytes:
        # redis-benchmark reads CONFIG GET save/appendonly on start and reads element [1] of
        # each reply: answer [name, value] pairs as Redis does.  Persistence is the store's
        # business, so these are the answers of a server without its own RDB/AOF.
        if args[1].upper() != b"GET":
            raise CommandError("CONFIG is read-only on busgate: only CONFIG GET is answered")
        pairs: list[tuple[bytes, bytes]] = []
        for name in args[2:]:
            value = _CONFIG_VALUES.get(name.lower())
            if value is not None:
                pairs.append((resp.bulk_string(name.lower()), resp.bulk_string(value)))
        return resp.mapping(pairs, self.protocol)  # a map under RESP3, as Redis answers

    async def info(self, args: tuple[bytes, ...]) -> bytes:
        directory = self.service.directory
        lines = [
            "# Server",
            f"redis_version:{COMPATIBLE_REDIS_VERSION}",
            f"busgate_server:{SERVER_NAME}",
            "redis_mode:standalone",
            "# Persistence",
            "loading:0",
            "# Replication",
            "role:master",
            "# Keyspace",
            *(f"queue_{name}:topics={len(e.topics)}" for name, e in directory.queues.items()),
        ]
        return resp.bulk_string(("\r\n".join(lines) + "\r\n").encode())


def _store_error(exc: StoreError) -> bytes:
    return resp.error(f"TRYAGAIN {store_error_text(exc)}")


#: What runs at once inside MULTI rather than being queued.
_TRANSACTION = frozenset((b"MULTI", b"EXEC", b"DISCARD", b"QUIT"))


def _internal_error(exc: Exception, args: tuple[bytes, ...]) -> bytes:
    """The reply to a command that hit a bug: the error goes to the log with its traceback."""
    log.error("%s failed", args[0][:40].decode("utf-8", "replace"), exc_info=exc)
    return resp.error(f"ERR internal error, nothing was acknowledged: {type(exc).__name__}")


def _replies(pushes: list[PendingPush], outcome: PushResult | Exception) -> list[bytes]:
    """The replies to ``pushes``, stored together with ``outcome``."""
    if isinstance(outcome, StoreError):
        return [_store_error(outcome)] * len(pushes)
    if isinstance(outcome, Exception):  # a bug, not a store failure: say so, keep serving
        return [_internal_error(outcome, (b"storing",))] * len(pushes)
    if len(pushes) == 1:
        return [pushes[0].reply(outcome)]
    parts = outcome.parts(len(push.jobs) for push in pushes)
    return [push.reply(part) for push, part in zip(pushes, parts, strict=True)]


RespSession.commands = {
    b"AUTH": Spec(-2, RespSession.auth),
    b"LPUSH": Spec(-3, prepare=RespSession.lpush),
    b"RPUSH": Spec(-3, prepare=RespSession.lpush),
    b"ZADD": Spec(-4, prepare=RespSession.zadd),
    b"XADD": Spec(-5, prepare=RespSession.xadd),
    b"LLEN": Spec(2, RespSession.llen),
    b"PING": Spec(-1, RespSession.ping),
    b"ECHO": Spec(2, RespSession.echo),
    b"QUIT": Spec(-1, RespSession.quit),
    b"SELECT": Spec(2, RespSession.select),
    b"CLIENT": Spec(-2, RespSession.client),
    b"HELLO": Spec(-1, RespSession.hello),
    b"COMMAND": Spec(-1, RespSession.command),
    b"CONFIG": Spec(-3, RespSession.config),
    b"MULTI": Spec(1, RespSession.multi),
    b"EXEC": Spec(1, RespSession.exec),
    b"DISCARD": Spec(1, RespSession.discard),
    b"INFO": Spec(-1, RespSession.info),
}
