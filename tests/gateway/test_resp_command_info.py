"""COMMAND and INFO's errorstats, against a real redis-server 7.

COMMAND describes busgate's own commands as Redis describes the commands of the same name
(cluster-aware clients read it to find a command's key); INFO's default sections are
Redis's, errorstats counting error replies by code as Redis counts them.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
import trio

from gateway.app import App
from gateway.resp import encode_command
from gateway.resp_session import RespSession
from tests.gateway.test_producer_protocol import QUEUES
from tests.gateway.test_resp_stats_review import Resp, daemon_port
from tests.support.daemon import running_daemon, write_config
from tests.support.redis import RedisServer


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


async def raw_reply(port: int, *commands: tuple[str, ...]) -> bytes:
    """The bytes of the reply to ``commands``' last (those before it: HELLO)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        for command in commands[:-1]:
            await stream.send_all(encode_command(*command))
            await Resp(stream).reply()
        await stream.send_all(encode_command(*commands[-1]))
        received, reader = b"", hiredis.Reader()  # it reads RESP3 too: says when it is whole
        with trio.fail_after(10):
            while reader.gets() is False:
                data = await stream.receive_some(65536)
                assert data, "the server closed the connection"
                received += data
                reader.feed(data)
        return received


async def listing(server: Resp, *command: str) -> list[Any]:
    reply = await server.call(*command)
    assert isinstance(reply, list), reply
    return reply


#: Subcommands Redis 7.2 added, that the redis-server here may not have (7.0).
REDIS_72 = {b"client|setinfo"}

#: Commands Redis describes with nothing busgate lacks: no tips (request policies across
#: shards), no notes, no subcommands.  COMMAND INFO's bytes must be Redis's own.
SAME_BYTES = [
    "lpush",
    "rpush",
    "zadd",
    "llen",
    "echo",
    "select",
    "auth",
    "hello",
    "quit",
    "multi",
    "exec",
    "discard",
    "reset",
]


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_container_lists_its_subcommands_as_redis_does(
    app: App, redis_server: RedisServer, protocol: int
) -> None:
    """Redis sends a command's subcommands as an array, and none as an empty set (RESP3)."""
    hello = [("HELLO", "3")] if protocol == 3 else []
    empty = b"~0\r\n" if protocol == 3 else b"*0\r\n"
    # CONFIG: ACL categories, no tips, no key specs, then its five subcommands.
    config = b"+@slow\r\n" + empty + empty + b"*5\r\n*10\r\n"
    for port in (daemon_port(app), redis_server.port):
        assert config in await raw_reply(port, *hello, ("COMMAND", "INFO", "config")), port
        # PING: no key specs, no subcommands.
        assert (await raw_reply(port, *hello, ("COMMAND", "INFO", "ping"))).endswith(empty * 2)


@pytest.mark.parametrize("protocol", [2, 3])
async def test_command_info_is_redis_own_description(
    app: App, redis_server: RedisServer, protocol: int
) -> None:
    hello = [("HELLO", "3")] if protocol == 3 else []
    for name in SAME_BYTES:
        ours = await raw_reply(daemon_port(app), *hello, ("COMMAND", "INFO", name))
        theirs = await raw_reply(redis_server.port, *hello, ("COMMAND", "INFO", name))
        assert ours == theirs, name


async def test_every_command_is_described_with_redis_arity_flags_key_and_categories(
    app: App, redis_server: RedisServer
) -> None:
    ours, theirs = await Resp.connect(daemon_port(app)), await Resp.connect(redis_server.port)
    described = await listing(ours, "COMMAND")
    names = [entry[0] for entry in described]
    assert names == [name.lower() for name in RespSession.commands]
    assert await ours.call("COMMAND", "COUNT") == len(described) == 19
    for entry in described:
        (redis_entry,) = await listing(theirs, "COMMAND", "INFO", entry[0].decode())
        # name, arity, flags, first key, last key, key step, ACL categories
        assert entry[:7] == redis_entry[:7], entry[0]
        # Subcommands: each one busgate has is one Redis has, with the same arity.
        redis_subs = {sub[0]: sub[1] for sub in redis_entry[9]}
        for sub in entry[9]:
            assert redis_subs.get(sub[0], sub[1] if sub[0] in REDIS_72 else None) == sub[1], sub
    # Asked by name, in any case, subcommands too; an unknown name is a null in its place.
    for server in (ours, theirs):
        asked = await listing(server, "COMMAND", "INFO", "nosuch", "PING", "CLIENT|list", "x|y")
        nosuch, ping, client_list, none = asked
        assert nosuch is None and none is None
        assert ping[:2] == [b"ping", -1] and client_list[:2] == [b"client|list", -2]
    await ours.stream.aclose()
    await theirs.stream.aclose()


async def test_command_getkeys_names_the_queue_as_redis_names_the_key(
    app: App, redis_server: RedisServer
) -> None:
    ours, theirs = await Resp.connect(daemon_port(app)), await Resp.connect(redis_server.port)
    for command in [
        ("COMMAND", "GETKEYS", "LPUSH", "orders/email", "a", "b"),
        ("COMMAND", "GETKEYS", "rpush", "open", "a"),
        ("COMMAND", "GETKEYS", "ZADD", "open", "1", "a"),
        ("COMMAND", "GETKEYS", "XADD", "open", "*", "payload", "x"),
        ("COMMAND", "GETKEYS", "LLEN", "open"),
        ("COMMAND", "GETKEYSANDFLAGS", "LPUSH", "open", "a"),
        ("COMMAND", "GETKEYSANDFLAGS", "ZADD", "open", "1", "a"),
        ("COMMAND", "GETKEYSANDFLAGS", "LLEN", "open"),
        ("COMMAND", "GETKEYS", "PING"),  # no key
        ("COMMAND", "GETKEYS", "NOSUCH", "a"),  # unknown
        ("COMMAND", "GETKEYS", "LPUSH", "open"),  # the wrong number of arguments
    ]:
        assert await ours.call(*command) == await theirs.call(*command), command
    await ours.stream.aclose()
    await theirs.stream.aclose()


async def test_command_list_and_its_filters(app: App, redis_server: RedisServer) -> None:
    ours, theirs = await Resp.connect(daemon_port(app)), await Resp.connect(redis_server.port)
    listed = await listing(ours, "COMMAND", "LIST")
    assert b"lpush" in listed and b"client|list" in listed and b"command|getkeys" in listed
    assert len([name for name in listed if b"|" not in name]) == 19
    assert set(listed) - set(await listing(theirs, "COMMAND", "LIST")) <= REDIS_72
    assert await ours.call("COMMAND", "LIST", "FILTERBY", "PATTERN", "L*") == [b"lpush", b"llen"]
    transaction = await ours.call("COMMAND", "LIST", "FILTERBY", "ACLCAT", "transaction")
    assert transaction == [b"multi", b"exec", b"discard"]
    assert await ours.call("COMMAND", "LIST", "FILTERBY", "MODULE", "json") == []
    for bad in [("FILTERBY", "NOPE", "x"), ("FILTERBY", "PATTERN"), ("NOPE",)]:
        reply = await ours.call("COMMAND", "LIST", *bad)
        assert reply == await theirs.call("COMMAND", "LIST", *bad), bad
        assert reply == ("-", "ERR syntax error"), bad
    help_lines = await listing(ours, "COMMAND", "HELP")
    assert help_lines[0].startswith(b"COMMAND <subcommand>")
    assert await ours.call("COMMAND", "DOCS", "lpush") == []  # no hints for redis-cli
    await ours.stream.aclose()
    await theirs.stream.aclose()


async def test_redis_py_reads_the_command_table(app: App) -> None:
    def read() -> None:
        client = redis.Redis(port=daemon_port(app), decode_responses=True)
        try:
            table = client.command()
            assert table["lpush"]["arity"] == -3
            assert table["lpush"]["first_key_pos"] == 1
            assert "write" in table["lpush"]["flags"]
            assert table["ping"]["first_key_pos"] == 0
            assert client.command_getkeys("LPUSH", "open", "a") == ["open"]
            assert client.command_count() == 19
        finally:
            client.close()

    await trio.to_thread.run_sync(read)


async def test_config_get_maxclients_is_the_limit_info_reports(app: App) -> None:
    client = await Resp.connect(daemon_port(app))
    info = await client.call("INFO", "clients")
    assert isinstance(info, bytes)
    (maxclients,) = re.findall(rb"^maxclients:(\d+)\r$", info, re.MULTILINE)
    assert await client.call("CONFIG", "GET", "maxclients") == [b"maxclients", maxclients]
    await client.stream.aclose()


# -- INFO errorstats --------------------------------------------------------------------------


async def errorstats(server: Resp) -> dict[str, int]:
    info = await server.call("INFO", "errorstats")
    assert isinstance(info, bytes) and info.startswith(b"# Errorstats\r\n"), info
    return {code: int(n) for code, n in re.findall(r"errorstat_(\S+):count=(\d+)", info.decode())}


async def test_errorstats_counts_error_replies_by_code_as_redis_does(
    app: App, redis_server: RedisServer
) -> None:
    steps: list[tuple[str, ...] | bytes] = [
        ("NOSUCH",),  # ERR, refused before it runs
        ("PING", "a", "b"),  # ERR, from the command itself
        ("EXEC",),  # ERR EXEC without MULTI
        ("MULTI",),
        ("NOSUCH",),  # ERR, and EXEC is aborted:
        ("EXEC",),  # EXECABORT
        ("MULTI",),
        ("ECHO",),  # ERR, refused: the transaction is aborted
        ("DISCARD",),
        ("MULTI",),
        ("LPUSH", "nowhere", "x"),  # an error inside EXEC's answer (see below)
        ("EXEC",),
        b"*1\r\n$-5\r\n",  # a protocol error, on a connection of its own
    ]

    async def run(port: int) -> dict[str, int]:
        client, observer = await Resp.connect(port), await Resp.connect(port)
        before = await errorstats(observer)
        for step in steps:
            if isinstance(step, bytes):
                async with await trio.open_tcp_stream("127.0.0.1", port) as raw:
                    await raw.send_all(step)
                    with trio.fail_after(10):
                        while await raw.receive_some(65536):
                            pass
            else:
                await client.call(*step)
        after = await errorstats(observer)
        await client.stream.aclose()
        await observer.stream.aclose()
        return {code: n - before.get(code, 0) for code, n in after.items() if n != before.get(code)}

    # busgate has no queue "nowhere"; on redis-server, the key "nowhere" is not a list.
    redis_server.cli("SET", "nowhere", "x")
    try:
        theirs = await run(redis_server.port)
    finally:
        redis_server.cli("DEL", "nowhere")
    ours = await run(daemon_port(app))
    # The error inside EXEC is WRONGTYPE on Redis and ERR (unknown queue) on busgate.
    assert theirs == {"ERR": 6, "EXECABORT": 1, "WRONGTYPE": 1}
    assert ours == {"ERR": 7, "EXECABORT": 1}
