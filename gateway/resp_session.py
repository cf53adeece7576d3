"""The Redis-protocol command table: one producer connection's commands, turned into replies.

``execute(args)`` takes a parsed command and returns the encoded reply; the server around
it owns the socket.  A push is two steps, ``prepare`` (checks, jobs built, nothing stored)
and ``commit`` (the store call), so that a pipelined run of pushes costs one store call per
queue rather than one per command.  Replies have the types clients expect (integers for
pushes, a bulk string id for XADD), one reply per command, and an acknowledgement only once
the store has the job.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import trio

from adapters.delivery.headers import trace_id_of
from adapters.storage.errors import StoreError, store_error_text
from adapters.storage.jobs import NewJob, Priority, PushResult, check_job_id
from gateway import __version__, resp
from gateway.producer import (
    MAX_DELAY_MS,
    BadDelay,
    Directory,
    PayloadTooLarge,
    ProducerError,
    ProducerService,
    QueueEntry,
    WrongPassword,
    split_target,
)
from gateway.resp_commands import HELP as COMMAND_HELP
from gateway.resp_commands import Described, describe, find, listed
from gateway.resp_commands import flags as key_flags

if TYPE_CHECKING:
    from gateway.resp_server import RespServer

SERVER_NAME = "busgate"
#: What INFO and HELLO report as redis_version: clients gate features on it.
COMPATIBLE_REDIS_VERSION = "7.2.0"

_XADD_TRIM = {b"MAXLEN", b"MINID"}

Handler = Callable[["RespSession", tuple[bytes, ...]], Awaitable[bytes]]
Preparer = Callable[["RespSession", tuple[bytes, ...]], "PendingPush"]
#: What a push's size checks read, found in its arguments alone: its target (b"queue" or
#: b"queue/topic"), its payloads and its attributes (XADD's).  A sizer raises CommandError
#: for a command too malformed to say.
Sizes = tuple[bytes, Sequence[bytes], Mapping[str, str]]
Sizer = Callable[[tuple[bytes, ...]], Sizes]

log = logging.getLogger("busgate.resp")

_CONFIG_VALUES = {b"save": b"", b"appendonly": b"no", b"databases": b"1"}


class CommandError(Exception):
    """A reply-level error for one command; the connection carries on."""

    def __init__(self, message: str, code: str = "ERR") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Peer:
    """One connection as CLIENT LIST shows it: its session, and what the server knows of it."""

    session: RespSession
    addr: str  # the client's address, ip:port
    laddr: str  # ours, that it connected to
    age: int  # seconds since it connected
    idle: int  # seconds since it last sent a command or was answered


@dataclass(frozen=True, slots=True)
class Spec:
    arity: int  # Redis convention: N exactly, -N at least N (command name included)
    handler: Handler | None = None  # what any command but a push runs
    prepare: Preparer | None = None  # a push: checks it and builds its jobs (see commit)
    sizes: Sizer | None = None  # a push: what MULTI checks while queueing it (``_queue``)
    #: A container command's subcommands and their arity (CLIENT LIST is 2 of -2): checked
    #: with the command, so that one unknown or given the wrong number of arguments is
    #: refused before it runs, as Redis refuses it (not queued by MULTI, not counted as run).
    subcommands: Mapping[bytes, int] | None = None


@dataclass(slots=True)
class PendingPush:
    """A push command checked and turned into jobs, not yet stored."""

    entry: QueueEntry
    jobs: list[NewJob]
    reply_id: bool  # XADD answers with the job id; the list commands with a count

    def reply(self, ids: tuple[str, ...], first: int = 0) -> bytes:
        """The reply once stored; ``ids[first]`` is the id of this push's first job."""
        return (
            resp.bulk_string(ids[first].encode()) if self.reply_id else resp.integer(len(self.jobs))
        )


def _takes(arity: int, count: int) -> bool:
    """Whether a command of ``arity`` (Redis's convention: N exactly, -N at least N) may be
    given ``count`` arguments, its name included."""
    return count == arity if arity >= 0 else count >= -arity


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(f"{what} must be UTF-8") from None


def _integer(value: bytes, what: str = "value") -> int:
    """An integer argument, read as Redis reads one (``_strict_integer``): Python's int()
    would also take " 5", "1_000" and "+5", which a producer's typo should not pass as."""
    number = _strict_integer(value)
    if number is None:
        raise CommandError(f"{what} is not an integer or out of range")
    return number


_STRICT_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,18}")


def _strict_integer(value: bytes) -> int | None:
    """``value`` as Redis reads an integer argument (no sign but -, no leading zero, 64 bits);
    None if it is not one."""
    if _STRICT_INTEGER.fullmatch(value) is None:
        return None
    number = int(value)
    return number if -(2**63) <= number < 2**63 else None


def _shown(value: bytes, limit: int = 128) -> str:
    """An argument quoted in an error reply."""
    return value[:limit].decode("utf-8", "replace")


def _zadd_pairs(args: tuple[bytes, ...]) -> list[bytes]:
    """ZADD's score and payload pairs, after its flags."""
    rest = list(args[2:])
    while rest and rest[0].upper() in (b"NX", b"XX", b"GT", b"LT", b"CH"):
        rest.pop(0)  # every job is a new member: these flags change nothing
    if rest and rest[0].upper() == b"INCR":
        raise CommandError("INCR is not supported: ZADD schedules jobs")
    if not rest or len(rest) % 2:
        raise CommandError("syntax error")
    return rest


def _xadd_fields(args: tuple[bytes, ...]) -> tuple[int, tuple[bytes, ...]]:
    """Where XADD's id is, after its stream options, and the field-value pairs after it."""
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
    return i, fields


# -- sizers: a push's sizes, read as its preparer reads them (Spec.sizes) ----------------------


def _list_sizes(args: tuple[bytes, ...]) -> Sizes:
    return args[1], args[2:], {}


def _zadd_sizes(args: tuple[bytes, ...]) -> Sizes:
    return args[1], _zadd_pairs(args)[1::2], {}


#: XADD's fields that are not attributes (``RespSession.xadd``).
_XADD_FIELDS = frozenset(("payload", "delay", "priority", "traceparent"))


def _xadd_sizes(args: tuple[bytes, ...]) -> Sizes:
    fields = _xadd_fields(args)[1]
    payloads: tuple[bytes, ...] = ()
    attributes: dict[str, str] = {}
    for key, value in zip(fields[::2], fields[1::2], strict=True):
        name = _text(key, "field name")
        if name.lower() == "payload":
            payloads = (value,)  # the last one given, as for the job
        elif name.lower() not in _XADD_FIELDS:
            attributes[name] = _text(value, f"attribute {name.lower()}")
    return args[1], payloads, attributes


def _check_attribute(value: bytes, message: str) -> bytes:
    """A client name, library name or version: CLIENT LIST separates fields with spaces and
    lines with newlines, so Redis allows only printable ASCII other than the space."""
    if any(byte < 0x21 or byte > 0x7E for byte in value):
        raise CommandError(message)
    return value


def _check_name(name: bytes) -> bytes:
    return _check_attribute(
        name, "Client names cannot contain spaces, newlines or special characters."
    )


class RespSession:
    """The state of one producer connection: whom it is authenticated for, its name."""

    commands: ClassVar[dict[bytes, Spec]] = {}
    #: The commands as COMMAND describes them, in the table's order.
    described: ClassVar[dict[bytes, Described]] = {}

    def __init__(self, service: ProducerService, client_id: int, server: RespServer) -> None:
        self.service = service
        self.client_id = client_id
        self.server = server  # what INFO and CLIENT LIST report on besides this connection
        self.created = trio.current_time()
        #: The last command's table name (b"CLIENT|LIST" for a subcommand), for CLIENT LIST;
        #: None before the first and after an unknown one, shown as NULL as Redis shows it.
        self.last_command: bytes | None = None
        self.lib_name = b""  # CLIENT SETINFO
        self.lib_ver = b""
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
            if isinstance(exc, WrongPassword):  # AUTH, HELLO … AUTH: a refused login
                self._refused(exc.login.encode(), exc)
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
            self._refused(args[1], exc)
            return resp.error(f"{exc.code} {exc}")
        except Exception as exc:
            return _internal_error(exc, args)

    def _refused(self, target: bytes, exc: CommandError | ProducerError) -> None:
        """Count and log a refused push or login (``ProducerService.refused``)."""
        queue = split_target(target.decode("utf-8", "replace"))[0]
        reason = exc.reason if isinstance(exc, ProducerError) else "invalid"
        self.service.refused(queue, reason, f"{exc.code} {exc}", via="resp")

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

    def commit_nowait(
        self, pushes: list[PendingPush], deliver: Callable[[list[bytes]], None]
    ) -> Callable[[], Awaitable[None]] | None:
        """``commit`` without waiting: ``deliver`` gets the replies once the store has the
        jobs, from the task that made the store call (``ProducerService.submit_nowait``).

        What is left for the caller to await at once, in a task that may wait: the store call,
        when none was under way to join; the calls, when the pushes go to several queues.
        ``deliver`` runs exactly once and must not raise.
        """
        entry = pushes[0].entry
        if len(pushes) > 1 and any(push.entry is not entry for push in pushes):

            async def stored_apart() -> None:  # one call per queue
                deliver(await self.commit(pushes))

            return stored_apart
        jobs = pushes[0].jobs if len(pushes) == 1 else [j for p in pushes for j in p.jobs]

        def on_stored(outcome: PushResult | Exception, first: int) -> None:
            deliver(_replies(pushes, outcome, first))

        if self.service.submit_nowait(entry, jobs, on_stored):
            return functools.partial(self.service.flush, entry)
        return None

    def _spec(self, args: tuple[bytes, ...]) -> Spec | bytes:
        """The command's table entry, or the error reply for an unknown command or
        subcommand, or a wrong number of arguments.

        Such a command is refused without running, and Redis does not count it in INFO's
        total_commands_processed (only in total_error_replies): the server, which counts
        every command it answers, is told to take it back out (``RespServer.recount``).
        """
        name = args[0].upper()
        spec = self.commands.get(name)
        if spec is None:
            self.last_command = None
            self.server.recount(run=-1)
            shown = " ".join(f"'{a[:40].decode('utf-8', 'replace')}'" for a in args[1:4])
            return resp.error(
                f"ERR unknown command '{args[0][:40].decode('utf-8', 'replace')}',"
                f" with args beginning with: {shown}"
            )
        arity = spec.arity
        if spec.subcommands is not None and len(args) > 1:
            sub = args[1].upper()
            sub_arity = spec.subcommands.get(sub)
            if sub_arity is None:
                self.last_command = None
                self.server.recount(run=-1)
                return resp.error(
                    f"ERR unknown subcommand '{_shown(args[1])}'. Try {name.decode()} HELP."
                )
            name, arity = name + b"|" + sub, sub_arity
        self.last_command = name
        if not _takes(arity, len(args)):
            self.server.recount(run=-1)
            return resp.error(
                f"ERR wrong number of arguments for '{name.decode().lower()}' command"
            )
        return spec

    # -- pushes -------------------------------------------------------------------------------

    def _resolve(self, target: bytes) -> tuple[QueueEntry, str | None]:
        """The queue and topic (if named) a push to ``target`` goes to, if it is allowed."""
        service = self.service
        # Reloaded since, or shutting down: ask again (the service refuses every push once
        # it has stopped, and a target checked before must not slip past that).
        if self._targets_of is not service.directory or not service.accepting:
            self._targets.clear()
            self._targets_of = service.directory
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
        rest = _zadd_pairs(args)
        times = []
        latest = self.service.run_at(MAX_DELAY_MS)
        for score in rest[0::2]:
            try:
                # Redis takes no spaces around a score, nor Python's "1_000".
                if score.strip() != score or b"_" in score:
                    raise ValueError
                run_at = float(score)
            except ValueError:
                raise CommandError("value is not a valid float") from None
            # Out of range is a delay refused, as XADD's delay and HTTP's delay_ms are.
            if not math.isfinite(run_at):
                raise BadDelay("the score (unix seconds to run at) must be finite")
            if run_at > latest:  # as XADD's delay: a store keeps milliseconds in 64 bits
                raise BadDelay("the score (unix seconds to run at) is over 100 years away")
            times.append(run_at)
        entry, topic = self._resolve(args[1])
        payloads = rest[1::2]
        self.service.check_sizes(entry, payloads)
        jobs = [NewJob(p, topic=topic, run_at=t) for t, p in zip(times, payloads, strict=True)]
        return PendingPush(entry, jobs, reply_id=False)

    def xadd(self, args: tuple[bytes, ...]) -> PendingPush:
        i, fields = _xadd_fields(args)
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
            else:  # an attribute, as _xadd_sizes reads it (_XADD_FIELDS)
                attributes[_text(key, "field name")] = _text(value, f"attribute {name}")
        if payload is None:
            raise CommandError("XADD needs a 'payload' field")
        entry, topic = self._resolve(args[1])
        self.service.check_sizes(entry, [payload])
        self.service.check_attributes(attributes)
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
        # Every option is checked before any takes effect, as Redis 7.2 does: a HELLO refused
        # for any reason changes nothing, neither the login nor the name nor the protocol.
        protocol = self.protocol
        i = 1
        if len(args) > 1:
            version = _strict_integer(args[1])
            if version is None:
                raise CommandError("Protocol version is not an integer or out of range")
            if version not in (2, 3):
                raise CommandError("unsupported protocol version", code="NOPROTO")
            protocol = version
            i = 2
        login: tuple[bytes, bytes] | None = None
        name: bytes | None = None
        while i < len(args):
            option = args[i].upper()
            if option == b"AUTH" and i + 2 < len(args):
                login = (args[i + 1], args[i + 2])  # the last one given counts
                i += 3
            elif option == b"SETNAME" and i + 1 < len(args):
                name = _check_name(args[i + 1])
                i += 2
            else:
                raise CommandError(f"Syntax error in HELLO option '{_shown(args[i])}'")
        if login is not None:
            await self.auth((b"AUTH", *login))  # a wrong password raises: nothing is applied
        if name is not None:
            self.name = name
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

    async def reset(self, args: tuple[bytes, ...]) -> bytes:
        """RESET (Redis 6.2): the connection as it was on connect, apart from its id and the
        library it reported (CLIENT SETINFO), as Redis keeps those."""
        self._queued, self._queue_refused = None, False
        self.authenticated = {}
        self._targets.clear()  # allowed by the logins just dropped
        self._targets_of = None
        self.protocol = 2
        self.name = b""
        return b"+RESET\r\n"

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
        if spec.sizes is not None and (too_large := self._too_large(spec.sizes, args)):
            self._refused(args[1], too_large)
            return self.refuse(resp.error(f"{too_large.code} {too_large}"))
        self._queued.append(args)
        self.server.recount(run=-1)  # not run yet: EXEC counts it if it runs it
        return b"+QUEUED\r\n"

    def _too_large(self, sizes: Sizer, args: tuple[bytes, ...]) -> PayloadTooLarge | None:
        """The size error a push queued by MULTI would meet at EXEC, if its queue is known.

        A payload over the parser's limit (the largest max_payload, and some slack) is refused
        before it is queued, and aborts the transaction (``refuse``); one over its queue's
        max_payload but under that limit must too, or the same error would store the rest of
        the transaction or nothing, by the payload's size.  The check is the push's own
        (``ProducerService.check_sizes``), once the producer may push to the queue: one that
        has not logged in learns nothing of it but NOAUTH.  Any other error (unknown queue,
        NOAUTH, syntax) is one Redis would answer at EXEC, where the push runs: it is left
        to EXEC.
        """
        try:
            target, payloads, attributes = sizes(args)
            entry = self.service.resolve(_text(target, "queue"), self.authenticated)
            self.service.check_sizes(entry, payloads)
            self.service.check_attributes(attributes)
        except PayloadTooLarge as exc:
            return exc
        except (CommandError, ProducerError):  # not a size: EXEC answers it
            pass
        return None

    def refuse_unread(
        self, name: bytes | None, target: bytes | None, error: ProducerError
    ) -> bytes:
        """``refuse`` a command whose arguments were not read (one was over the parser's
        limit), counted and logged as a refused push if it is one; ``target``, its queue,
        is None when the oversized argument came first."""
        if name is not None and (spec := self.commands.get(name)) is not None and spec.prepare:
            self._refused(target or b"", error)
        return self.refuse(resp.error(f"{error.code} {error}"))

    def refuse(self, reply: bytes) -> bytes:
        """A command refused before it got here (an argument over the size limit, never
        buffered): inside MULTI it makes EXEC discard the transaction, as Redis does.  It did
        not run, so it is not counted as run (``_spec``)."""
        if self._queued is not None:
            self._queue_refused = True
        self.server.recount(run=-1)
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
        self.last_command = b"EXEC"  # not the last command it ran, as in Redis
        # Redis counts each command EXEC runs as run, and each error reply among theirs: the
        # server sees one reply, an array (``RespServer._count``).
        self.server.recount(run=len(queued))
        self.server.count_errors(replies)
        return resp.array(replies)

    async def quit(self, args: tuple[bytes, ...]) -> bytes:
        self.closing = True
        return resp.OK

    async def select(self, args: tuple[bytes, ...]) -> bytes:
        if _integer(args[1]) != 0:
            raise CommandError("DB index is out of range")
        return resp.OK

    async def client(self, args: tuple[bytes, ...]) -> bytes:
        sub = args[1].upper()  # one of _CLIENT_ARITY's, with as many arguments (_spec)
        if sub == b"SETNAME":
            self.name = _check_name(args[2])
            return resp.OK
        if sub == b"GETNAME":
            return resp.bulk_string(self.name) if self.name else resp.null(self.protocol)
        if sub == b"ID":
            return resp.integer(self.client_id)
        if sub == b"SETINFO":
            return self._set_info(args[2], args[3])
        if sub == b"INFO":
            return resp.verbatim(_client_line(self.server.peer(self)), self.protocol)
        if sub == b"LIST":
            return resp.verbatim(b"".join(self._client_list(args)), self.protocol)
        return resp.array([resp.simple_string(line) for line in _CLIENT_HELP])

    def _set_info(self, attribute: bytes, value: bytes) -> bytes:
        what = attribute.lower()
        if what not in (b"lib-name", b"lib-ver"):
            raise CommandError(f"Unrecognized option '{_shown(attribute)}'")
        _check_attribute(
            value, f"{_shown(attribute)} cannot contain spaces, newlines or special characters."
        )
        if what == b"lib-name":
            self.lib_name = value
        else:
            self.lib_ver = value
        return resp.OK

    def _client_list(self, args: tuple[bytes, ...]) -> list[bytes]:
        """CLIENT LIST [TYPE <type> | ID <id> [<id> ...]]: a line per connection."""
        if len(args) == 2:
            peers: Iterable[Peer] = self.server.peers()
        elif len(args) == 4 and args[2].upper() == b"TYPE":
            kind = args[3].lower()
            if kind not in (b"normal", b"master", b"replica", b"slave", b"pubsub"):
                raise CommandError(f"Unknown client type '{_shown(args[3])}'")
            # Producers are all "normal": busgate has no replicas nor subscribers.
            peers = self.server.peers() if kind == b"normal" else []
        elif len(args) > 3 and args[2].upper() == b"ID":
            ids = [_strict_integer(arg) for arg in args[3:]]
            if any(i is None or i < 1 for i in ids):
                raise CommandError("Invalid client ID")
            by_id = {peer.session.client_id: peer for peer in self.server.peers()}
            peers = [by_id[i] for i in ids if i in by_id]  # in the order asked, as Redis
        else:
            raise CommandError("syntax error")
        return [_client_line(peer) for peer in peers]

    async def command(self, args: tuple[bytes, ...]) -> bytes:
        """COMMAND and its subcommands, describing busgate's own commands (``resp_commands``)."""
        sub = args[1].upper() if len(args) > 1 else b""
        described = self.described
        if sub == b"COUNT":
            return resp.integer(len(described))
        if sub in (b"", b"INFO"):
            names = args[2:] if sub else ()
            found = [find(described, name) for name in names] if names else described.values()
            return resp.array(
                [resp.null(self.protocol) if d is None else d.reply(self.protocol) for d in found]
            )
        if sub == b"LIST":
            try:
                return resp.array(
                    [resp.bulk_string(n) for n in listed(described.values(), args[2:])]
                )
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        if sub in (b"GETKEYS", b"GETKEYSANDFLAGS"):
            key, flags = self._key_of(args[2:])
            if sub == b"GETKEYS":
                return resp.array([resp.bulk_string(key)])
            return resp.array(
                [resp.array([resp.bulk_string(key), key_flags(flags, self.protocol)])]
            )
        if sub == b"HELP":
            return resp.array([resp.simple_string(line) for line in COMMAND_HELP])
        # DOCS: redis-cli asks for it to offer hints; an empty answer means "no hints".
        return resp.mapping([], self.protocol)

    def _key_of(self, command: tuple[bytes, ...]) -> tuple[bytes, tuple[str, ...]]:
        """COMMAND GETKEYS: the key of ``command`` (its queue) and how it is accessed."""
        spec = self.commands.get(command[0].upper())
        if spec is None:
            raise CommandError("Invalid command specified")
        if not _takes(spec.arity, len(command)):
            raise CommandError("Invalid number of arguments specified for command")
        key = self.described[command[0].upper()].key
        if not key:
            raise CommandError("The command has no key arguments")
        return command[1], key

    async def config(self, args: tuple[bytes, ...]) -> bytes:
        # redis-benchmark reads CONFIG GET save/appendonly on start and reads element [1] of
        # each reply: answer [name, value] pairs as Redis does.  Persistence is the store's
        # business, so these are the answers of a server without its own RDB/AOF.
        if args[1].upper() != b"GET":
            raise CommandError("CONFIG is read-only on busgate: only CONFIG GET is answered")
        pairs: list[tuple[bytes, bytes]] = []
        # maxclients is the daemon's own limit (a reload may change it), as INFO reports it.
        values = {**_CONFIG_VALUES, b"maxclients": b"%d" % self.server.limits.max_connections}
        for name in args[2:]:
            value = values.get(name.lower())
            if value is not None:
                pairs.append((resp.bulk_string(name.lower()), resp.bulk_string(value)))
        return resp.mapping(pairs, self.protocol)  # a map under RESP3, as Redis answers

    async def info(self, args: tuple[bytes, ...]) -> bytes:
        """INFO [section ...]: the sections asked for, in Redis's order; none for a section
        busgate does not have, as Redis answers an unknown one."""
        wanted = {arg.lower().decode("utf-8", "replace") for arg in args[1:]} or {"default"}
        if wanted & {"default", "all", "everything"}:
            wanted = set(_INFO_SECTIONS)  # busgate has no section outside the default set
        sections = []
        for name, title in _INFO_SECTIONS.items():
            if name in wanted:
                fields = "".join(f"{key}:{value}\r\n" for key, value in self._info_section(name))
                sections.append(f"# {title}\r\n{fields}")
        return resp.verbatim("\r\n".join(sections).encode(), self.protocol)

    def _info_section(self, name: str) -> list[tuple[str, object]]:
        """One INFO section's fields; only numbers busgate really has."""
        server = self.server
        if name == "server":
            uptime = int(trio.current_time() - server.started)
            return [
                ("redis_version", COMPATIBLE_REDIS_VERSION),
                ("busgate_version", __version__),
                ("busgate_server", SERVER_NAME),
                ("redis_mode", "standalone"),
                ("os", " ".join(platform.uname()[i] for i in (0, 2, 4))),
                ("arch_bits", 64 if sys.maxsize > 2**32 else 32),
                ("process_id", os.getpid()),
                ("tcp_port", server.address.rpartition(":")[2]),
                ("server_time_usec", time.time_ns() // 1000),
                ("uptime_in_seconds", uptime),
                ("uptime_in_days", uptime // 86400),
            ]
        statistics = server.statistics()
        if name == "clients":
            return [
                ("connected_clients", statistics.connections),
                ("maxclients", server.limits.max_connections),
                ("blocked_clients", 0),  # no command of busgate's blocks
            ]
        if name == "memory":
            # busgate has no dataset of its own to count: used_memory is the process's
            # resident size (what redis-cli --stat shows as mem), as is used_memory_rss.
            rss = _resident_bytes()
            if rss is None:
                return []
            # The kernel updates the peak (KiB on Linux) lazily: it may trail the size now.
            peak = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            return [
                ("used_memory", rss),
                ("used_memory_human", _human(rss)),
                ("used_memory_rss", rss),
                ("used_memory_rss_human", _human(rss)),
                ("used_memory_peak", peak),
                ("used_memory_peak_human", _human(peak)),
            ]
        if name == "persistence":
            return [("loading", 0)]  # the store persists jobs; the daemon loads nothing
        if name == "stats":
            return [
                ("total_connections_received", statistics.connections_total),
                ("total_commands_processed", statistics.commands_total),
                ("rejected_connections", statistics.rejected_total),
                ("total_error_replies", statistics.errors_total),
            ]
        if name == "replication":
            return [("role", "master"), ("connected_slaves", 0)]
        if name == "modules":
            return []  # busgate loads none
        if name == "errorstats":
            return [
                (f"errorstat_{code}", f"count={n}") for code, n in server.error_counts().items()
            ]
        if name == "cluster":
            return [("cluster_enabled", 0)]  # busgate is not a cluster node, whatever its store
        if name == "cpu":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return [
                ("used_cpu_sys", f"{usage.ru_stime:.6f}"),
                ("used_cpu_user", f"{usage.ru_utime:.6f}"),
            ]
        # Keyspace: the queues.  No dbN:keys line: counting the jobs pending would cost a
        # store query per queue on every INFO, and a made-up number would mislead.  Numbered
        # as Redis numbers its databases, the name a value: a queue's name may hold ":"
        # ("app:emails"), which clients take for the end of an INFO field's name.
        return [
            (f"queue{index}", f"name={queue},topics={len(entry.topics)}")
            for index, (queue, entry) in enumerate(self.service.directory.queues.items())
        ]


#: COMMAND's subcommands and their arity, as Redis 7 has them (busgate answers COUNT, and
#: each of the others with an empty array).
_COMMAND_ARITY = {
    b"COUNT": 2,
    b"DOCS": -2,
    b"GETKEYS": -4,
    b"GETKEYSANDFLAGS": -4,
    b"HELP": 2,
    b"INFO": -2,
    b"LIST": -2,
}

#: CONFIG's subcommands and their arity, as Redis 7 has them (busgate answers GET only).
_CONFIG_ARITY = {b"GET": -3, b"HELP": 2, b"RESETSTAT": 2, b"REWRITE": 2, b"SET": -4}

#: INFO's sections, in the order Redis lists them, with their titles.
_INFO_SECTIONS = {
    "server": "Server",
    "clients": "Clients",
    "memory": "Memory",
    "persistence": "Persistence",
    "stats": "Stats",
    "replication": "Replication",
    "cpu": "CPU",
    "modules": "Modules",
    "errorstats": "Errorstats",
    "cluster": "Cluster",
    "keyspace": "Keyspace",
}

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _resident_bytes() -> int | None:
    """The process's resident set size, from /proc (Linux); None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _human(size: int) -> str:
    """A byte count as Redis's INFO words it: 1008B, 1.50K, 12.34M."""
    if size < 1024:
        return f"{size}B"
    scaled = size / 1024
    for unit in "KMGT":
        if scaled < 1024:
            return f"{scaled:.2f}{unit}"
        scaled /= 1024
    return f"{scaled:.2f}P"


#: CLIENT's subcommands and their arity (Redis's convention, CLIENT and the subcommand counted).
_CLIENT_ARITY = {
    b"GETNAME": 2,
    b"HELP": 2,
    b"ID": 2,
    b"INFO": 2,
    b"LIST": -2,
    b"SETINFO": 4,
    b"SETNAME": 3,
}

_CLIENT_HELP = (
    "CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "GETNAME",
    "    Return the name of the current connection.",
    "ID",
    "    Return the ID of the current connection.",
    "INFO",
    "    Return information about the current client connection.",
    "LIST [options ...]",
    "    Return information about client connections. Options:",
    "    * TYPE (NORMAL|MASTER|REPLICA|PUBSUB)",
    "      Return clients of specified type.",
    "    * ID <client-id> [<client-id> ...]",
    "      Return clients with the given ids.",
    "SETINFO <option> <value>",
    "    Set client meta attr. Options are:",
    "    * LIB-NAME: the client lib name.",
    "    * LIB-VER: the client lib version.",
    "SETNAME <name>",
    "    Assign the name <name> to the current connection.",
    "HELP",
    "    Print this help.",
)


def _client_line(peer: Peer) -> bytes:
    """A CLIENT LIST line: Redis's fields, in its order, of those busgate knows."""
    session = peer.session
    command = session.last_command.lower() if session.last_command is not None else b"NULL"
    return (
        b"id=%d addr=%s laddr=%s name=%s age=%d idle=%d db=0 cmd=%s resp=%d"
        b" lib-name=%s lib-ver=%s\n"
        % (
            session.client_id,
            peer.addr.encode(),
            peer.laddr.encode(),
            session.name,
            peer.age,
            peer.idle,
            command,
            session.protocol,
            session.lib_name,
            session.lib_ver,
        )
    )


def _store_error(exc: StoreError) -> bytes:
    return resp.error(f"TRYAGAIN {store_error_text(exc)}")


#: What runs at once inside MULTI rather than being queued.
_TRANSACTION = frozenset((b"MULTI", b"EXEC", b"DISCARD", b"QUIT", b"RESET"))


def _internal_error(exc: Exception, args: tuple[bytes, ...]) -> bytes:
    """The reply to a command that hit a bug: the error goes to the log with its traceback."""
    log.error("%s failed", args[0][:40].decode("utf-8", "replace"), exc_info=exc)
    return resp.error(f"ERR internal error, nothing was acknowledged: {type(exc).__name__}")


def _replies(
    pushes: list[PendingPush], outcome: PushResult | Exception, first: int = 0
) -> list[bytes]:
    """The replies to ``pushes``, stored together with ``outcome``, where their first job is
    ``outcome``'s job ``first``."""
    if isinstance(outcome, StoreError):
        return [_store_error(outcome)] * len(pushes)
    if isinstance(outcome, Exception):  # a bug, not a store failure: say so, keep serving
        return [_internal_error(outcome, (b"storing",))] * len(pushes)
    ids = outcome.ids
    if len(pushes) == 1:
        return [pushes[0].reply(ids, first)]
    # A reply needs only the push's first id, not a PushResult of its own.
    replies = []
    for push in pushes:
        replies.append(push.reply(ids, first))
        first += len(push.jobs)
    return replies


RespSession.commands = {
    b"AUTH": Spec(-2, RespSession.auth),
    b"LPUSH": Spec(-3, prepare=RespSession.lpush, sizes=_list_sizes),
    b"RPUSH": Spec(-3, prepare=RespSession.lpush, sizes=_list_sizes),
    b"ZADD": Spec(-4, prepare=RespSession.zadd, sizes=_zadd_sizes),
    b"XADD": Spec(-5, prepare=RespSession.xadd, sizes=_xadd_sizes),
    b"LLEN": Spec(2, RespSession.llen),
    b"PING": Spec(-1, RespSession.ping),
    b"ECHO": Spec(2, RespSession.echo),
    b"QUIT": Spec(-1, RespSession.quit),
    b"SELECT": Spec(2, RespSession.select),
    b"CLIENT": Spec(-2, RespSession.client, subcommands=_CLIENT_ARITY),
    b"HELLO": Spec(-1, RespSession.hello),
    b"COMMAND": Spec(-1, RespSession.command, subcommands=_COMMAND_ARITY),
    b"CONFIG": Spec(-2, RespSession.config, subcommands=_CONFIG_ARITY),
    b"MULTI": Spec(1, RespSession.multi),
    b"EXEC": Spec(1, RespSession.exec),
    b"DISCARD": Spec(1, RespSession.discard),
    b"INFO": Spec(-1, RespSession.info),
    b"RESET": Spec(1, RespSession.reset),
}
RespSession.described = {
    name: describe(name, spec.arity, spec.subcommands)
    for name, spec in RespSession.commands.items()
}
