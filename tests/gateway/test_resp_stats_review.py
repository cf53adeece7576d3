"""What INFO stats counts and what CLIENT LIST names, against a real redis-server 7.

Each case runs the same commands on the daemon and on the redis-server of the session, and
compares what changes: INFO's total_commands_processed and total_error_replies after each
command, the replies, and CLIENT LIST's cmd.  Redis counts a command as processed only when
it runs it: not one it refuses first (an unknown command or subcommand, the wrong number of
arguments), nor one MULTI queues until EXEC runs it; every error reply counts as one, those
inside EXEC's answer and a protocol error's included.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import hiredis
import pytest
import redis
import trio

from gateway.app import App
from gateway.resp import encode_command
from tests.gateway.test_group_commit import a_store_call_under_way
from tests.gateway.test_producer_protocol import QUEUES
from tests.gateway.test_resp_readiness_take import steps_while
from tests.support.daemon import running_daemon, write_config
from tests.support.redis import RedisServer


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


def daemon_port(app: App) -> int:
    return int(app.resp_address.rpartition(":")[2])


#: A reply as compared here: errors as ("-", message), at any depth.
Reply = object


def plain(reply: object) -> Reply:
    if isinstance(reply, hiredis.ReplyError):
        return ("-", str(reply))
    if isinstance(reply, list):
        return [plain(item) for item in reply]
    return reply


class Resp:
    """A RESP2 connection reading whole replies, errors as values (hiredis's reader)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = hiredis.Reader()

    @classmethod
    async def connect(cls, port: int) -> Resp:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def reply(self) -> Reply:
        with trio.fail_after(10):
            while (reply := self.reader.gets()) is False:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("the server closed the connection")
                self.reader.feed(data)
        return plain(reply)

    async def call(self, *args: str | int) -> Reply:
        await self.stream.send_all(encode_command(*args))
        return await self.reply()

    async def stats(self) -> tuple[int, int]:
        """INFO stats' (total_commands_processed, total_error_replies)."""
        info = await self.call("INFO", "stats")
        assert isinstance(info, bytes), info
        numbers = dict(re.findall(rb"^(\w+):(\d+)\r$", info, re.MULTILINE))
        return int(numbers[b"total_commands_processed"]), int(numbers[b"total_error_replies"])

    async def cmd_of(self, client_id: int) -> bytes:
        """CLIENT LIST's cmd for connection ``client_id``."""
        line = await self.call("CLIENT", "LIST", "ID", client_id)
        assert isinstance(line, bytes), line
        found = re.search(rb" cmd=(\S+) ", line)
        assert found is not None, line
        return found[1]


#: A step: a command sent on the connection under test, or bytes a new connection sends
#: before it reads until the server closes it.
Step = tuple[str | int, ...] | bytes


async def counted(port: int, steps: Sequence[Step]) -> list[tuple[Step, Reply, int, int]]:
    """Each step, its reply, and how much INFO's total_commands_processed and
    total_error_replies went up for it (the INFO asking is not counted: neither server
    counts an INFO in the reply it makes)."""
    actor, observer = await Resp.connect(port), await Resp.connect(port)
    results: list[tuple[Step, Reply, int, int]] = []
    try:
        for step in steps:
            processed, errors = await observer.stats()
            reply: Reply
            if isinstance(step, bytes):
                async with await trio.open_tcp_stream("127.0.0.1", port) as raw:
                    await raw.send_all(step)
                    received = b""
                    with trio.fail_after(10):
                        while data := await raw.receive_some(65536):
                            received += data
                    reply = received
            else:
                reply = await actor.call(*step)
            processed_after, errors_after = await observer.stats()
            # The INFO before counts once the INFO after is answered.
            results.append((step, reply, processed_after - processed - 1, errors_after - errors))
    finally:
        await actor.stream.aclose()
        await observer.stream.aclose()
    return results


async def compare(app: App, redis_server: RedisServer, steps: Sequence[Step]) -> None:
    """The daemon counts each step as redis-server does (replies may differ: the queue
    and key errors are each server's own)."""
    try:
        ours = await counted(daemon_port(app), steps)
        theirs = await counted(redis_server.port, steps)
    finally:
        redis_server.cli("DEL", "open", "nowhere")  # the keys the steps use (the session's)
    shown = "\n".join(
        f"{step!r}: busgate {o[2:]} {o[1]!r:.60}, redis {t[2:]} {t[1]!r:.60}"
        for step, o, t in zip(steps, ours, theirs, strict=True)
    )
    assert [o[2:] for o in ours] == [t[2:] for t in theirs], shown


# -- INFO stats -------------------------------------------------------------------------------


async def test_a_refused_command_is_an_error_reply_not_a_command_processed(
    app: App, redis_server: RedisServer
) -> None:
    await compare(
        app,
        redis_server,
        [
            ("PING",),
            ("NOSUCH", "a"),  # unknown
            ("LPUSH", "open"),  # the wrong number of arguments: refused by the push path
            ("PING", "a", "b"),  # PING's own check: it ran, and answered an error
            ("CLIENT", "NOSUCH"),  # unknown subcommand
            ("CLIENT", "GETNAME", "x"),  # a subcommand's wrong number of arguments
            ("COMMAND", "COUNT", "x"),
            ("CONFIG", "GET"),
            ("LPUSH", "open", "x"),
            ("RPUSH", "open", "y", "z"),
        ],
    )


async def test_multi_counts_the_commands_exec_runs_and_their_errors(
    app: App, redis_server: RedisServer
) -> None:
    # An error inside EXEC's answer on either server: busgate has no queue "nowhere", and
    # redis-server's key "nowhere" is not a list.
    redis_server.cli("SET", "nowhere", "x")
    await compare(
        app,
        redis_server,
        [
            ("MULTI",),
            ("LPUSH", "open", "a"),  # queued, not run
            ("PING",),
            ("LPUSH", "nowhere", "b"),
            ("EXEC",),  # runs three, one of which answers an error
            ("MULTI",),
            ("PING",),
            ("NOSUCH",),  # refused: EXEC discards the transaction
            ("EXEC",),
            ("MULTI",),
            ("ECHO", "x"),
            ("DISCARD",),  # ECHO never runs
            ("EXEC",),  # without MULTI
        ],
    )


async def test_a_protocol_error_is_an_error_reply(app: App, redis_server: RedisServer) -> None:
    await compare(
        app,
        redis_server,
        [
            b"*abc\r\n",  # a bad multibulk length
            b"*1\r\n$-5\r\n",  # a bad bulk length
            b"PING\r\n*1\r\n$4\r\nPING\r\n*x\r\n",  # two commands run, then the error
        ],
    )


# -- container commands -----------------------------------------------------------------------


async def test_subcommands_are_checked_before_they_run_as_redis_checks_them(
    app: App, redis_server: RedisServer
) -> None:
    """An unknown subcommand, or one with the wrong number of arguments, is refused as an
    unknown command is: the same error, no cmd in CLIENT LIST, and inside MULTI it is not
    queued but makes EXEC discard the transaction."""
    steps: list[tuple[str | int, ...]] = [
        ("COMMAND", "NOSUCH"),
        ("COMMAND", "COUNT", "x"),
        ("COMMAND", "GETKEYS", "lpush"),
        ("CONFIG", "NOSUCH"),
        ("CONFIG", "GET"),
        ("CLIENT", "NOSUCH"),
        ("CLIENT", "SETNAME"),
        ("MULTI",),
        ("CLIENT", "NOSUCH"),
        ("PING",),
        ("EXEC",),
    ]

    async def replies(port: int) -> list[tuple[Reply, bytes]]:
        client, observer = await Resp.connect(port), await Resp.connect(port)
        client_id = await client.call("CLIENT", "ID")
        assert isinstance(client_id, int)
        return [(await client.call(*step), await observer.cmd_of(client_id)) for step in steps]

    ours, theirs = await replies(daemon_port(app)), await replies(redis_server.port)
    assert ours == theirs
    discarded = ("-", "EXECABORT Transaction discarded because of previous errors.")
    assert ours[-1] == (discarded, b"exec")


# -- CLIENT LIST's cmd ------------------------------------------------------------------------


async def test_client_list_names_a_push_the_readiness_task_took(app: App) -> None:
    """A push the readiness task reads and hands to the store call under way, without a
    step of its connection's task (``RespServer._take``), is the connection's last command
    in CLIENT LIST, as soon as it is checked and once it is stored."""
    pushes, first, second = await a_store_call_under_way(app)
    second_id = int((await second.call("CLIENT", "ID"))[1:])
    observer = await Resp.connect(daemon_port(app))
    assert await observer.cmd_of(second_id) == b"client|id"
    assert await steps_while(app, pushes, second, encode_command("RPUSH", "held", "b")) == 0
    assert await observer.cmd_of(second_id) == b"rpush"
    pushes.gate.set()
    with trio.fail_after(5):
        assert await first.line() == b":1"
        assert await second.line() == b":1"
    assert pushes.calls == [[b"a"], [b"b"]]  # joined the call after the one under way
    assert await observer.cmd_of(second_id) == b"rpush"


#: A push (and LLEN) as redis-py sends it, to a key.
REDIS_PY_COMMANDS: dict[str, Callable[[redis.Redis, str], object]] = {
    "lpush": lambda client, key: client.lpush(key, "a"),
    "rpush": lambda client, key: client.rpush(key, "a", "b"),
    "zadd": lambda client, key: client.zadd(key, {"a": 1}),
    "xadd": lambda client, key: client.xadd(key, {"payload": "a"}),
    "llen": lambda client, key: client.llen(key),
}


@pytest.mark.parametrize("command", REDIS_PY_COMMANDS)
async def test_redis_py_sees_the_last_command_named_as_redis_names_it(
    command: str, app: App, redis_server: RedisServer
) -> None:
    def last_command(port: int, key: str) -> str:
        producer, observer = redis.Redis(port=port), redis.Redis(port=port)
        try:
            producer_id = producer.client_id()
            REDIS_PY_COMMANDS[command](producer, key)
            (listed,) = observer.client_list(client_id=[producer_id])
            return str(listed["cmd"])
        finally:
            producer.close()
            observer.close()

    key = f"stats-review-{command}"  # a key of its own on redis-server
    try:
        theirs = await trio.to_thread.run_sync(last_command, redis_server.port, key)
    finally:
        redis_server.cli("DEL", key)
    assert await trio.to_thread.run_sync(last_command, daemon_port(app), "open") == theirs
    assert theirs == command
