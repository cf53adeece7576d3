"""The Redis store: many hosts share one Redis (or Redis Cluster).

Every state change is one Lua script (``redis_scripts``) over the keys of one queue, which all
share the hash tag ``{queue}``.  Jobs are leased, never popped: a daemon that dies leaves
leases that expire and are recovered by any daemon.  A push PUBLISHes the topic on
``bg:{queue}:wake``; every daemon listens and rings its local doorbell, so an idle topic's
dispatcher reserves the job within milliseconds without polling.

Redis replicates asynchronously: a push acknowledged just before its master dies may never
reach the replica that takes over.  With ``replicas`` (the store URL's ``?replicas=N``) the
PUSH script is followed, in the same pipeline, by ``WAIT N ms``, and a push fewer replicas
confirmed is answered as uncertain.  Only pushes: a lost outcome or lease means a delivery
again, which at-least-once allows already.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import chain
from typing import Any, NamedTuple

import trio

from adapters.storage import redis_scripts as scripts
from adapters.storage.base import (
    DEAD_SCAN_LIMIT,
    MAINTENANCE_BATCH,
    Due,
    Expiry,
    Finish,
    Retention,
    Route,
    Store,
    dead_cursor,
    parse_dead_cursor,
)
from adapters.storage.errors import (
    StoreCorrupt,
    StoreError,
    StoreLoading,
    StoreRefused,
    StoreUnavailable,
    StoreUncertain,
    StoreUnsupported,
)
from adapters.storage.fanout import route
from adapters.storage.jobs import (
    Attempt,
    DeadFilter,
    DeadJob,
    DeadPage,
    Job,
    JobRecord,
    NewJob,
    Outcome,
    Priority,
    Pushed,
    PushResult,
    State,
    TopicStats,
    new_job_id,
    new_lease,
    new_trace,
)
from adapters.storage.priority import PriorityScheduler
from adapters.storage.redis_client import DEFAULT_REPLICA_TIMEOUT, Script, ServerError
from adapters.storage.redis_routing import Router

log = logging.getLogger("busgate.redis")

#: Dead jobs' records fetched per round trip when a page filters on an attribute: a record
#: holds its payload, so this many max_payloads at most are held at once (a scan of 5,000
#: is then up to 500 round trips, for an operator's page).
_DEAD_RECORDS = 10
_REGISTRY = b"bg:topics"
#: How often a push says again which topics it uses (see RedisStore._register).
REGISTRY_REFRESH = 60.0
_RETRY = Outcome.RETRY
#: FINISH's kind for a retry that does not count against max_attempts (overloaded).
_RETRY_UNSPENT = "retry-unspent"
_PRIORITY_ARGS = tuple(str(int(p)) for p in Priority)
_ALL_TOPICS = ("*",)  # PUSH: the job goes to every topic the call names
_WAKE_PATTERN = b"bg:{*}:wake"

#: Error codes of a Redis that answers but takes no writes: out of memory (noeviction), a
#: failed snapshot (stop-writes-on-bgsave-error), a replica, too few replicas
#: (min-replicas-to-write).
_WRITE_REFUSALS = frozenset({"OOM", "MISCONF", "READONLY", "NOREPLICAS"})
#: In the error of a command a script ran: "... script: <sha>, on @user_script:125."
_SCRIPT_LINE = "@user_script:"
#: While a replica is down every push is unconfirmed: one warning per this many seconds, with
#: the count since the last, rather than one per push.
UNCONFIRMED_WARNING_INTERVAL = 10.0


#: The key a script names (KEYS[1]) so that a cluster routes it to its queue's slot: one no
#: script ever writes.  While the slot migrates, the old node then answers ASK for every script
#: (it has no such key), and the router waits for the move to end rather than run a script on
#: the new node before the queue's data is there (scripts touch keys they do not name).
ROUTE = b"route"


def prefix_of(queue: str) -> bytes:
    return b"bg:{" + queue.encode() + b"}:"


#: RESERVE pops with ``LPOP key count``, which Redis has since 6.2.
MIN_REDIS_VERSION = (6, 2)


def check_redis_version(info: str) -> None:
    """Raise ``StoreUnsupported`` unless ``INFO server`` text names a recent enough Redis."""
    for line in info.splitlines():
        if line.startswith("redis_version:"):
            text = line.partition(":")[2].strip()
            try:
                version = tuple(int(part) for part in text.split(".")[:2])
            except ValueError:
                break
            if version < MIN_REDIS_VERSION:
                needed = ".".join(map(str, MIN_REDIS_VERSION))
                raise StoreUnsupported(
                    f"Redis {text} is too old: busgate needs Redis {needed} or later"
                    " (LPOP with a count)"
                )
            return
    raise StoreUnsupported("the server did not report a redis_version in INFO server")


def _info_fields(info: str) -> dict[str, str]:
    """The ``name:value`` lines of ``INFO`` text."""
    fields = {}
    for line in info.splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields[name] = value.strip()
    return fields


def check_not_replica(info: str) -> None:
    """Raise ``StoreRefused`` if ``INFO`` text is a replica's: it refuses every write
    (``READONLY``), or, made writable, loses them at its next sync with its master."""
    fields = _info_fields(info)
    if fields.get("role") == "slave":
        master = f"{fields.get('master_host', '?')}:{fields.get('master_port', '?')}"
        raise StoreRefused(
            f"this Redis is a replica (of {master}), which takes no writes: point the store"
            " URL at the master"
        )


def eviction_warning(info: str) -> str | None:
    """What to warn an operator of if ``INFO`` text shows a ``maxmemory-policy`` that can
    evict busgate's keys, or None.

    Only the ``allkeys-*`` policies can: the ``volatile-*`` ones evict keys with a TTL, and
    busgate sets none on its data (only on ``check``'s probe key, which nothing reads).
    """
    fields = _info_fields(info)
    policy = fields.get("maxmemory_policy", "noeviction")
    if fields.get("maxmemory", "0") == "0" or not policy.startswith("allkeys-"):
        return None
    return (
        f"Redis has maxmemory-policy {policy} (maxmemory {fields.get('maxmemory_human')}):"
        " once full, it deletes busgate's jobs, acknowledged ones included, with no error"
        " to anyone; set maxmemory-policy noeviction (a full Redis then refuses pushes,"
        " and producers are told nothing was stored)"
    )


#: No queue is named so (``~`` is not allowed in names): the start-up check's keys.
_CHECK_PREFIX = prefix_of("~check")
#: Errors of the start-up check that are no permission missing: its SADD on a hash, and a
#: Redis that takes no writes now (out of memory, say), which ``check`` reports meanwhile.
_NOT_DENIED = _WRITE_REFUSALS | {"WRONGTYPE"}
#: The ACL rules of a Redis user that may do all busgate does, and nothing more (README,
#: Stores: Redis): keys under ``bg:``, the wake-up channels (PSUBSCRIBE's pattern must be one
#: of the user's literally), and each command the store sends.
ACL_RULES = (
    "resetkeys ~bg:* resetchannels &bg:{*}:wake -@all +evalsha +eval +publish +psubscribe +ping"
    " +info +select +client|setname +cluster|slots +asking +wait +set +sadd +smembers"
    " +llen +zcard +zscore +zrevrangebyscore +hget +hmget +hgetall +hexists +hset +hdel"
    " +hincrby +rpush +lpush +lpop +zadd +zrem +zrange +zrangebyscore"
)
#: Lost jobs found while Redis keeps losing them: one warning per this many seconds, with the
#: count since the last, rather than one per reserve.
LOST_WARNING_INTERVAL = 10.0
#: Unanswered reserves remembered per topic (see RedisStore.reserve): a Redis that keeps not
#: answering fails every reserve; older leases have run out by the time it answers again.
MAX_UNANSWERED = 16


_RECORD_HEAD = struct.Struct("!BQQ16sI")


def pack_record(job: NewJob, enqueued_ms: int, run_ms: int, trace: bytes) -> bytes:
    """A job as pushed, in one string: the priority byte first (scripts read it), then
    enqueue and run times in ms, the trace id (16 bytes), the attributes (JSON) and the
    payload."""
    if not job.attributes:  # the usual case: one concatenation fewer
        return _RECORD_HEAD.pack(job.priority, enqueued_ms, run_ms, trace, 0) + job.payload
    attributes = json.dumps(dict(job.attributes)).encode()
    head = _RECORD_HEAD.pack(job.priority, enqueued_ms, run_ms, trace, len(attributes))
    return head + attributes + job.payload


class _Record(NamedTuple):  # one per reserved job: the cheapest object to build
    priority: Priority
    enqueued_at: float
    run_at: float
    trace_id: str
    attributes: Mapping[str, str]
    payload: bytes


# By value: indexing a tuple is cheaper than calling the enum class, once per job.
_PRIORITIES = tuple(Priority)
_PUSHED = tuple(Pushed)


#: What unpack_record raises for bytes it did not pack: a record written outside busgate.
_MALFORMED = (struct.error, ValueError, IndexError, TypeError)


def read_record(raw: bytes) -> _Record:
    """``unpack_record`` for a look at a job (``busgate jobs show``, dead letters): a record
    busgate did not write shows as its raw bytes, not as an error on the whole page."""
    try:
        return unpack_record(raw)
    except _MALFORMED:
        return _Record(Priority.NORMAL, 0.0, 0.0, "", {}, raw)


def unpack_record(raw: bytes) -> _Record:
    priority, enqueued_ms, run_ms, trace, attrs_len = _RECORD_HEAD.unpack_from(raw)
    start = _RECORD_HEAD.size
    attributes = json.loads(raw[start : start + attrs_len]) if attrs_len else {}
    # tuple.__new__: the generated _Record(...) constructor is a Python-level call.
    return tuple.__new__(
        _Record,
        (
            _PRIORITIES[priority],
            enqueued_ms / 1000,
            run_ms / 1000,
            trace.hex(),
            attributes,
            raw[start + attrs_len :],
        ),
    )


@dataclass(frozen=True, slots=True)
class _State:
    """The mutable part of a reserved job: "state|attempt|run_at|lease|finished|status|error"."""

    state: State
    attempt: int
    run_at: float | None
    finished_at: float | None
    status: int | None
    error: str | None

    @classmethod
    def parse(cls, raw: bytes) -> _State:
        """The state line of an S:T field (its attempts follow on the next lines)."""
        line = raw.partition(b"\n")[0]
        state, attempt, run_at, _lease, finished, status, error = line.decode().split("|", 6)
        return cls(
            State(int(state)),
            int(attempt or 0),
            float(run_at) if run_at else None,
            float(finished) if finished else None,
            int(status) if status else None,
            error or None,
        )


def _stamp(value: float) -> str:
    return f"{value:.3f}"


def encode_attempt(attempt: Attempt) -> str:
    """One line of JSON (json.dumps escapes newlines, so lines separate attempts)."""
    text = (
        f'{{"n":{attempt.attempt},"s":{attempt.started_at!r},"d":{attempt.duration!r},'
        f'"o":"{attempt.outcome._value_}"'
    )
    if attempt.status is not None:
        text += f',"st":{attempt.status}'
    if attempt.error:
        text += ',"e":' + json.dumps(attempt.error)
    if attempt.body:
        text += ',"b":"' + base64.b64encode(attempt.body).decode() + '"'
    if attempt.stderr:
        text += ',"x":"' + base64.b64encode(attempt.stderr).decode() + '"'
    return text + "}"


def decode_attempt(raw: bytes) -> Attempt:
    record = json.loads(raw)
    return Attempt(
        attempt=int(record["n"]),
        started_at=float(record["s"]),
        duration=float(record["d"]),
        outcome=Outcome(record["o"]),
        status=record.get("st"),
        error=record.get("e"),
        body=base64.b64decode(record.get("b", "")),
        stderr=base64.b64decode(record.get("x", "")),
    )


class RedisStore(Store):
    hears_other_processes = True  # the wake channel: see _on_wake

    def __init__(
        self,
        router: Router,
        *,
        clock: Callable[[], float] = time.time,
        replicas: int = 0,
        replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
    ) -> None:
        """``replicas``: how many replicas must confirm a push (``WAIT``) within
        ``replica_timeout`` for it to be acknowledged; 0, the default, sends no WAIT."""
        super().__init__()
        self.router = router
        self._clock = clock
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        # Built once: with replicas off, a push sends and builds nothing more than before.
        self._wait: tuple[str, str, str] | None = (
            ("WAIT", str(replicas), str(max(1, math.ceil(replica_timeout * 1000))))
            if replicas
            else None
        )
        self._unconfirmed = 0  # pushes replicas did not confirm, since the last warning
        self._unconfirmed_warned = -math.inf
        self._schedulers: dict[tuple[str, str], PriorityScheduler] = {}
        self._ready_counts: dict[tuple[str, str], list[int]] = {}
        self._registered: set[tuple[str, str]] = set()
        self._registered_until = -math.inf
        self._seeded: set[str] = set()  # queues whose topics set _seed_topics has filled
        # The queues whose last write Redis refused (out of memory, failed snapshot, a
        # replica, too few replicas), each until a probe write on its node succeeds: in a
        # Cluster, one node may refuse while another takes writes again.
        self._write_refused: set[str] = set()
        # Reserves whose answer was lost, (lease_until stamp, token) per (queue, topic): the
        # jobs they leased are held by nobody.  The topic's next reserve gives them back.
        self._unanswered: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self._lost = 0  # ready jobs RESERVE found without a record, since the last warning
        self._lost_warned = -math.inf
        # Once started: where a subscription that comes back looks at Redis's settings again.
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.router.run)
            await nursery.start(
                partial(
                    self.router.listen,
                    _WAKE_PATTERN,
                    self._on_wake,
                    on_subscribed=self._on_subscribed,
                )
            )
            self._nursery = nursery
            task_status.started()

    def _on_subscribed(self) -> None:
        # Pushes published while the subscription was down were not heard: every waiting
        # dispatcher looks now, not at its recheck (up to 5 s later).
        self.doorbells.ring_all()
        self.timers.ring_all()
        # The subscription broke: Redis may have restarted without its data, the registry
        # of topics with it.  Each push says its topics again, not at the next refresh.
        self._registered.clear()
        # And with another configuration, perhaps: one INFO per reconnection, none per call.
        if self._nursery is not None:
            self._nursery.start_soon(self._recheck_eviction)

    async def check_server(self) -> None:
        """At a daemon's start: refuse a replica, and a Redis user that may not run what
        busgate needs (every push would fail, some after writing); warn of a
        ``maxmemory-policy`` that evicts jobs.  One ``INFO`` per master and two script calls.

        Not for a look that only reads (``busgate curl``): its user may well not write."""
        try:
            for info in await self.router.execute_everywhere("INFO"):
                text = info.decode() if isinstance(info, bytes) else str(info)
                check_not_replica(text)
                if warning := eviction_warning(text):
                    log.warning("%s", warning)
            # Twice: sent as EVAL the first time, then by SHA as every later script call is
            # (redis_routing._eval_on); a user denied either must be refused now.
            for _ in range(2):
                replies = await self.router.eval(
                    _CHECK_PREFIX + ROUTE, scripts.CHECK, [_CHECK_PREFIX]
                )
        except ServerError as exc:
            if exc.code == "NOPERM":  # EVALSHA, or EVAL once the script is not cached
                raise StoreRefused(
                    f"the Redis user may not run busgate's scripts (EVALSHA, EVAL, on keys"
                    f" bg:*): {exc}; grant what README, Stores: Redis lists ({ACL_RULES})"
                ) from exc
            raise StoreUnavailable(f"Redis refused busgate's start-up check: {exc}") from exc
        denied = [
            f"{command.decode()}: {error.decode()}"
            for command, error in zip(replies[0::2], replies[1::2], strict=True)
            if error.partition(b" ")[0].decode() not in _NOT_DENIED
        ]
        if denied:
            raise StoreRefused(
                "the Redis user may not do all busgate does (these commands, on keys bg:*"
                f" and channels bg:{{*}}:wake): {'; '.join(denied)}; grant what README,"
                f" Stores: Redis lists ({ACL_RULES})"
            )

    async def _recheck_eviction(self) -> None:
        try:
            infos = await self.router.execute_everywhere("INFO", "memory")
        except (StoreError, ServerError) as exc:  # only a warning lost: no reason to stop
            log.debug("could not read Redis's maxmemory-policy again: %s", exc)
            return
        for info in infos:
            text = info.decode() if isinstance(info, bytes) else str(info)
            if warning := eviction_warning(text):
                log.warning("%s", warning)

    def _on_wake(self, channel: bytes, data: bytes) -> None:
        # channel: bg:{queue}:wake; data: topic, or ~topic for a delayed job.
        try:
            queue = channel[4 : channel.rfind(b"}")].decode()
            topic = data.decode()
        except UnicodeDecodeError:
            # Not ours: busgate publishes names it decoded.  An exception here would end
            # the subscription and the daemon with it, for anyone who may PUBLISH.
            return
        if topic.startswith("~"):
            self.timers.ring(queue, topic[1:])
        else:
            self.doorbells.ring(queue, topic)

    async def aclose(self) -> None:
        await self._unreserve_all()
        await self.router.aclose()

    async def _unreserve_all(self) -> None:
        """At a stop: no next reserve will give back what unanswered reserves leased."""
        for queue, topic in list(self._unanswered):
            try:
                await self._unreserve(queue, topic)
            except StoreError as exc:
                # Away still: each other topic would wait its own timeout to learn the same.
                log.warning(
                    "the jobs of %d reserves whose answer was lost could not be given back"
                    " at the stop (%s): they return when their lease runs out",
                    sum(map(len, self._unanswered.values())),
                    exc,
                )
                return

    async def check(self) -> None:
        """Every master answers; and, if the last write was refused (``OOM``, ``MISCONF``,
        ``READONLY``, ``NOREPLICAS``: PING answers through all of them), a write now succeeds.

        The probe write is made only then, on each refused queue's node, so a ready store costs
        no write per probe, and readiness comes back once Redis takes writes, with no push to
        find out.
        """
        try:
            await self.router.execute_everywhere("PING")
        except ServerError as exc:
            if exc.code == "LOADING":  # not waited for: /readyz asks how it is now
                raise StoreLoading(
                    "loading: Redis is loading its dataset into memory after a restart;"
                    " store calls wait for it, up to the store's timeout"
                ) from exc
            raise
        for queue in sorted(self._write_refused):
            key = prefix_of(queue) + b"probe"
            (reply,) = await self.router.pipeline(key, [("SET", key, "1", "PX", "1000")])
            if isinstance(reply, ServerError) and reply.code in _WRITE_REFUSALS:
                raise _refused(queue, reply)
            # Written; or refused for another reason (an ACL user that may not SET: its
            # pushes may well go through), which says nothing of the refusal any more.
            self._write_refused.discard(queue)

    async def check_replicas(self) -> None:
        """At startup, with ``replicas``: refuse a Redis user that may not WAIT (every push
        would be answered uncertain), and warn of a master with fewer replicas than that."""
        if not self.replicas:
            return
        try:
            await self.router.execute_everywhere("WAIT", "0", "0")  # answers at once
        except ServerError as exc:
            if exc.code == "NOPERM":
                raise StoreRefused(
                    f"replicas={self.replicas} confirms pushes with WAIT, which Redis refused:"
                    f" {exc}; give the user +wait"
                ) from exc
            # LOADING, say: a push will tell, if it still matters then.
        for info in await self.router.execute_everywhere("INFO", "replication"):
            text = info.decode() if isinstance(info, bytes) else str(info)
            found = re.search(r"^connected_slaves:(\d+)", text, re.MULTILINE)
            connected = int(found.group(1)) if found else 0
            if connected < self.replicas:
                log.warning(
                    "a Redis master has %d replicas connected, and the store URL asks for"
                    " replicas=%d: until it has more, every push is answered as possibly"
                    " stored",
                    connected,
                    self.replicas,
                )

    async def _eval(self, queue: str, script: Script, *args: Any) -> Any:
        prefix = prefix_of(queue)
        try:
            return await self.router.eval(prefix + ROUTE, script, [prefix, *args])
        except ServerError as exc:
            raise self._script_failed(queue, exc) from exc

    def _script_failed(self, queue: str, exc: ServerError) -> StoreError:
        """A script's error reply, as the store error callers see; a refused write is
        remembered for ``check``."""
        text = str(exc)
        # Redis before 7.0 wraps a script's error in ERR ("ERR Error running script ...
        # @user_script:125: -OOM command not allowed ..."): the refusal is in the text.
        refusal = exc.code in _WRITE_REFUSALS or any(f": -{c} " in text for c in _WRITE_REFUSALS)
        if refusal:
            self._write_refused.add(queue)
        if exc.code == "WRONGTYPE":
            return StoreCorrupt(f"queue {queue}: unexpected Redis data: {exc}")
        if _SCRIPT_LINE in text and not refusal:
            # A command inside the script failed (an ACL user without PUBLISH, say): Redis
            # keeps what the script wrote before it, so a push may be stored.  A refused
            # write (OOM, READONLY, ...) is refused at a script's first write, the state it
            # hangs on cannot change while a script runs; and an error before the script
            # ran (NOSCRIPT, BUSY) names no script line.
            return StoreUncertain(f"queue {queue}: a Redis script failed part way: {exc}")
        return _refused(queue, exc)

    async def _pipeline(self, queue: str, commands: Sequence[Sequence[Any]]) -> list[Any]:
        replies = await self.router.pipeline(prefix_of(queue) + b"n", commands)
        for reply in replies:
            if isinstance(reply, ServerError):
                raise _refused(queue, reply)
        return replies

    async def _register(self, queue: str, topics: Sequence[str]) -> bool:
        """Remember (queue, topic) pairs so a job can be found by id alone; True when the
        push must list them in its queue's ``topics`` too (see redis_scripts.PUSH).  The
        caller marks them registered once the push has run.

        Said again every REGISTRY_REFRESH: a Redis restarted without persistence (or
        flushed) has forgotten them, and jobs pushed since could not be looked up by id.
        """
        now = trio.current_time()
        if now >= self._registered_until:
            self._registered.clear()
            self._registered_until = now + REGISTRY_REFRESH
        new = [t for t in topics if (queue, t) not in self._registered]
        if new:
            (added,) = await self.router.pipeline(
                _REGISTRY, [("SADD", _REGISTRY, *(f"{queue}/{t}" for t in new))]
            )
            if isinstance(added, ServerError) and added.code == "LOADING":
                # Waited for up to the call's timeout already: the push fails now, rather
                # than wait as long again for its script.
                raise _refused(queue, added)
            if queue not in self._seeded:
                await self._seed_topics(queue, topics)
        return bool(new)

    async def _seed_topics(self, queue: str, topics: Sequence[str]) -> None:
        """Add to the queue's ``topics`` set those of its topics only the global registry
        names: pushed to by a busgate from before the set, and since removed.  Once per
        queue: later pushes keep the set themselves."""
        (members,) = await self.router.pipeline(_REGISTRY, [("SMEMBERS", _REGISTRY)])
        if isinstance(members, ServerError):
            return  # the registry only helps here: the push goes on without it
        named = set(topics)
        older = set()
        for member in members:
            owner, slash, topic = member.decode("utf-8", "replace").partition("/")
            if slash and owner == queue and topic and topic not in named:
                older.add(topic)
        if older:
            await self._pipeline(queue, [("SADD", prefix_of(queue) + b"topics", *sorted(older))])
        self._seeded.add(queue)

    # -- producers ----------------------------------------------------------------------------

    async def push(self, queue: str, routes: Sequence[Route], jobs: Sequence[NewJob]) -> PushResult:
        now = self._clock()
        all_topics = [name for name, _ in routes]
        register = await self._register(queue, all_topics)
        now_ms = round(now * 1000)
        # Every argument a str: hiredis packs an int at 4x the cost, and this is per job.
        # "+" before the topic count: add them to the queue's list of topics.
        count = ("+" if register else "") + str(len(all_topics))
        args: list[Any] = [count, *all_topics, str(len(jobs))]
        # Without filters every job goes to every topic: route once, not per job.
        everyone = all(f.accepts_all for _, f in routes)
        ids = []
        for job in jobs:
            # The PUSH script's arguments per job: id, topics, record, run time (see there).
            job_id = job.id or new_job_id(now)
            ids.append(job_id)
            if job.topic is not None:
                topic_args: tuple[str, ...] = ("1", job.topic)
            elif everyone:
                topic_args = _ALL_TOPICS
            else:
                topics = route(job.payload, routes)
                topic_args = (str(len(topics)), *topics)
            if job.id is not None:
                topic_args = ("!" + topic_args[0], *topic_args[1:])
            if job.run_at is not None and job.run_at > now:
                run_ms, run_stamp = round(job.run_at * 1000), _stamp(job.run_at)
            else:
                run_ms, run_stamp = now_ms, ""
            trace = bytes.fromhex(job.trace_id) if job.trace_id else new_trace()
            # One extend rather than an append per argument: this loop runs per job.
            args += (job_id, *topic_args, pack_record(job, now_ms, run_ms, trace), run_stamp)
        unconfirmed = None
        if self._wait is None:
            outcomes, ready, delayed = await self._eval(queue, scripts.PUSH, *args)
        else:
            (outcomes, ready, delayed), unconfirmed = await self._push_replicated(
                queue, args, self._wait
            )
        if register:
            self._registered.update((queue, t) for t in all_topics)
        for topic in ready:
            self.doorbells.ring(queue, topic.decode())
        for topic in delayed:
            self.timers.ring(queue, topic.decode())
        if unconfirmed is not None:  # stored on the master: delivered, but not acknowledged
            raise unconfirmed
        if not outcomes:  # each job stored to every topic named (PUSH leaves the list out)
            return PushResult(
                tuple(ids), (Pushed.STORED,) * len(ids), (len(all_topics),) * len(ids)
            )
        # map, not generators: two per job otherwise.
        return PushResult(
            tuple(ids),
            tuple(map(_PUSHED.__getitem__, outcomes[0::2])),
            tuple(map(int, outcomes[1::2])),
        )

    async def _push_replicated(
        self, queue: str, args: Sequence[Any], wait: tuple[str, str, str]
    ) -> tuple[Any, StoreUncertain | None]:
        """PUSH, then ``WAIT replicas ms`` on its connection in the same round trip: the
        script's reply, and the error to answer the producer with if fewer replicas than
        ``replicas`` confirmed it (the master has the jobs; a failover now could lose them)."""
        prefix = prefix_of(queue)
        try:
            reply, confirmed = await self.router.eval_then(
                prefix + ROUTE, scripts.PUSH, [prefix, *args], wait
            )
        except ServerError as exc:
            raise self._script_failed(queue, exc) from exc
        if isinstance(confirmed, int) and confirmed >= self.replicas:
            return reply, None
        if isinstance(confirmed, int):
            why = (
                f"only {confirmed} of {self.replicas} replicas confirmed it within"
                f" {self.replica_timeout:g}s (WAIT)"
            )
        else:  # an ACL user without +wait, say
            why = f"WAIT failed: {confirmed}"
        text = f"queue {queue}: stored on the master, but {why}; a failover now could lose it"
        self._unconfirmed += 1
        now = trio.current_time()
        if now >= self._unconfirmed_warned + UNCONFIRMED_WARNING_INTERVAL:
            log.warning(
                "push not confirmed by replicas, answered as possibly stored: %s"
                " (%d such pushes since the last warning)",
                text,
                self._unconfirmed,
            )
            self._unconfirmed, self._unconfirmed_warned = 0, now
        return reply, StoreUncertain(text)

    async def depth(self, queue: str, topics: Sequence[str]) -> int:
        prefix = prefix_of(queue)
        commands = [
            ("LLEN", prefix + f"r:{topic}:{int(p)}".encode()) for topic in topics for p in Priority
        ]
        return sum(await self._pipeline(queue, commands)) if commands else 0

    # -- dispatchers --------------------------------------------------------------------------

    async def reserve(self, queue: str, topic: str, limit: int, lease: float) -> list[Job]:
        key = (queue, topic)
        if self._unanswered:
            await self._unreserve(queue, topic)
        # get, not setdefault: that would build a scheduler on every call to throw away.
        scheduler = self._schedulers.get(key)
        if scheduler is None:
            scheduler = self._schedulers[key] = PriorityScheduler()
        # The previous reserve returned the ready counts per priority: under load, plan from
        # those rather than spend a round trip asking again.  Ask only when there are none,
        # or the topic was empty last time (then a push woke us).
        counts = self._ready_counts.get(key)
        cached = counts is not None and any(counts)
        if counts is None or not cached:
            prefix = prefix_of(queue)
            counts = await self._pipeline(
                queue, [("LLEN", prefix + f"r:{topic}:{int(p)}".encode()) for p in Priority]
            )
        plan = scheduler.plan(dict(zip(Priority, counts, strict=True)), limit)
        if not plan:
            self._ready_counts[key] = [0, 0, 0]
            return []
        if cached and len(plan) < limit:
            # Jobs pushed since the last reserve are not in its counts: ask for the rest of
            # the limit too, which RESERVE takes from the highest priority that has jobs.  (A
            # full plan from those counts may still pass over a priority that had none: for
            # this call only.)
            plan += [Priority.HIGH] * (limit - len(plan))
        lease_until, token = self._clock() + lease, new_lease()
        stamp = _stamp(lease_until)
        try:
            rows, fresh_counts, lost = await self._eval(
                queue,
                scripts.RESERVE,
                topic,
                stamp,
                "".join([_PRIORITY_ARGS[p] for p in plan]),
                token,
            )
        except StoreUncertain:
            # Redis may have run it (the connection broke, or no answer came in time): the
            # jobs would stay leased to nobody until the lease ran out, an attempt spent for
            # a delivery that never started (dead at max_attempts: 1).  Given back by the
            # next reserve, not now: a Redis that stalled may not have run it yet.
            pending = self._unanswered.setdefault(key, [])
            pending.append((stamp, token))
            del pending[:-MAX_UNANSWERED]
            raise
        self._ready_counts[key] = [int(n) for n in fresh_counts]
        if lost:
            self._warn_lost(queue, topic, lost)
        jobs = []
        malformed: list[Job] = []
        fields = iter(rows)  # flat: id, record, attempt, run_at for each job
        for job_id, raw, attempt, run_at in zip(fields, fields, fields, fields, strict=True):
            try:
                record = unpack_record(raw)
            except _MALFORMED:
                malformed.append(
                    Job(
                        job_id.decode(),
                        queue,
                        topic,
                        raw,
                        {},
                        Priority.NORMAL,
                        int(attempt),
                        0.0,
                        0.0,
                        "",
                        lease_until,
                        token,
                    )
                )
                continue
            # Positional, in Job's field order: keywords cost a third more, once per job.
            jobs.append(
                Job(
                    job_id.decode(),
                    queue,
                    topic,
                    record.payload,
                    record.attributes,
                    record.priority,
                    int(attempt),
                    record.enqueued_at,
                    float(run_at) if run_at else record.run_at,
                    record.trace_id,
                    lease_until,
                    token,
                )
            )
        if malformed:
            await self._bury_malformed(malformed)
        return jobs

    async def _bury_malformed(self, jobs: Sequence[Job]) -> None:
        """Dead-letter jobs whose record busgate did not write: delivered, they would stop the
        daemon (and every restart would reserve them again).  The raw record stays, to read."""
        now = self._clock()
        error = "its record in Redis is malformed (not written by busgate): never delivered"
        finishes = [
            Finish(job, Attempt(job.attempt, now, 0.0, Outcome.DEAD, error=error), Outcome.DEAD)
            for job in jobs
        ]
        try:
            await self.finish(finishes)
        except StoreError as exc:  # the lease runs out, and the next reserve tries again
            log.error("could not dead-letter jobs with a malformed record: %s", exc)
            return
        for job in jobs:
            log.error(
                "queue %s topic %s job %s: %s; dead-lettered", job.queue, job.topic, job.id, error
            )

    async def _unreserve(self, queue: str, topic: str) -> None:
        """Give back what the topic's unanswered reserves leased (see ``reserve``)."""
        pending = self._unanswered.pop((queue, topic), None)
        if pending is None:  # another topic's (one a reload removed, say): nothing to ask
            return
        now = self._clock()
        # A lease run out is RECOVER's (an attempt spent): it may have been reserved again.
        pending = [(stamp, token) for stamp, token in pending if float(stamp) > now]
        if not pending:
            return
        try:
            released = int(
                await self._eval(queue, scripts.UNRESERVE, topic, *chain.from_iterable(pending))
            )
        except StoreUnavailable:
            # Redis is away again (or did not answer this either: giving back twice is
            # harmless).  The reserve would fail the same way.
            self._unanswered.setdefault((queue, topic), pending)
            raise
        except StoreError as exc:
            log.warning(
                "queue %s topic %s: the jobs of a reserve whose answer was lost could not be"
                " given back (%s): they return when their lease runs out",
                queue,
                topic,
                exc,
            )
            return
        if released:
            self.doorbells.ring(queue, topic)
            log.warning(
                "queue %s topic %s: the answer to a reserve was lost; the %d jobs it leased"
                " are back in line, no attempt spent",
                queue,
                topic,
                released,
            )

    def _warn_lost(self, queue: str, topic: str, lost: int) -> None:
        self._lost += lost
        now = trio.current_time()
        if now >= self._lost_warned + LOST_WARNING_INTERVAL:
            log.warning(
                "queue %s topic %s: %d ready jobs had no record in Redis and were dropped"
                " (%d in all since the last warning): they were lost from Redis, evicted"
                " (maxmemory-policy) or deleted outside busgate",
                queue,
                topic,
                lost,
                self._lost,
            )
            self._lost, self._lost_warned = 0, now

    async def finish(self, items: Sequence[Finish]) -> list[bool]:
        now = self._clock()
        groups: dict[tuple[str, str], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault((item.job.queue, item.job.topic), []).append(index)
        recorded = [False] * len(items)
        for (queue, topic), indexes in groups.items():
            args: list[Any] = [topic, _stamp(now)]
            for index in indexes:
                item = items[index]
                attempt = item.attempt
                outcome = item.outcome
                # All strings: hiredis packs an int argument at 4x the cost of a str.
                args += [
                    item.job.id,
                    str(item.job.attempt),
                    item.job.lease,
                    # The FINISH kinds are the outcome values.  ``_value_`` is the plain
                    # attribute behind ``value`` (a property), and a dict keyed by an Enum
                    # hashes through a Python-level __hash__: this is once per job.
                    outcome._value_ if item.spend or outcome is not _RETRY else _RETRY_UNSPENT,
                    # The end of the job's new state line: "status|error".  Attempts
                    # follow that line, so the error there must not break it.
                    ("" if attempt.status is None else str(attempt.status))
                    + "|"
                    + (attempt.error.replace("\n", " ") if attempt.error else ""),
                    encode_attempt(attempt),
                ]
                if outcome is _RETRY:
                    args.append(_stamp(item.run_at))
            results = await self._eval(queue, scripts.FINISH, *args)
            for index, result in zip(indexes, results, strict=True):
                recorded[index] = bool(result)
            if 1 in results:
                self.doorbells.ring(queue, topic)
            if 2 in results:
                self.timers.ring(queue, topic)
        return recorded

    async def extend(self, job: Job, lease: float) -> bool:
        extended = await self._eval(
            job.queue,
            scripts.EXTEND,
            job.topic,
            job.id,
            job.attempt,
            job.lease,
            _stamp(self._clock() + lease),
        )
        return bool(extended)

    async def release(self, jobs: Sequence[Job]) -> int:
        groups: dict[tuple[str, str], list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.queue, job.topic), []).append(job)
        released = 0
        for (queue, topic), group in groups.items():
            args = [topic]
            for job in group:
                args += [job.id, str(job.attempt), job.lease]
            count = int(await self._eval(queue, scripts.RELEASE, *args))
            if count:
                self.doorbells.ring(queue, topic)
            released += count
        return released

    # -- maintenance --------------------------------------------------------------------------

    async def recover_expired(self, queue: str, topic: str, max_attempts: int) -> Due:
        count, first, jobs = await self._eval(
            queue, scripts.RECOVER, topic, _stamp(self._clock()), max_attempts, MAINTENANCE_BATCH
        )
        if count:
            self.doorbells.ring(queue, topic)
        expired = tuple(
            Expiry(jobs[i].decode(), int(jobs[i + 1]), jobs[i + 2] == 1)
            for i in range(0, len(jobs), 3)
        )
        return Due(int(count), float(first) if first else None, expired)

    async def promote_due(self, queue: str, topic: str) -> Due:
        count, first = await self._eval(
            queue, scripts.PROMOTE, topic, _stamp(self._clock()), MAINTENANCE_BATCH
        )
        if count:
            self.doorbells.ring(queue, topic)
        return Due(int(count), float(first) if first else None)

    async def _prune_some(
        self, queue: str, topic: str, done: Retention, dead: Retention, limit: int
    ) -> int:
        removed = await self._eval(
            queue,
            scripts.PRUNE,
            topic,
            _stamp(self._clock()),
            limit,
            done.max_count,
            done.max_age,
            dead.max_count,
            dead.max_age,
        )
        return int(removed)

    # -- operators ----------------------------------------------------------------------------

    async def stats(self, queue: str, topic: str) -> TopicStats:
        (stats,) = await self.stats_many([(queue, topic)])
        return stats

    async def stats_many(self, topics: Sequence[tuple[str, str]]) -> list[TopicStats]:
        batches = []
        for queue, topic in topics:
            prefix = prefix_of(queue)

            def key(suffix: str, prefix: bytes = prefix) -> bytes:
                return prefix + suffix.encode()

            batches.append(
                (
                    key("n"),
                    [
                        *(("LLEN", key(f"r:{topic}:{int(p)}")) for p in Priority),
                        ("ZCARD", key(f"d:{topic}")),
                        ("ZCARD", key(f"l:{topic}")),
                        ("ZCARD", key(f"x:{topic}")),
                        ("ZCARD", key(f"c:{topic}")),
                        ("HGETALL", key(f"n:{topic}")),
                        ("HGET", key("n"), "unmatched"),
                    ],
                )
            )
        results = await self.router.pipelines(batches)
        out = []
        for (queue, topic), replies in zip(topics, results, strict=True):
            for reply in replies:
                if isinstance(reply, ServerError):
                    raise StoreUnavailable(f"queue {queue}: Redis refused: {reply}")
            r0, r1, r2, delayed, leased, dead, done, counter_list, unmatched = replies
            counters = {
                counter_list[i].decode(): int(counter_list[i + 1])
                for i in range(0, len(counter_list), 2)
            }
            out.append(
                TopicStats(
                    queue=queue,
                    topic=topic,
                    ready=r0 + r1 + r2,
                    delayed=delayed,
                    leased=leased,
                    dead=dead,
                    done=done,
                    pushed_total=counters.get("pushed", 0),
                    done_total=counters.get("done", 0),
                    retried_total=counters.get("retried", 0),
                    dead_total=counters.get("dead", 0),
                    expired_total=counters.get("expired", 0),
                    replayed_total=counters.get("replayed", 0),
                    unmatched_total=int(unmatched or 0),
                )
            )
        return out

    async def topics(self) -> list[tuple[str, str]]:
        # The registry pushes keep (see _register): what get_job looks a job up in.
        (members,) = await self.router.pipeline(_REGISTRY, [("SMEMBERS", _REGISTRY)])
        if isinstance(members, ServerError):
            raise StoreUnavailable(f"Redis refused: {members}")
        found = set()
        for member in members:
            queue, slash, topic = member.decode("utf-8", "replace").partition("/")
            if slash and queue and topic:  # anything else is not busgate's
                found.add((queue, topic))
        return sorted(found)

    async def get_job(self, job_id: str) -> list[JobRecord]:
        (members,) = await self.router.pipeline(_REGISTRY, [("SMEMBERS", _REGISTRY)])
        # With the topics this daemon pushes to and reserves from: a Redis that restarted
        # without its data has forgotten the registry, which pushes say again only at their
        # next refresh (REGISTRY_REFRESH), and jobs pushed meanwhile must be found.
        pairs = {tuple(member.decode().partition("/")[::2]) for member in members}
        pairs |= self._registered | self._schedulers.keys()
        records = []
        for queue, topic in sorted(pairs):
            prefix = prefix_of(queue)
            raw, state, delayed_at = await self._pipeline(
                queue,
                [
                    ("HGET", prefix + f"J:{topic}".encode(), job_id),
                    ("HGET", prefix + f"S:{topic}".encode(), job_id),
                    ("ZSCORE", prefix + f"d:{topic}".encode(), job_id),
                ],
            )
            if raw is not None:
                parsed = None if state is None else _State.parse(state)
                history = state.partition(b"\n")[2] if state is not None else b""
                records.append(
                    _job_record(
                        job_id,
                        queue,
                        topic,
                        read_record(raw),
                        parsed,
                        delayed_at is not None,
                        history.split(b"\n") if history else [],
                    )
                )
        return records

    async def list_dead(
        self, queue: str, topic: str, where: DeadFilter, cursor: str | None, limit: int
    ) -> DeadPage:
        prefix = prefix_of(queue)
        after: list[str] = []
        if cursor is not None:
            # The score as Redis holds it (repr round-trips a float exactly), not _stamp's.
            died_at, job_id = parse_dead_cursor(cursor)
            after = [repr(died_at), job_id]
        entries = await self._eval(queue, scripts.DEAD_SCAN, topic, DEAD_SCAN_LIMIT, *after)
        candidates = [
            (entries[i].decode(), float(entries[i + 1])) for i in range(0, len(entries), 2)
        ]
        job_key, state_key = prefix + f"J:{topic}".encode(), prefix + f"S:{topic}".encode()
        ids = [job_id for job_id, _ in candidates]
        # States first, for every candidate: they decide status, error and time.  Records
        # carry the payload (up to max_payload each), so they are fetched only for jobs that
        # passed that, a few at a time: a page no longer holds the payloads of the whole scan.
        (states,) = await self._pipeline(queue, [("HMGET", state_key, *ids)]) if ids else ([],)
        by_state = replace(where, attribute=None)
        passed = [
            (job_id, died_at, state)
            for (job_id, died_at), raw in zip(candidates, states, strict=True)
            if raw is not None
            and by_state.matches((state := _State.parse(raw)).status, state.error, died_at, {})
        ]
        records: dict[str, bytes | None] = {}
        found: list[DeadJob] = []
        last: tuple[float, str] | None = None
        for index, (job_id, died_at, state) in enumerate(passed):
            if job_id not in records:
                # Without an attribute to check, each of these is on the page: no more.
                wanted = _DEAD_RECORDS if where.attribute else limit - len(found)
                chunk = [passed_id for passed_id, _, _ in passed[index : index + wanted]]
                (raws,) = await self._pipeline(queue, [("HMGET", job_key, *chunk)])
                records = dict(zip(chunk, raws, strict=True))
                del raws  # each record leaves with records.pop(): hold no other reference
            raw = records.pop(job_id)
            if raw is None:
                continue
            record = read_record(raw)
            if where.matches(state.status, state.error, died_at, record.attributes):
                found.append(
                    DeadJob(
                        job_id,
                        queue,
                        topic,
                        record.payload,
                        record.attributes,
                        state.attempt,
                        died_at,
                        state.status,
                        state.error,
                    )
                )
                if len(found) == limit:
                    last = (died_at, job_id)
                    break
        else:
            # The whole scan was read: the next page starts after its last candidate.
            if candidates:
                last_id, last_died = candidates[-1]
                last = (last_died, last_id)
        more = len(found) == limit or len(entries) // 2 == DEAD_SCAN_LIMIT
        return DeadPage(tuple(found), dead_cursor(*last) if more and last is not None else None)

    async def replay_dead(self, queue: str, topic: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        replayed = int(await self._eval(queue, scripts.REPLAY, topic, _stamp(self._clock()), *ids))
        if replayed:
            self.doorbells.ring(queue, topic)
        return replayed

    async def delete_dead(self, queue: str, topic: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        return int(await self._eval(queue, scripts.DELETE, topic, *ids))


def _refused(queue: str, reply: ServerError) -> StoreError:
    """An error reply to a call for ``queue``, as the store error callers see."""
    if reply.code == "LOADING":  # refused until the deadline: the routers wait for it
        return StoreLoading(
            f"queue {queue}: Redis is still loading its dataset into memory after a restart"
            f" (waited up to the store's timeout), nothing was done: {reply}"
        )
    return StoreUnavailable(f"queue {queue}: Redis refused: {reply}")


def _job_record(
    job_id: str,
    queue: str,
    topic: str,
    record: _Record,
    state: _State | None,
    delayed: bool,
    attempts: Sequence[bytes],
) -> JobRecord:
    if state is None:  # never reserved: ready, or waiting in the delayed set
        state = _State(State.DELAYED if delayed else State.READY, 0, None, None, None, None)
    return JobRecord(
        id=job_id,
        queue=queue,
        topic=topic,
        state=state.state,
        payload=record.payload,
        attributes=record.attributes,
        priority=record.priority,
        attempt=state.attempt,
        enqueued_at=record.enqueued_at,
        run_at=state.run_at or record.run_at,
        trace_id=record.trace_id,
        finished_at=state.finished_at,
        attempts=tuple(decode_attempt(raw) for raw in attempts),
    )
