"""A push over its queue's size limits, inside MULTI, aborts the transaction whatever its size.

A payload over the parser's limit (the largest max_payload, plus 1 KiB of slack) was refused
while queueing, and EXEC stored nothing (EXECABORT); one a little over max_payload was
queued, and EXEC stored the rest of the transaction and answered that push with an error.
The same error had two outcomes: a client that retried the transaction on the second stored
its other jobs twice.  Now both are refused while queueing.  Errors other than a size (unknown
queue, NOAUTH) still come with EXEC's answer, as Redis answers runtime errors.  Real daemon;
redis-py's transaction pipeline and a raw socket as producers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis
import trio

from gateway.app import App
from gateway.producer import MAX_ATTRIBUTE_BYTES
from gateway.resp import encode_command
from tests.gateway.test_producer_protocol import Client
from tests.support.daemon import running_daemon, write_config

MAX_PAYLOAD = 100
#: The parser refuses a bulk argument longer than this before the session sees it
#: (max_payload of the largest queue + resp_server._PARSER_SLACK).
PARSER_LIMIT = MAX_PAYLOAD + 1024
#: Over max_payload and under the parser's limit (the sizes that were stored in part), then
#: over the parser's limit (refused while queueing already).
SIZES = (MAX_PAYLOAD + 1, PARSER_LIMIT, PARSER_LIMIT + 1, 200_000)


def queue(name: str, *, password: str | None = None) -> str:
    """A queue of MAX_PAYLOAD bytes a payload, with one paused topic: nothing is delivered."""
    login = f"password: {password}\n" if password else ""
    return (
        f"queue: {name}\n{login}max_payload: {MAX_PAYLOAD}\n"
        "topics:\n  t: {backend: 'fastcgi://127.0.0.1:9', script: /srv/app/index.php,"
        " paused: true}\n"
    )


QUEUES = {"q": queue("q"), "locked": queue("locked", password="s3cret")}

EXECABORT = b"-EXECABORT Transaction discarded because of previous errors."


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


async def pushed(app: App, queue: str = "q") -> int:
    assert app.store is not None
    return (await app.store.stats(queue, "t")).pushed_total


def client(app: App) -> redis.Redis:
    host, _, port = app.resp_address.rpartition(":")
    return redis.Redis(host=host, port=int(port), protocol=2)


#: A push of `payload` to queue q by each push command, as redis-py sends it in a pipeline.
Push = Callable[["redis.client.Pipeline", bytes], object]
PUSHES: dict[str, Push] = {
    "LPUSH": lambda pipe, payload: pipe.lpush("q", payload),
    "RPUSH": lambda pipe, payload: pipe.rpush("q", payload),
    "ZADD": lambda pipe, payload: pipe.zadd("q", {payload: 1}),
    "XADD": lambda pipe, payload: pipe.xadd("q", {"payload": payload}),
}


def transaction(app: App, push: Push, payload: bytes) -> list[object] | Exception:
    """MULTI, a valid push, `push` of `payload`, EXEC: EXEC's replies, or what it raised."""
    with client(app) as producer, producer.pipeline(transaction=True) as pipe:
        pipe.lpush("q", "ok")
        push(pipe, payload)
        try:
            replies: list[object] = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            return exc
        return replies


@pytest.mark.parametrize("command", list(PUSHES))
async def test_redis_py_transaction_with_a_payload_over_max_payload_stores_nothing(
    app: App, command: str
) -> None:
    for size in SIZES:
        outcome = await trio.to_thread.run_sync(transaction, app, PUSHES[command], b"x" * size)
        # redis-py raises the queueing error (the first), having read EXEC's EXECABORT.
        assert isinstance(outcome, redis.ResponseError), (size, outcome)
        assert f"payload of {size} bytes exceeds max_payload of {MAX_PAYLOAD} bytes" in str(
            outcome
        ), size
        assert await pushed(app) == 0, size
    # A transaction of valid pushes is stored whole.
    outcome = await trio.to_thread.run_sync(transaction, app, PUSHES[command], b"x" * MAX_PAYLOAD)
    reply = bytes if command == "XADD" else int  # a job id, or a count of jobs
    assert isinstance(outcome, list) and outcome[0] == 1 and isinstance(outcome[1], reply)
    assert await pushed(app) == 2


async def test_xadd_attributes_over_their_limit_abort_the_transaction(app: App) -> None:
    # Each attribute is under the parser's limit; together they are over MAX_ATTRIBUTE_BYTES.
    count = MAX_ATTRIBUTE_BYTES // 1000 + 1
    fields = {"payload": b"p", **{f"a{i}": "v" * 1000 for i in range(count)}}
    outcome = await trio.to_thread.run_sync(
        transaction, app, lambda pipe, _: pipe.xadd("q", fields), b""
    )
    assert isinstance(outcome, redis.ResponseError), outcome
    assert f"exceed the limit of {MAX_ATTRIBUTE_BYTES} bytes" in str(outcome)
    assert await pushed(app) == 0


class Wire(Client):
    """A raw RESP connection that sends a pipelined run of commands at once."""

    async def lines(self, count: int, *commands: tuple[str | bytes, ...]) -> list[bytes]:
        await self.stream.send_all(b"".join(encode_command(*c) for c in commands))
        with trio.fail_after(10):
            return [await self.line() for _ in range(count)]


@pytest.mark.parametrize("size", SIZES)
async def test_raw_transaction_aborts_at_any_size_over_max_payload(app: App, size: int) -> None:
    wire = await Wire.connect(app)
    replies = await wire.lines(
        4, ("MULTI",), ("LPUSH", "q", "ok"), ("LPUSH", "q", b"x" * size), ("EXEC",)
    )
    assert replies[:2] == [b"+OK", b"+QUEUED"]
    assert replies[2].startswith(
        b"-ERR payload of %d bytes exceeds max_payload of %d bytes" % (size, MAX_PAYLOAD)
    )
    assert replies[3] == EXECABORT
    assert await pushed(app) == 0
    # The connection serves on, its transaction over.
    assert await wire.lines(1, ("LPUSH", "q", "after")) == [b":1"]
    assert await pushed(app) == 1


async def test_raw_transaction_checks_each_payload_of_each_push(app: App) -> None:
    wire = await Wire.connect(app)
    over = b"x" * (MAX_PAYLOAD + 1)
    replies = await wire.lines(
        6,
        ("MULTI",),
        ("RPUSH", "q", "a", "b", over),  # the third payload of a push
        ("ZADD", "q", "NX", "1", "a", "2", over),  # past ZADD's flags, the second pair
        ("XADD", "q", "MAXLEN", "~", "10", "*", "payload", over, "k", "v"),  # past its options
        ("XADD", "q", "*", "PAYLOAD", over),  # field names without case, as the push reads them
        ("EXEC",),
    )
    assert replies[0] == b"+OK"
    for reply in replies[1:5]:
        assert reply.startswith(b"-ERR payload of 101 bytes exceeds max_payload of 100"), replies
    assert replies[5] == EXECABORT
    assert await pushed(app) == 0


async def test_other_errors_still_come_with_exec(app: App) -> None:
    # An unknown queue, a missing login, a malformed push: each push runs at EXEC, whose
    # answer carries its error; the others are stored.  (Redis queues such commands too.)
    wire = await Wire.connect(app)
    replies = await wire.lines(
        8,
        ("MULTI",),
        ("LPUSH", "nowhere", b"x" * (MAX_PAYLOAD + 1)),
        ("LPUSH", "locked", b"x" * (MAX_PAYLOAD + 1)),  # NOAUTH, not the queue's limit
        ("ZADD", "q", "NX", "1"),
        ("LPUSH", "q", "ok"),
        ("EXEC",),
    )
    assert replies[:5] == [b"+OK"] + [b"+QUEUED"] * 4
    assert replies[5:] == [
        b"*4",
        b"-ERR unknown queue 'nowhere'",
        b"-NOAUTH Authentication required.",
    ]
    assert await wire.lines(2) == [b"-ERR syntax error", b":1"]
    assert await pushed(app) == 1
    # Before a login, a queue's limits are not told: the push is queued, and EXEC, which
    # runs the AUTH first, answers its size error (the other push is stored, as for any
    # error Redis meets at EXEC).  Logged in before MULTI, it is refused while queueing.
    replies = await wire.lines(
        5,
        ("MULTI",),
        ("AUTH", "locked", "s3cret"),
        ("LPUSH", "locked", "ok"),
        ("LPUSH", "locked", b"x" * (MAX_PAYLOAD + 1)),
        ("EXEC",),
    )
    assert replies == [b"+OK", b"+QUEUED", b"+QUEUED", b"+QUEUED", b"*3"]
    assert await wire.lines(2) == [b"+OK", b":1"]
    (error,) = await wire.lines(1)
    assert error.startswith(b"-ERR payload of 101 bytes exceeds max_payload of 100")
    assert await pushed(app, "locked") == 1
    replies = await wire.lines(
        4,
        ("MULTI",),
        ("LPUSH", "locked", "ok"),
        ("LPUSH", "locked", b"x" * (MAX_PAYLOAD + 1)),
        ("EXEC",),
    )
    assert replies[:2] == [b"+OK", b"+QUEUED"]
    assert replies[2].startswith(b"-ERR payload of 101 bytes exceeds max_payload of 100")
    assert replies[3] == EXECABORT
    assert await pushed(app, "locked") == 1
