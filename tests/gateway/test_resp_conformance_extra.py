"""Redis conformance of the connection commands: HELLO's options, INFO's sections, CLIENT
INFO/LIST, RESET, and the error for a command with too many arguments.

Each case is what redis-server 7 answers (HELLO checks all its options before applying any
since 7.2), against the daemon with raw sockets, redis-py and redis-cli.  The argument limit
is busgate's own: redis-server 7 takes more than 1,048,576 arguments in a command.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import trio

from gateway.app import App
from gateway.resp import encode_command
from tests.gateway.test_clients import port_of, require_tool
from tests.gateway.test_producer_protocol import QUEUES, Client
from tests.support.daemon import running_daemon, write_config

INFO_SECTIONS = [
    "Server",
    "Clients",
    "Memory",
    "Persistence",
    "Stats",
    "Replication",
    "CPU",
    "Modules",
    "Errorstats",
    "Cluster",
    "Keyspace",
]


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


async def bulk(client: Client, *command: bytes | str | int) -> bytes:
    """Send ``command``; the bulk string (or RESP3 verbatim string) it is answered with."""
    header = await client.call(*command)
    assert header[:1] in (b"$", b"="), header
    size = int(header[1:])
    while len(client.buffer) < size + 2:
        client.buffer += await client.stream.receive_some(65536)
    body, client.buffer = client.buffer[:size], client.buffer[size + 2 :]
    return body[4:] if header[:1] == b"=" else body  # a verbatim string starts "txt:"


async def hello_map(client: Client, *options: str) -> bytes:
    """HELLO 3 with ``options``: the first line of its answer, the rest read and checked."""
    first = await client.call("HELLO", 3, *options)
    if first == b"%7":
        # 7 keys (2 lines each), 4 bulk string values (2 each) and 3 one-line values.
        rest = [await client.line() for _ in range(14 + 8 + 3)]
        assert rest[2:4] == [b"$7", b"busgate"] and b":3" in rest, rest
    return first


# -- HELLO ------------------------------------------------------------------------------------


async def test_a_refused_hello_changes_nothing(app: App) -> None:
    client = await Client.connect(app)
    # An unknown option after a good password: the login is not kept, nor RESP3.
    assert await client.call("HELLO", 3, "AUTH", "orders", "s3cret", "BADOPT") == (
        b"-ERR Syntax error in HELLO option 'BADOPT'"
    )
    assert await client.call("LPUSH", "orders", "x") == b"-NOAUTH Authentication required."
    assert await client.call("CLIENT", "GETNAME") == b"$-1"  # RESP2's null: still RESP2
    # A wrong password after SETNAME: the name is not kept either.
    assert (await client.call("HELLO", 3, "SETNAME", "early", "AUTH", "orders", "no")).startswith(
        b"-WRONGPASS"
    )
    assert await client.call("CLIENT", "GETNAME") == b"$-1"
    # A bad name after a good password: refused before the login is tried.
    assert await client.call("HELLO", 3, "AUTH", "orders", "s3cret", "SETNAME", "two words") == (
        b"-ERR Client names cannot contain spaces, newlines or special characters."
    )
    assert await client.call("LPUSH", "orders", "x") == b"-NOAUTH Authentication required."
    assert (
        await client.call("HELLO", 3, "SETNAME") == b"-ERR Syntax error in HELLO option 'SETNAME'"
    )
    assert await client.call("HELLO", -1) == b"-NOPROTO unsupported protocol version"
    assert await client.call("HELLO", "03") == (
        b"-ERR Protocol version is not an integer or out of range"
    )
    assert await client.call("PING") == b"+PONG"  # RESP2 all along
    # All good: everything applies at once.
    assert await hello_map(client, "AUTH", "orders", "s3cret", "SETNAME", "good") == b"%7"
    assert await client.call("LPUSH", "orders", "x") == b":1"
    assert await bulk(client, "CLIENT", "GETNAME") == b"good"
    assert await client.call("CLIENT", "SETNAME", "") == b"+OK"  # "" removes the name
    assert await client.call("CLIENT", "GETNAME") == b"_"  # RESP3's null


# -- INFO -------------------------------------------------------------------------------------


def titles(info: bytes) -> list[str]:
    return re.findall(r"^# (\w+)\r$", info.decode(), re.MULTILINE)


def fields(info: bytes) -> dict[str, str]:
    return dict(re.findall(r"^(\w+):(.*)\r$", info.decode(), re.MULTILINE))


def resident_bytes() -> int:
    """This process's resident size: the daemon runs in it."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_info_answers_the_sections_asked_for(app: App) -> None:
    client = await Client.connect(app)
    for asked in [(), ("default",), ("all",), ("everything",), ("ALL", "server")]:
        assert titles(await bulk(client, "INFO", *asked)) == INFO_SECTIONS, asked
    server = await bulk(client, "INFO", "server")
    assert titles(server) == ["Server"]
    assert server.startswith(b"# Server\r\nredis_version:7.2.0\r\n") and server.endswith(b"\r\n")
    assert fields(server)["process_id"] == str(os.getpid())
    assert fields(server)["tcp_port"] == app.resp_address.rpartition(":")[2]
    # Several sections, in Redis's order whatever the order asked, each once, a blank line
    # between them; an unknown one adds nothing.
    several = await bulk(client, "INFO", "keyspace", "Clients", "clients", "nosuch")
    assert titles(several) == ["Clients", "Keyspace"]
    assert b"\r\n\r\n# Keyspace\r\nqueue0:name=" in several
    assert not several.endswith(b"\r\n\r\n")
    assert await bulk(client, "INFO", "nosuch") == b""
    assert await bulk(client, "INFO", "commandstats") == b""  # a Redis section busgate lacks


async def test_info_numbers_are_the_daemons_own(app: App) -> None:
    client = await Client.connect(app)
    others = [await Client.connect(app) for _ in range(2)]
    assert (
        await others[0].call("NOSUCH")
        == b"-ERR unknown command 'NOSUCH', with args beginning with: "
    )
    assert await others[1].call("PING") == b"+PONG"
    before = fields(await bulk(client, "INFO", "clients", "stats"))
    assert before["connected_clients"] == "3"
    assert before["blocked_clients"] == "0"
    assert before["maxclients"] == "10000"
    assert before["total_connections_received"] == "3"
    assert before["total_error_replies"] == "1"
    for _ in range(3):
        assert await client.call("PING") == b"+PONG"
    after = fields(await bulk(client, "INFO", "stats"))
    # The first INFO, then three PINGs, counted; not the INFO answering.
    assert int(after["total_commands_processed"]) == int(before["total_commands_processed"]) + 4
    await others[1].stream.aclose()
    with trio.fail_after(5):
        while fields(await bulk(client, "INFO", "clients"))["connected_clients"] != "2":
            await trio.sleep(0.01)
    memory = fields(await bulk(client, "INFO", "memory"))
    # used_memory is the process's resident size: the same process as this test's.
    assert abs(int(memory["used_memory"]) - resident_bytes()) < resident_bytes() // 5
    assert re.fullmatch(r"\d+\.\d\dM", memory["used_memory_human"])
    assert int(memory["used_memory_peak"]) >= int(memory["used_memory"])
    assert "db0" not in fields(await bulk(client, "INFO", "keyspace"))  # no made-up key count


async def test_redis_cli_stat_reads_real_numbers(app: App) -> None:
    """``redis-cli --stat`` prints INFO's used_memory, connected_clients, blocked_clients,
    total_commands_processed and total_connections_received once per interval; a missing
    field comes out as -9223372036854775808."""
    cli = require_tool("redis-cli", "apt-get install redis-tools")
    stdbuf = require_tool("stdbuf", "apt-get install coreutils")  # its output is a pipe
    args = [stdbuf, "-oL", cli, "-p", str(port_of(app)), "--stat", "-i", "0.2"]
    process = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE)
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(10):
            while output.count(b"\n") < 4:  # two heading lines, two of numbers
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"redis-cli --stat exited: {output!r}"
                output += chunk
    finally:
        process.kill()
        await process.wait()
    heading, first, second = output.splitlines()[1:4]
    assert heading.split() == [b"keys", b"mem", b"clients", b"blocked", b"requests", b"connections"]
    for line in (first, second):
        _keys, mem, clients, blocked, _, _, connections = line.split()
        assert re.fullmatch(rb"\d+\.\d\dM", mem), output
        assert (clients, blocked, connections) == (b"1", b"0", b"1"), output
    # One INFO between the two lines: requests went up by one.
    assert int(second.split()[4]) == int(first.split()[4]) + 1, output


# -- CLIENT -----------------------------------------------------------------------------------

LINE = re.compile(
    rb"id=(\d+) addr=(\S+) laddr=(\S+) name=(\S*) age=(\d+) idle=(\d+) db=0 cmd=(\S+)"
    rb" resp=([23]) lib-name=(\S*) lib-ver=(\S*)\n"
)


async def test_client_list_shows_each_connection(app: App) -> None:
    first = await Client.connect(app)
    first_id = int((await first.call("CLIENT", "ID"))[1:])
    host, port = first.stream.socket.getsockname()[:2]
    assert await first.call("CLIENT", "SETNAME", "producer-1") == b"+OK"
    assert await first.call("CLIENT", "SETINFO", "LIB-NAME", "raw") == b"+OK"
    assert await first.call("CLIENT", "SETINFO", "lib-ver", "1.0") == b"+OK"
    own = await bulk(first, "CLIENT", "INFO")
    assert LINE.fullmatch(own), own
    expected = (
        f"id={first_id} addr={host}:{port} laddr={app.resp_address} name=producer-1"
        f" age=0 idle=0 db=0 cmd=client|info resp=2 lib-name=raw lib-ver=1.0\n"
    )
    assert re.sub(rb" age=\d+ ", b" age=0 ", own) == expected.encode()  # age: a slow machine
    assert await first.call("PING") == b"+PONG"
    await trio.sleep(1.1)

    def listed() -> tuple[list[dict[str, str]], dict[str, str | int]]:
        client = redis.Redis(port=port_of(app), protocol=3)  # CLIENT LIST as verbatim text
        try:
            return client.client_list(), client.client_info()
        finally:
            client.close()

    clients, info = await trio.to_thread.run_sync(listed)
    assert [int(c["id"]) for c in clients] == [first_id, info["id"]]  # oldest first
    assert clients[0] | {"age": "", "idle": ""} == {
        "id": str(first_id),
        "addr": f"{host}:{port}",
        "laddr": app.resp_address,
        "name": "producer-1",
        "age": "",
        "idle": "",
        "db": "0",
        "cmd": "ping",
        "resp": "2",
        "lib-name": "raw",
        "lib-ver": "1.0",
    }
    assert int(clients[0]["age"]) >= 1 and int(clients[0]["idle"]) >= 1
    # redis-py names itself with CLIENT SETINFO when it connects, and switched to RESP3.
    assert info["lib-name"] == "redis-py" and info["lib-ver"] == redis.__version__
    assert (info["cmd"], info["resp"], info["idle"]) == ("client|info", "3", 0)

    with trio.fail_after(5):  # redis-py's connection is closed; the server notices
        while app.resp is not None and app.resp.statistics().connections != 1:
            await trio.sleep(0.01)
    second = await Client.connect(app)
    assert (
        await second.call("NOSUCH") == b"-ERR unknown command 'NOSUCH', with args beginning with: "
    )
    everyone = await bulk(second, "CLIENT", "LIST")
    lines = [LINE.fullmatch(line + b"\n") for line in everyone.splitlines()]
    assert len(lines) == 2 and all(lines), everyone
    assert [m[7] for m in lines if m] == [b"ping", b"client|list"]
    only = await bulk(second, "CLIENT", "LIST", "ID", first_id, 10**9, first_id)
    assert only.count(b"name=producer-1 ") == 2 and len(only.splitlines()) == 2
    assert await bulk(second, "CLIENT", "LIST", "TYPE", "normal") != b""
    assert await bulk(second, "CLIENT", "LIST", "TYPE", "pubsub") == b""
    await first.stream.aclose()
    with trio.fail_after(5):
        while b"producer-1" in await bulk(second, "CLIENT", "LIST"):
            await trio.sleep(0.01)


async def test_client_errors_are_redis_errors(app: App) -> None:
    client = await Client.connect(app)
    await client.stream.send_all(
        encode_command("CLIENT", "NOSUCH")
        + encode_command("CLIENT", "GETNAME", "extra")
        + encode_command("CLIENT", "SETNAME", "two words")
        + encode_command("CLIENT", "SETNAME", "tab\there")
        + encode_command("CLIENT", "SETINFO", "lib-name", "a b")
        + encode_command("CLIENT", "SETINFO", "lib-colour", "red")
        + encode_command("CLIENT", "LIST", "TYPE", "nosuch")
        + encode_command("CLIENT", "LIST", "ID", "0")
        + encode_command("CLIENT", "LIST", "ID")
        + encode_command("CLIENT", "LIST", "nosuch")
        + encode_command("CLIENT")
        + encode_command("CLIENT", "HELP")
    )
    assert [await client.line() for _ in range(11)] == [
        b"-ERR unknown subcommand 'NOSUCH'. Try CLIENT HELP.",
        b"-ERR wrong number of arguments for 'client|getname' command",
        b"-ERR Client names cannot contain spaces, newlines or special characters.",
        b"-ERR Client names cannot contain spaces, newlines or special characters.",
        b"-ERR lib-name cannot contain spaces, newlines or special characters.",
        b"-ERR Unrecognized option 'lib-colour'",
        b"-ERR Unknown client type 'nosuch'",
        b"-ERR Invalid client ID",
        b"-ERR syntax error",
        b"-ERR syntax error",
        b"-ERR wrong number of arguments for 'client' command",
    ]
    count = int((await client.line())[1:])
    help_lines = [await client.line() for _ in range(count)]
    assert help_lines[0] == b"+CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"
    assert {b"+GETNAME", b"+ID", b"+INFO", b"+LIST [options ...]", b"+HELP"} <= set(help_lines)
    assert await client.call("CLIENT", "GETNAME") == b"$-1"  # nothing was set


# -- RESET ------------------------------------------------------------------------------------


async def test_reset_ends_the_transaction_logs_out_and_returns_to_resp2(app: App) -> None:
    client = await Client.connect(app)
    assert await client.call("AUTH", "orders", "s3cret") == b"+OK"
    assert await client.call("LPUSH", "orders", "a") == b":1"
    assert await hello_map(client, "SETNAME", "before-reset") == b"%7"
    assert await client.call("CLIENT", "SETINFO", "LIB-NAME", "raw") == b"+OK"
    assert await client.call("MULTI") == b"+OK"
    assert await client.call("LPUSH", "orders", "b") == b"+QUEUED"
    assert await client.call("RESET") == b"+RESET"  # at once, not queued
    assert await client.call("EXEC") == b"-ERR EXEC without MULTI"
    # Logged out: the queue it pushed to a moment ago is closed to it again.
    assert await client.call("LPUSH", "orders", "c") == b"-NOAUTH Authentication required."
    assert await client.call("CLIENT", "GETNAME") == b"$-1"  # no name, and RESP2's null
    own = await bulk(client, "CLIENT", "INFO")
    assert b" name= " in own and b" resp=2 lib-name=raw " in own  # the library stays
    assert await client.call("RESET", "now") == (
        b"-ERR wrong number of arguments for 'reset' command"
    )
    assert await client.call("AUTH", "orders", "s3cret") == b"+OK"
    assert await client.call("LLEN", "orders") == b":1"  # "a" only: "b" was discarded


# -- too many arguments -----------------------------------------------------------------------


async def test_too_many_arguments_are_refused_with_an_error_the_client_reads(app: App) -> None:
    """Over 1,048,576 arguments the request is refused at its first line, while the client is
    still writing megabytes of them: closing at once reset the connection under that write,
    and redis-py reported only "Connection reset by peer", never reading the error."""
    assert app.resp is not None

    def push_too_many() -> str:
        client = redis.Redis(port=port_of(app), protocol=2)
        try:
            client.lpush("open", *[b"x"] * (1024 * 1024 + 1))
        except redis.ResponseError as exc:
            return f"ResponseError: {exc}"
        except redis.ConnectionError as exc:
            return f"ConnectionError: {exc}"
        finally:
            client.close()
        return "accepted"

    with trio.fail_after(30):
        outcome = await trio.to_thread.run_sync(push_too_many)
    assert outcome == "ResponseError: Protocol error: invalid multibulk length"
    assert app.resp.statistics().protocol_errors_total == 1
    other = await Client.connect(app)
    assert await other.call("LLEN", "open") == b":0"


async def test_info_keyspace_names_a_queue_with_a_colon_as_clients_read_it(
    tmp_path: Path,
) -> None:
    # "queue_app:emails:topics=1" read, in redis-py, as {"queue_app": {"emails:topics": 1}}.
    queues = {
        "app": """\
            queue: "app:emails"
            topics:
              t: {backend: "fastcgi://127.0.0.1:9", script: /srv/x.php, paused: true}
            """
    }
    async with running_daemon(write_config(tmp_path, queues)) as app:
        host, _, port = app.resp_address.rpartition(":")

        def keyspace() -> dict[str, object]:
            return redis.Redis(host=host, port=int(port), protocol=2).info("keyspace")

        assert await trio.to_thread.run_sync(keyspace) == {
            "queue0": {"name": "app:emails", "topics": 1}
        }
