"""Real producer libraries against the daemon's Redis protocol, checked at the backend.

phpredis (tests/clients/producer.php), ioredis and node-redis (tests/clients/node/producer.mjs)
push jobs with every producer command, and redis-benchmark floods LPUSH; each test checks the
reply types the library handed its caller and what php-fpm's record.php received, byte for
byte, with the job headers.  The node libraries come from ``npm ci --prefix tests/clients/node``
(.ci/run does it).  A missing client fails its test, naming what to install: these clients
are what the tests are about, so they are never skipped.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from adapters.storage.jobs import JobRecord, Priority, TopicStats
from gateway.app import App
from gateway.resp import Command, RequestParser, encode_command
from tests.support.daemon import Received, read_received, running_daemon, write_config
from tests.support.phpfpm import PhpFpm

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
PHP_PRODUCER = CLIENTS / "producer.php"
NODE_DIR = CLIENTS / "node"
NODE_PRODUCER = NODE_DIR / "producer.mjs"
PASSWORD = "s3cret-Pa55"
CLIENT_TIMEOUT = 60.0
#: A multiple of the pipeline depth: redis-benchmark issues whole pipelines, so any other
#: count would send up to P-1 requests more than asked.
BENCHMARK_REQUESTS = 2000


def queue_config(fpm: PhpFpm, queue: str, *, password: str | None, concurrency: int) -> str:
    password_line = f"password: {password}\n" if password else ""
    return (
        f"queue: {queue}\n"
        + password_line
        + f"""\
topics:
  record:
    backend: fastcgi://127.0.0.1:{fpm.address.port}
    script: {fpm.script("record.php")}
    uri: /jobs/{queue}?source=busgate
    concurrency: {concurrency}
    timeout: 10s
    retry: {{max_attempts: 3, backoff: 100ms, max_backoff: 200ms}}
"""
    )


def port_of(app: App) -> int:
    return int(app.resp_address.rpartition(":")[2])


def require_tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed ({install}); .ci/run installs it", pytrace=False)
    return path


def require_node_modules() -> None:
    for package in ("ioredis", "redis"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            pytest.fail(
                f"the node package {package!r} is not installed in {NODE_DIR}/node_modules:"
                " run `npm ci --prefix tests/clients/node` (.ci/run does)",
                pytrace=False,
            )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def awkward_payloads(tag: str) -> list[bytes]:
    """Payloads a text-minded client or server would mangle, each marked with ``tag``."""
    mark = tag.encode()
    return [
        b"",
        mark + b" \x00NUL\r\n*1\r\n$4\r\nPING\r\n",  # RESP framing inside a payload
        mark + b" \xff\xfe\xc3\x28 not UTF-8",
        json.dumps({"tag": tag, "note": 'héllo " quotes'}).encode(),
        mark + os.urandom(100_000),  # several FastCGI records, several socket reads
    ]


async def run_client(args: Sequence[str], plan: dict[str, Any]) -> dict[str, Any]:
    """Run a client program with its plan on stdin; its JSON report from stdout."""
    with trio.fail_after(CLIENT_TIMEOUT):
        done = await trio.run_process(
            list(args),
            stdin=json.dumps(plan).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited with {done.returncode}\n"
            f"stderr: {done.stderr.decode(errors='replace')}\n"
            f"stdout: {done.stdout.decode(errors='replace')}",
            pytrace=False,
        )
    report: dict[str, Any] = json.loads(done.stdout)
    return report


async def settled_stats(app: App, queue: str, topic: str, finished: int) -> TopicStats:
    """Wait until ``finished`` jobs have an outcome and nothing is waiting or in flight."""
    assert app.store is not None
    with trio.fail_after(60):
        while True:
            stats = await app.store.stats(queue, topic)
            if stats.done_total + stats.dead_total >= finished and (
                stats.ready == stats.delayed == stats.leased == 0
            ):
                return stats
            await trio.sleep(0.05)


async def job_record(app: App, job_id: str) -> JobRecord:
    assert app.store is not None
    (job,) = await app.store.get_job(job_id)
    return job


def check_deliveries(received: list[Received], queue: str) -> None:
    for entry in received:
        server = entry.server
        assert server["HTTP_X_BUSGATE_QUEUE"] == queue
        assert server["HTTP_X_BUSGATE_TOPIC"] == "record"
        assert server["HTTP_X_BUSGATE_ATTEMPT"] == "1"
        assert server["REQUEST_URI"] == f"/jobs/{queue}?source=busgate"
        # What a front controller routes on besides REQUEST_URI.
        assert (server["QUERY_STRING"], server["SCRIPT_NAME"]) == ("source=busgate", "/record.php")
        assert server["CONTENT_LENGTH"] == str(len(entry.body))
        assert server["HTTP_TRACEPARENT"].startswith("00-")


def by_body(received: list[Received], body: bytes) -> Received:
    (entry,) = [r for r in received if r.body == body]
    return entry


# -- a relay that keeps the bytes, to show what a client library really sent ----------------


@dataclass
class Conversation:
    sent: bytearray = field(default_factory=bytearray)  # client -> daemon
    answered: bytearray = field(default_factory=bytearray)  # daemon -> client

    def commands(self) -> list[tuple[bytes, ...]]:
        """What the client sent, one tuple per command, its name upper-cased."""
        parser = RequestParser()
        parser.feed(bytes(self.sent))
        commands = []
        while isinstance(event := parser.next_event(), Command):
            commands.append((event.name, *event.args[1:]))
        return commands

    def show(self, limit: int = 1500) -> str:
        sent, answered = bytes(self.sent[:limit]), bytes(self.answered[:limit])
        return f"client sent: {sent!r}\ndaemon answered: {answered!r}"


class RecordingProxy:
    """A TCP relay to the daemon keeping every byte both ways (``MONITOR`` is not ours)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.conversations: list[Conversation] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    def carrying(self, marker: bytes) -> Conversation:
        """The one connection whose client sent ``marker``."""
        (conversation,) = [c for c in self.conversations if marker in c.sent]
        return conversation

    def show(self) -> str:
        return "\n".join(c.show() for c in self.conversations)

    async def _relay(self, client: trio.SocketStream) -> None:
        conversation = Conversation()
        self.conversations.append(conversation)
        async with client:
            daemon = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            async with daemon, trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, daemon, conversation.sent)
                nursery.start_soon(_pump, daemon, client, conversation.answered)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, kept: bytearray) -> None:
    try:
        while data := await source.receive_some(65536):
            kept.extend(data)
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # one side went away; the other direction ends on its own


@asynccontextmanager
async def recording_proxy(app: App) -> AsyncIterator[RecordingProxy]:
    proxy = RecordingProxy(port_of(app))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()


# -- phpredis -------------------------------------------------------------------------------


async def test_phpredis_producer_commands_reach_php_byte_exact(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    php = require_tool("php", "apt-get install php-cli php-redis")
    lpush = awkward_payloads("php-lpush")
    rpush = [b"php-rpush \r\n\x00", b"php-rpush " + os.urandom(64)]
    zadd = b'{"php": "zadd", "later": true}'
    xadd = b"php-xadd \x00\xff\r\n"
    delayed = b"php-xadd-delayed"
    password_only = b"php-password-only \x00"
    expected = [*lpush, *rpush, zadd, xadd, delayed, password_only]
    config = write_config(
        tmp_path,
        {"orders": queue_config(recording_fpm, "orders", password=PASSWORD, concurrency=4)},
    )
    async with running_daemon(config) as app:
        run_at = round(time.time() + 1.0, 3)
        plan = {
            "lpush": [b64(p) for p in lpush],
            "rpush": [b64(p) for p in rpush],
            "zadd": {"at": run_at, "payload": b64(zadd)},
            "xadd": {
                "id": "php-order-42",
                "payload": b64(xadd),
                "priority": "high",
                "attributes": {"customer": "acme-corp", "region": "eu-west"},
            },
            "xadd_delayed": {"id": "php-order-43", "payload": b64(delayed), "delay_ms": 1500},
            "password_only": b64(password_only),
        }
        out = await run_client([php, str(PHP_PRODUCER), str(port_of(app)), PASSWORD], plan)
        stats = await settled_stats(app, "orders", "record", len(expected))
        received = read_received(record)
        records = {r.job_id: await job_record(app, r.job_id) for r in received}

    def reply(step: str) -> tuple[str, Any]:
        assert "exception" not in out[step], out[step]
        return out[step]["type"], out[step]["value"]

    # phpredis throws for NOAUTH/WRONGPASS, and returns false for any other error reply.
    assert out["noauth_lpush"]["exception"] == "RedisException"
    assert out["noauth_lpush"]["message"] == "NOAUTH Authentication required."
    assert out["auth_wrong"]["exception"] == "RedisException"
    assert out["auth_wrong"]["message"].startswith("WRONGPASS")
    assert reply("auth_array") == ("boolean", True)
    assert reply("ping") == ("boolean", True)  # phpredis's answer to +PONG
    assert reply("ping_message") == ("string", "hello")
    assert reply("lpush") == ("integer", len(lpush))
    assert reply("rpush") == ("integer", len(rpush))
    assert reply("zadd") == ("integer", 1)
    assert reply("xadd") == ("string", "php-order-42")
    assert reply("xadd_delayed") == ("string", "php-order-43")
    assert reply("xadd_delayed_again") == ("string", "php-order-43")
    assert reply("llen")[0] == "integer"
    assert 0 <= reply("llen")[1] <= len(expected)
    assert reply("unknown_queue") == ("boolean", False)
    assert out["unknown_queue"]["last_error"] == "ERR unknown queue 'nowhere'"
    assert reply("ping_after_error") == ("boolean", True)
    assert out["ping_after_error"]["last_error"] is None
    assert reply("llen_after_error")[0] == "integer"
    assert reply("auth_password") == ("boolean", True)
    assert reply("password_rpush") == ("integer", 1)

    # Each job once (the repeated XADD id was a duplicate of a pending job), bytes intact.
    assert (stats.pushed_total, stats.done_total, stats.dead_total) == (
        len(expected),
        len(expected),
        0,
    )
    assert sorted(r.body for r in received) == sorted(expected)
    check_deliveries(received, "orders")

    pushed_ids = [r.job_id for r in received if r.body in (*lpush, *rpush, zadd, password_only)]
    assert all(len(job_id) == 26 for job_id in pushed_ids)  # generated ids: ULIDs
    assert len(set(pushed_ids)) == len(pushed_ids)

    streamed = by_body(received, xadd)
    assert streamed.job_id == "php-order-42"
    assert streamed.server["HTTP_X_BUSGATE_ATTR_CUSTOMER"] == "acme-corp"
    assert streamed.server["HTTP_X_BUSGATE_ATTR_REGION"] == "eu-west"
    assert records["php-order-42"].priority == Priority.HIGH
    assert dict(records["php-order-42"].attributes) == {
        "customer": "acme-corp",
        "region": "eu-west",
    }

    scheduled = records[by_body(received, zadd).job_id]
    assert scheduled.run_at == pytest.approx(run_at, abs=1e-3)
    assert scheduled.attempts[0].started_at >= scheduled.run_at

    later = records[by_body(received, delayed).job_id]
    assert later.id == "php-order-43"
    assert later.run_at - later.enqueued_at == pytest.approx(1.5, abs=0.05)
    assert later.attempts[0].started_at >= later.run_at


# -- ioredis and node-redis -----------------------------------------------------------------

#: (run name, library, protocol asked for, login user: the queue, or None for password only).
#: ioredis 5 logs in with AUTH and speaks RESP2; node-redis does too unless given a protocol,
#: which it negotiates with HELLO <protocol> AUTH <user or "default"> <password>.
NODE_RUNS: list[tuple[str, str, int | None, str | None]] = [
    ("ioredis-user", "ioredis", None, "orders"),
    ("ioredis-password", "ioredis", None, None),
    ("node-redis-user", "node-redis", None, "orders"),
    ("node-redis-resp3-user", "node-redis", 3, "orders"),
    ("node-redis-resp3-password", "node-redis", 3, None),
    ("node-redis-hello2-password", "node-redis", 2, None),
]


async def test_ioredis_and_node_redis_producers_reach_php_byte_exact(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    node = require_tool("node", "apt-get install nodejs npm, or node 20 from nodejs.org")
    require_node_modules()
    runs: list[dict[str, Any]] = []
    expected: list[bytes] = []
    xadds: dict[str, bytes] = {}
    for name, library, protocol, user in NODE_RUNS:
        lpush = awkward_payloads(f"{name}-lpush")
        rpush = [f"{name}-rpush ".encode() + os.urandom(32)]
        xadd = f"{name}-xadd ".encode() + b"\x00\r\n\xff"
        xadds[name] = xadd
        expected += [*lpush, *rpush, xadd]
        runs.append(
            {
                "name": name,
                "library": library,
                "protocol": protocol,
                "username": user,
                "lpush": [b64(p) for p in lpush],
                "rpush": [b64(p) for p in rpush],
                "xadd": {
                    "id": f"{name}-order-7",
                    "payload": b64(xadd),
                    "priority": "low",
                    "attributes": {"customer": name},
                },
            }
        )
    config = write_config(
        tmp_path,
        {"orders": queue_config(recording_fpm, "orders", password=PASSWORD, concurrency=4)},
    )
    async with running_daemon(config) as app, recording_proxy(app) as proxy:
        out = await run_client(
            [node, str(NODE_PRODUCER), str(proxy.port), PASSWORD], {"runs": runs}
        )
        stats = await settled_stats(app, "orders", "record", len(expected))
        received = read_received(record)
        records = {r.job_id: await job_record(app, r.job_id) for r in received}
        resp_stats = app.statistics().resp

    for (name, _library, protocol, user), run in zip(NODE_RUNS, runs, strict=True):
        result = out[name]
        context = f"{name}:\n{json.dumps(result, indent=1)}\n{proxy.show()}"
        assert result["connect"] == {"type": "string", "value": "ready"}, context
        assert result["ping"] == {"type": "string", "value": "PONG"}, context
        assert result["lpush"] == {"type": "number", "value": len(run["lpush"])}, context
        assert result["rpush"] == {"type": "number", "value": len(run["rpush"])}, context
        assert result["xadd"] == {"type": "string", "value": f"{name}-order-7"}, context
        assert result["llen"]["type"] == "number", context
        assert result["unknown_queue"]["message"] == "ERR unknown queue 'nowhere'", context
        assert result["ping_after_error"] == {"type": "string", "value": "PONG"}, context
        assert result["llen_after_error"]["type"] == "number", context
        assert "error" not in result["close"], context

        # The handshake each library really sent, and the protocol the daemon answered in.
        wire = proxy.carrying(f"{name}-order-7".encode())
        handshake = wire.commands()[0]
        password = PASSWORD.encode()
        if protocol is None:
            login = (b"AUTH", *([user.encode()] if user else []), password)
            assert handshake == login, wire.show()
            assert wire.answered.startswith(b"+OK\r\n"), wire.show()
        else:
            user_name = (user or "default").encode()  # Redis's name for a password-only login
            hello = (b"HELLO", str(protocol).encode(), b"AUTH", user_name, password)
            assert handshake == hello, wire.show()
            # HELLO's answer: a RESP3 map of 7 fields, or in RESP2 an array of 14 items.
            answer = b"%7\r\n" if protocol == 3 else b"*14\r\n"
            assert wire.answered.startswith(answer), wire.show()

        streamed = by_body(received, xadds[name])
        assert streamed.job_id == f"{name}-order-7"
        assert streamed.server["HTTP_X_BUSGATE_ATTR_CUSTOMER"] == name
        assert records[streamed.job_id].priority == Priority.LOW

    assert (stats.pushed_total, stats.done_total, stats.dead_total) == (
        len(expected),
        len(expected),
        0,
    )
    assert sorted(r.body for r in received) == sorted(expected)
    check_deliveries(received, "orders")
    assert resp_stats.protocol_errors_total == 0


# -- redis-benchmark ------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [1, 16])
async def test_redis_benchmark_lpush_stores_every_request(
    pipeline: int, recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    benchmark = require_tool("redis-benchmark", "apt-get install redis-tools")
    config = write_config(
        tmp_path,
        {"mylist": queue_config(recording_fpm, "mylist", password=None, concurrency=8)},
    )
    async with running_daemon(config) as app:
        assert app.store is not None
        args = [benchmark, "-h", "127.0.0.1", "-p", str(port_of(app)), "-t", "lpush"]
        args += ["-n", str(BENCHMARK_REQUESTS), "-c", "10", "-P", str(pipeline), "-q"]
        with trio.fail_after(CLIENT_TIMEOUT):
            done = await trio.run_process(
                args, capture_stdout=True, capture_stderr=True, check=False
            )
        # Every acknowledged LPUSH is already in the store when the benchmark exits.
        pushed = (await app.store.stats("mylist", "record")).pushed_total
        stats = await settled_stats(app, "mylist", "record", BENCHMARK_REQUESTS)
        resp_stats = app.statistics().resp
    output = f"stdout: {done.stdout!r}\nstderr: {done.stderr!r}"
    assert done.returncode == 0, output
    rate = re.search(rb"LPUSH: ([0-9.]+) requests per second", done.stdout)
    assert rate is not None, output
    assert float(rate[1]) > 0
    assert pushed == BENCHMARK_REQUESTS
    assert (stats.done_total, stats.dead_total) == (BENCHMARK_REQUESTS, 0)
    received = read_received(record)
    assert len(received) == BENCHMARK_REQUESTS
    # One value, -d 3 bytes by default (redis-benchmark 7 fills it with letters, 6 with "x").
    (value,) = {r.body for r in received}
    assert len(value) == 3
    assert len({r.job_id for r in received}) == BENCHMARK_REQUESTS
    check_deliveries(received, "mylist")
    assert (resp_stats.errors_total, resp_stats.protocol_errors_total) == (0, 0)


async def test_redis_benchmark_reads_the_server_config(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    """redis-benchmark starts with CONFIG GET save and CONFIG GET appendonly and reads element
    [1] of each reply; an array shorter than two ("name", value) makes it warn "Could not
    fetch server CONFIG" on every run (src/redis-benchmark.c, getRedisConfig)."""
    benchmark = require_tool("redis-benchmark", "apt-get install redis-tools")
    config = write_config(
        tmp_path,
        {"mylist": queue_config(recording_fpm, "mylist", password=None, concurrency=2)},
    )
    async with running_daemon(config) as app, recording_proxy(app) as proxy:
        args = [benchmark, "-h", "127.0.0.1", "-p", str(proxy.port), "-t", "lpush"]
        args += ["-n", "16", "-c", "1", "-q"]
        with trio.fail_after(CLIENT_TIMEOUT):
            done = await trio.run_process(
                args, capture_stdout=True, capture_stderr=True, check=False
            )
        await settled_stats(app, "mylist", "record", 16)
    assert done.returncode == 0, done.stderr
    probe = proxy.carrying(b"CONFIG")
    assert probe.sent == encode_command("CONFIG", "GET", "save") + encode_command(
        "CONFIG", "GET", "appendonly"
    ), probe.show()
    assert b"Could not fetch server CONFIG" not in done.stderr, (
        f"redis-benchmark stderr: {done.stderr!r}\n{probe.show()}"
    )
