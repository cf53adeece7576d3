"""The Redis store: many hosts share one Redis (or Redis Cluster).

Every state change is one Lua script (``redis_scripts``) over the keys of one queue, which all
share the hash tag ``{queue}``.  Jobs are leased, never popped: a daemon that dies leaves
leases that expire and are recovered by any daemon.  A push PUBLISHes the topic on
``bg:{queue}:wake``; every daemon listens and rings its local doorbell, so an idle topic's
dispatcher reserves the job within milliseconds without polling.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from adapters.storage import redis_scripts as scripts
from adapters.storage.base import (
    DEAD_SCAN_LIMIT,
    Due,
    Retention,
    Route,
    Store,
    dead_cursor,
    parse_dead_cursor,
)
from adapters.storage.errors import StoreCorrupt, StoreUnavailable
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
    PushResult,
    State,
    TopicStats,
    new_job_id,
)
from adapters.storage.priority import PriorityScheduler
from adapters.storage.redis_client import Script, ServerError
from adapters.storage.redis_routing import Router

#: Jobs moved per maintenance script call (promotion, recovery, pruning).
_BATCH = 1000
_REGISTRY = b"bg:topics"
_WAKE_PATTERN = b"bg:{*}:wake"


def prefix_of(queue: str) -> bytes:
    return b"bg:{" + queue.encode() + b"}:"


def _stamp(value: float) -> str:
    return f"{value:.3f}"


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode()


def encode_attempt(attempt: Attempt) -> str:
    record: dict[str, Any] = {
        "n": attempt.attempt,
        "s": attempt.started_at,
        "d": attempt.duration,
        "o": attempt.outcome.value,
    }
    if attempt.status is not None:
        record["st"] = attempt.status
    if attempt.error:
        record["e"] = attempt.error
    if attempt.body:
        record["b"] = base64.b64encode(attempt.body).decode()
    if attempt.stderr:
        record["x"] = base64.b64encode(attempt.stderr).decode()
    return json.dumps(record, separators=(",", ":"))


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
    def __init__(self, router: Router, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.router = router
        self._clock = clock
        self._schedulers: dict[tuple[str, str], PriorityScheduler] = {}
        self._registered: set[tuple[str, str]] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.router.run)
            await nursery.start(self.router.listen, _WAKE_PATTERN, self._on_wake)
            task_status.started()

    def _on_wake(self, channel: bytes, data: bytes) -> None:
        # channel: bg:{queue}:wake; data: topic, or ~topic for a delayed job.
        queue = channel[4 : channel.rfind(b"}")].decode()
        topic = data.decode()
        if topic.startswith("~"):
            self.timers.ring(queue, topic[1:])
        else:
            self.doorbells.ring(queue, topic)

    async def aclose(self) -> None:
        await self.router.aclose()

    async def _eval(self, queue: str, script: Script, *args: Any) -> Any:
        prefix = prefix_of(queue)
        try:
            return await self.router.eval(prefix + b"n", script, [prefix, *args])
        except ServerError as exc:
            if exc.code == "WRONGTYPE":
                raise StoreCorrupt(f"queue {queue}: unexpected Redis data: {exc}") from exc
            raise StoreUnavailable(f"queue {queue}: Redis refused: {exc}") from exc

    async def _pipeline(self, queue: str, commands: Sequence[Sequence[Any]]) -> list[Any]:
        replies = await self.router.pipeline(prefix_of(queue) + b"n", commands)
        for reply in replies:
            if isinstance(reply, ServerError):
                raise StoreUnavailable(f"queue {queue}: Redis refused: {reply}")
        return replies

    async def _register(self, queue: str, topics: Sequence[str]) -> None:
        """Remember (queue, topic) pairs so a job can be found by id alone."""
        new = [t for t in topics if (queue, t) not in self._registered]
        if new:
            await self.router.pipeline(
                _REGISTRY, [("SADD", _REGISTRY, *(f"{queue}/{t}" for t in new))]
            )
            self._registered.update((queue, t) for t in new)

    # -- producers ----------------------------------------------------------------------------

    async def push(self, queue: str, routes: Sequence[Route], jobs: Sequence[NewJob]) -> PushResult:
        now = self._clock()
        all_topics = [name for name, _ in routes]
        await self._register(queue, all_topics)
        args: list[Any] = [_stamp(now), len(all_topics), *all_topics, len(jobs)]
        ids = []
        for job in jobs:
            job_id = job.id or new_job_id(now)
            ids.append(job_id)
            topics = [job.topic] if job.topic is not None else route(job.payload, routes)
            run_at = job.run_at if job.run_at is not None and job.run_at > now else now
            args += [job_id, "1" if job.id is not None else "0", len(topics), *topics]
            args += [
                job.payload,
                json.dumps(dict(job.attributes)) if job.attributes else "",
                int(job.priority),
                _stamp(run_at),
                job.trace_id or os.urandom(16).hex(),
            ]
        copies, unmatched, duplicates, ready, delayed = await self._eval(queue, scripts.PUSH, *args)
        for topic in ready:
            self.doorbells.ring(queue, topic.decode())
        for topic in delayed:
            self.timers.ring(queue, topic.decode())
        return PushResult(tuple(ids), int(copies), int(unmatched), int(duplicates))

    async def depth(self, queue: str, topics: Sequence[str]) -> int:
        prefix = prefix_of(queue)
        commands = [
            ("LLEN", prefix + f"r:{topic}:{int(p)}".encode()) for topic in topics for p in Priority
        ]
        return sum(await self._pipeline(queue, commands)) if commands else 0

    # -- dispatchers --------------------------------------------------------------------------

    async def reserve(self, queue: str, topic: str, limit: int, lease: float) -> list[Job]:
        prefix = prefix_of(queue)
        counts = await self._pipeline(
            queue, [("LLEN", prefix + f"r:{topic}:{int(p)}".encode()) for p in Priority]
        )
        scheduler = self._schedulers.setdefault((queue, topic), PriorityScheduler())
        plan = scheduler.plan(dict(zip(Priority, counts, strict=True)), limit)
        if not plan:
            return []
        lease_until = self._clock() + lease
        rows = await self._eval(
            queue, scripts.RESERVE, topic, _stamp(lease_until), "".join(str(int(p)) for p in plan)
        )
        return [
            Job(
                id=job_id.decode(),
                queue=queue,
                topic=topic,
                payload=payload,
                attributes=json.loads(attrs) if attrs else {},
                priority=Priority(int(priority)),
                attempt=int(attempt),
                enqueued_at=float(enqueued_at),
                run_at=float(run_at),
                trace_id=trace.decode(),
                lease_until=lease_until,
            )
            for job_id, payload, attrs, priority, attempt, enqueued_at, run_at, trace in rows
        ]

    async def ack(self, job: Job, attempt: Attempt) -> bool:
        return await self._finish(job, attempt, State.DONE, "done")

    async def bury(self, job: Job, attempt: Attempt) -> bool:
        return await self._finish(job, attempt, State.DEAD, "dead")

    async def _finish(self, job: Job, attempt: Attempt, state: State, counter: str) -> bool:
        done = await self._eval(
            job.queue,
            scripts.FINISH,
            job.topic,
            job.id,
            job.attempt,
            _stamp(self._clock()),
            "" if attempt.status is None else attempt.status,
            attempt.error or "",
            encode_attempt(attempt),
            int(state),
            counter,
        )
        return bool(done)

    async def retry(self, job: Job, attempt: Attempt, run_at: float, *, spend: bool = True) -> bool:
        result = await self._eval(
            job.queue,
            scripts.RETRY,
            job.topic,
            job.id,
            job.attempt,
            _stamp(self._clock()),
            _stamp(run_at),
            "1" if spend else "0",
            "" if attempt.status is None else attempt.status,
            attempt.error or "",
            encode_attempt(attempt),
        )
        if result == 1:
            self.doorbells.ring(job.queue, job.topic)
        elif result == 2:
            self.timers.ring(job.queue, job.topic)
        return bool(result)

    async def extend(self, job: Job, lease: float) -> bool:
        extended = await self._eval(
            job.queue,
            scripts.EXTEND,
            job.topic,
            job.id,
            job.attempt,
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
                args += [job.id, str(job.attempt)]
            count = int(await self._eval(queue, scripts.RELEASE, *args))
            if count:
                self.doorbells.ring(queue, topic)
            released += count
        return released

    # -- maintenance --------------------------------------------------------------------------

    async def recover_expired(self, queue: str, topic: str, max_attempts: int) -> Due:
        count, first = await self._eval(
            queue, scripts.RECOVER, topic, _stamp(self._clock()), max_attempts, _BATCH
        )
        if count:
            self.doorbells.ring(queue, topic)
        return Due(int(count), float(first) if first else None)

    async def promote_due(self, queue: str, topic: str) -> Due:
        count, first = await self._eval(
            queue, scripts.PROMOTE, topic, _stamp(self._clock()), _BATCH
        )
        if count:
            self.doorbells.ring(queue, topic)
        return Due(int(count), float(first) if first else None)

    async def prune(self, queue: str, topic: str, done: Retention, dead: Retention) -> int:
        removed = await self._eval(
            queue,
            scripts.PRUNE,
            topic,
            _stamp(self._clock()),
            _BATCH,
            done.max_count,
            done.max_age,
            dead.max_count,
            dead.max_age,
        )
        return int(removed)

    # -- operators ----------------------------------------------------------------------------

    async def stats(self, queue: str, topic: str) -> TopicStats:
        prefix = prefix_of(queue)

        def key(suffix: str) -> bytes:
            return prefix + suffix.encode()

        replies = await self._pipeline(
            queue,
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
        r0, r1, r2, delayed, leased, dead, done, counter_list, unmatched = replies
        counters = {
            counter_list[i].decode(): int(counter_list[i + 1])
            for i in range(0, len(counter_list), 2)
        }
        return TopicStats(
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

    async def get_job(self, job_id: str) -> list[JobRecord]:
        (members,) = await self.router.pipeline(_REGISTRY, [("SMEMBERS", _REGISTRY)])
        records = []
        for member in sorted(members):
            queue, _, topic = member.decode().partition("/")
            prefix = prefix_of(queue)
            fields, attempts = await self._pipeline(
                queue,
                [
                    ("HGETALL", prefix + f"j:{topic}:{job_id}".encode()),
                    ("LRANGE", prefix + f"h:{topic}:{job_id}".encode(), 0, -1),
                ],
            )
            if fields:
                records.append(_job_record(job_id, queue, topic, _pairs(fields), attempts))
        return records

    async def list_dead(
        self, queue: str, topic: str, where: DeadFilter, cursor: str | None, limit: int
    ) -> DeadPage:
        prefix = prefix_of(queue)
        dead_key = prefix + f"x:{topic}".encode()
        top = "+inf"
        after: tuple[float, str] | None = None
        if cursor is not None:
            after = parse_dead_cursor(cursor)
            top = _stamp(after[0])
        (entries,) = await self._pipeline(
            queue,
            [
                (
                    "ZREVRANGEBYSCORE",
                    dead_key,
                    top,
                    "-inf",
                    "WITHSCORES",
                    "LIMIT",
                    0,
                    DEAD_SCAN_LIMIT,
                )
            ],
        )
        candidates = [
            (entries[i].decode(), float(entries[i + 1])) for i in range(0, len(entries), 2)
        ]
        if after is not None:
            # Same score as the cursor: ids sort in reverse, so skip up to and including it.
            candidates = [
                (job_id, died)
                for job_id, died in candidates
                if died < after[0] - 0.0005 or job_id < after[1]
            ]
        details = (
            await self._pipeline(
                queue,
                [
                    ("HMGET", prefix + f"j:{topic}:{job_id}".encode(), "p", "a", "n", "ls", "le")
                    for job_id, _ in candidates
                ],
            )
            if candidates
            else []
        )
        found: list[DeadJob] = []
        last: tuple[float, str] | None = None
        for (job_id, died_at), (payload, attrs, attempt, status, error) in zip(
            candidates, details, strict=True
        ):
            last = (died_at, job_id)
            if payload is None:
                continue
            attributes = json.loads(attrs) if attrs else {}
            status_code = int(status) if status else None
            error_text = error.decode() if error else None
            if where.matches(status_code, error_text, died_at, attributes):
                found.append(
                    DeadJob(
                        job_id,
                        queue,
                        topic,
                        payload,
                        attributes,
                        int(attempt or 0),
                        died_at,
                        status_code,
                        error_text,
                    )
                )
                if len(found) == limit:
                    break
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


def _pairs(flat: Sequence[bytes]) -> Mapping[str, bytes]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


def _job_record(
    job_id: str, queue: str, topic: str, fields: Mapping[str, bytes], attempts: Sequence[bytes]
) -> JobRecord:
    finished = fields.get("f")
    return JobRecord(
        id=job_id,
        queue=queue,
        topic=topic,
        state=State(int(fields["s"])),
        payload=fields.get("p", b""),
        attributes=json.loads(fields["a"]) if fields.get("a") else {},
        priority=Priority(int(fields.get("r", b"1"))),
        attempt=int(fields.get("n", b"0")),
        enqueued_at=float(fields.get("e", b"0")),
        run_at=float(fields.get("t", b"0")),
        trace_id=_text(fields.get("tr")),
        finished_at=float(finished) if finished else None,
        attempts=tuple(decode_attempt(raw) for raw in attempts),
    )
