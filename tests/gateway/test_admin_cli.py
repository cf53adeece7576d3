"""The operator CLI (`busgate stats`, `jobs show`, `dead …`, `pause`, `resume`, `push`).

A real daemon runs in-process with a real php-fpm behind it; the CLI runs as a real
subprocess, finding the daemon through the same busgate.yaml (``listen.http`` on a fixed free
port, ``admin_token_file``), as an operator's shell would.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pty
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway import admin_cli
from gateway.app import App
from tests.support.daemon import read_received, running_daemon, wait_received, write_config
from tests.support.phpfpm import PhpFpm
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "a-cli-admin-token-long-enough"
FAIL = '{"respond_status": 500}'


def queue_yaml(fpm: PhpFpm) -> str:
    return f"""\
        queue: orders
        password: s3cret
        topics:
          email:
            backend: fastcgi://127.0.0.1:{fpm.address.port}
            script: {fpm.script("record.php")}
            retry: {{max_attempts: 1}}
            circuit: {{failures: 1000}}  # the 500s here are on purpose
        """


@dataclass
class Run:
    code: int
    out: str
    err: str


async def busgate(
    *args: str,
    stdin: bytes | int = b"",
    env: dict[str, str] | None = None,
    stderr: int | None = None,
) -> Run:
    """``python -m gateway.cli ARGS`` in a subprocess, without the caller's busgate variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BUSGATE_")}
    environ["PYTHONPATH"] = str(ROOT)
    environ.update(env or {})
    command = [sys.executable, "-m", "gateway.cli", *args]
    if stderr is None:
        result = await trio.run_process(
            command,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
            env=environ,
        )
    else:
        result = await trio.run_process(
            command,
            stdin=stdin,
            capture_stdout=True,
            stderr=stderr,
            check=False,
            cwd=ROOT,
            env=environ,
        )
    return Run(result.returncode, result.stdout.decode(), (result.stderr or b"").decode())


@dataclass
class Daemon:
    app: App
    config: Path
    token_file: Path
    record: Path

    async def cli(self, *args: str, **options: Any) -> Run:
        return await busgate(*args, "-c", str(self.config), **options)

    async def topic(self) -> dict[str, Any]:
        await self.app.telemetry.sample()  # don't wait for the next tick
        (queue,) = self.app.telemetry.snapshot()["queues"]
        (topic,) = queue["topics"]
        return dict(topic)

    async def settled(self, *, dead: int = 0, done: int = 0) -> dict[str, Any]:
        with trio.fail_after(10):
            while True:
                topic = await self.topic()
                depth, totals = topic["depth"], topic["totals"]
                if (
                    totals["dead"] >= dead
                    and totals["done"] >= done
                    and depth["ready"] == depth["leased"] == 0
                ):
                    return topic
                await trio.sleep(0.05)


@pytest.fixture
async def daemon(recording_fpm: PhpFpm, record: Path, tmp_path: Path) -> AsyncIterator[Daemon]:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    config = write_config(
        tmp_path,
        {"orders": queue_yaml(recording_fpm)},
        main_extra="admin_token_file: admin.token\n",
    )
    # A fixed port, so the CLI finds the daemon through listen.http like in production.
    text = config.read_text()
    config.write_text(text.replace("http: 127.0.0.1:0", f"http: 127.0.0.1:{free_port()}"))
    async with running_daemon(config) as app:
        yield Daemon(app, config, token_file, record)


def ok(run: Run) -> Run:
    assert run.code == 0, (run.code, run.out, run.err)
    return run


async def test_stats_table_and_json(daemon: Daemon) -> None:
    await daemon.topic()
    run = ok(await daemon.cli("stats"))
    header, row = run.out.splitlines()
    assert header.split() == [
        "QUEUE/TOPIC",
        "READY",
        "DELAYED",
        "LEASED",
        "DEAD",
        "IN/S",
        "OUT/S",
        "P95",
        "MS",
        "FAILED",
        "CIRCUIT",
        "PAUSED",
    ]
    assert row.split() == [
        "orders/email",
        "0",
        "0",
        "0",
        "0",
        "0.0",
        "0.0",
        "-",
        "0",
        "closed",
        "no",
    ]
    document = json.loads(ok(await daemon.cli("stats", "--json")).out)
    (queue,) = document["queues"]
    assert queue["name"] == "orders" and queue["password"] is True
    (topic,) = queue["topics"]
    assert (topic["queue"], topic["topic"], topic["depth"]["dead"]) == ("orders", "email", 0)
    assert set(document) == set(daemon.app.telemetry.snapshot())


async def test_push_text_and_binary_then_jobs_show(daemon: Daemon) -> None:
    # The queue's password comes from the config the CLI reads.
    run = ok(
        await daemon.cli(
            "push", "orders", '{"hello": "cli"}', "--attr", "tenant=acme", "--priority", "high"
        )
    )
    job_id = run.out.strip()
    (received,) = await wait_received(daemon.record, 1)
    assert (received.job_id, received.body) == (job_id, b'{"hello": "cli"}')
    assert received.server["HTTP_X_BUSGATE_ATTR_TENANT"] == "acme"

    binary = bytes(range(256)) + b"\r\n\x00"
    run = ok(
        await daemon.cli(
            "push",
            "orders/email",
            "-",
            "--id",
            "bin-1",
            stdin=binary,
            env={"BUSGATE_QUEUE_PASSWORD": "s3cret"},
        )
    )
    assert run.out == "bin-1\n"
    received = (await wait_received(daemon.record, 2))[1]
    assert (received.job_id, received.body) == ("bin-1", binary)
    await daemon.settled(done=2)

    run = ok(await daemon.cli("jobs", "show", job_id))
    lines = run.out.splitlines()
    assert lines[0] == f"job {job_id}: 1 topic copy"
    assert "orders/email: done, attempt 1, priority high" in lines
    assert "  attributes tenant=acme" in lines
    assert '  payload    {"hello": "cli"}' in lines
    header = lines.index("  ATTEMPT  STARTED              OUTCOME  STATUS  DURATION  ERROR")
    attempt = lines[header + 1].split()
    assert (attempt[0], attempt[3], attempt[4], attempt[-1]) == ("1", "done", "200", "-")

    document = json.loads(ok(await daemon.cli("jobs", "show", "bin-1", "--json")).out)
    (copy,) = document["copies"]
    assert copy["payload_encoding"] == "base64"
    assert base64.b64decode(copy["payload"]) == binary
    assert [a["status"] for a in copy["attempts"]] == [200]
    run = ok(await daemon.cli("jobs", "show", "bin-1"))
    assert "  payload    (binary, 259 bytes) base64:" in run.out

    run = await daemon.cli("push", "orders", "x", "--password", "wrong")
    assert run.code == 1 and run.out == ""
    assert run.err.startswith("busgate: invalid username-password pair")
    assert "--password" in run.err
    # A binary payload with attributes: the raw body, attributes in the query.
    ok(await daemon.cli("push", "orders", "-", "--attr", "a=b", stdin=b"\xff\xfe"))
    third = (await wait_received(daemon.record, 3))[2]
    assert (third.body, third.server["HTTP_X_BUSGATE_ATTR_A"]) == (b"\xff\xfe", "b")


async def test_dead_jobs_listed_replayed_and_deleted(daemon: Daemon) -> None:
    for n in range(3):
        ok(await daemon.cli("push", "orders", FAIL, "--attr", f"n={n}"))
    first = await wait_received(daemon.record, 3)
    await daemon.settled(dead=3)

    run = ok(await daemon.cli("dead", "list", "orders/email", "--status", "500"))
    header, *rows = run.out.splitlines()
    assert header.split() == ["ID", "DIED", "ATTEMPTS", "STATUS", "ERROR", "PAYLOAD"]
    assert len(rows) == 3 and all(" 500 " in row and FAIL in row for row in rows)
    assert {row.split()[0] for row in rows} == {r.job_id for r in first}

    page = json.loads(
        ok(await daemon.cli("dead", "list", "orders/email", "--limit", "2", "--json")).out
    )
    assert len(page["jobs"]) == 2 and page["cursor"]
    whole = json.loads(
        ok(
            await daemon.cli(
                "dead", "list", "orders/email", "--limit", "2", "--all-pages", "--json"
            )
        ).out
    )
    assert len(whole["jobs"]) == 3 and whole["cursor"] is None
    rest = json.loads(
        ok(
            await daemon.cli("dead", "list", "orders/email", "--cursor", page["cursor"], "--json")
        ).out
    )
    assert [j["id"] for j in page["jobs"] + rest["jobs"]] == [j["id"] for j in whole["jobs"]]

    async def matching(*filters: str) -> int:
        args = ("dead", "list", "orders/email", "--json", *filters)
        return len(json.loads(ok(await daemon.cli(*args)).out)["jobs"])

    assert await matching("--since", "1h") == 3
    assert await matching("--until", "1h") == 0
    assert await matching("--since", "2000-01-01T00:00:00+00:00") == 3
    assert await matching("--until", "946684800") == 0
    assert await matching("--error", "STATUS 500") == 3
    assert await matching("--attribute", "n:1") == 1
    assert await matching("--status", "404") == 0
    run = ok(await daemon.cli("dead", "list", "orders/email", "--status", "404"))
    assert run.out == "no dead jobs match\n"

    # Not a terminal: no question can be asked, so --yes is required, and nothing happens.
    run = await daemon.cli("dead", "replay", "orders/email", "--status", "500")
    assert run.code == 2
    assert run.err == (
        "busgate: replay 3 dead jobs of orders/email? stdin is not a terminal to ask on:"
        " add --yes\n"
    )
    run = ok(await daemon.cli("dead", "replay", "orders/email", "--status", "500", "--dry-run"))
    assert run.out == "3 dead jobs of orders/email would be replayed (dry run)\n"
    await trio.sleep(0.2)
    assert len(read_received(daemon.record)) == 3

    run = ok(
        await daemon.cli(
            "dead", "replay", "orders/email", "--status", "500", "--yes", "--rate", "50"
        )
    )
    assert run.out.startswith("replayed 3 of 3 dead jobs of orders/email in ")
    assert run.err == ""  # no progress bar when stderr is not a terminal
    again = (await wait_received(daemon.record, 6))[3:]
    assert sorted(r.job_id for r in again) == sorted(r.job_id for r in first)
    assert {r.attempt for r in again} == {1}  # a fresh set of attempts
    await daemon.settled(dead=6)  # they answer 500 again

    # On a terminal, a progress bar; --rate 2 replays in steps of two jobs a second.
    controller, terminal = pty.openpty()
    try:
        run = ok(
            await busgate(
                "dead",
                "replay",
                "orders/email",
                "--all",
                "--yes",
                "--rate",
                "2",
                "-c",
                str(daemon.config),
                stderr=terminal,
            )
        )
    finally:
        os.close(terminal)
    drawn = b""
    try:
        while chunk := os.read(controller, 4096):
            drawn += chunk
    except OSError:  # EIO: the terminal's other side is closed and everything was read
        pass
    finally:
        os.close(controller)
    bar = drawn.decode()
    assert f"\r[{' ' * 30}] 0/3 jobs, 0/s" in bar
    assert f"\r[{'#' * 20}{' ' * 10}] 2/3 jobs, " in bar
    assert f"\r[{'#' * 30}] 3/3 jobs, " in bar and bar.endswith("\r\n")
    summary = re.fullmatch(
        r"replayed 3 of 3 dead jobs of orders/email in ([0-9.]+)s \(\d+/s\)\n", run.out
    )
    assert summary is not None and float(summary.group(1)) >= 1.0  # the second step waited
    await wait_received(daemon.record, 9)
    await daemon.settled(dead=9)

    run = await daemon.cli("dead", "delete", "orders/email")
    assert run.code == 2 and "name the dead jobs with one of --ids" in run.err
    run = ok(await daemon.cli("dead", "delete", "orders/email", "--all", "--dry-run"))
    assert run.out == "3 dead jobs of orders/email would be deleted (dry run)\n"
    one = sorted(r.job_id for r in first)[0]
    run = ok(await daemon.cli("dead", "delete", "orders/email", "--ids", one, "--yes", "--json"))
    assert json.loads(run.out) == {"matched": 1, "deleted": 1}
    # On a terminal, the CLI asks.
    for answer, code, said in ((b"n\n", 1, "busgate: nothing deleted\n"), (b"y\n", 0, "")):
        controller, terminal = pty.openpty()
        try:
            os.write(controller, answer)
            run = await daemon.cli("dead", "delete", "orders/email", "--all", stdin=terminal)
        finally:
            os.close(terminal)
            os.close(controller)
        assert (run.code, run.err) == (code, "Delete 2 dead jobs of orders/email? [y/N] " + said)
    assert run.out == "deleted 2 dead jobs of orders/email\n"
    assert (await daemon.topic())["depth"]["dead"] == 0
    run = await daemon.cli("dead", "replay", "orders/email", "--all", "--yes")
    assert (run.code, run.err) == (1, "busgate: no dead job matches that filter\n")


async def test_pause_and_resume_show_in_stats(daemon: Daemon) -> None:
    run = ok(await daemon.cli("pause", "orders/email"))
    assert run.out == "paused orders/email\n"
    # At once, not at the next stats sample.
    document = json.loads(ok(await daemon.cli("stats", "--json")).out)
    assert document["queues"][0]["topics"][0]["paused"] is True
    ok(await daemon.cli("push", "orders", '{"n": 1}'))
    await trio.sleep(0.3)
    assert read_received(daemon.record) == []
    await daemon.topic()
    row = ok(await daemon.cli("stats")).out.splitlines()[1].split()
    assert (row[0], row[1], row[-1]) == ("orders/email", "1", "yes")
    document = json.loads(ok(await daemon.cli("stats", "--json")).out)
    assert document["queues"][0]["topics"][0]["paused"] is True

    run = ok(await daemon.cli("resume", "orders/email", "--json"))
    assert json.loads(run.out) == {"queue": "orders", "topic": "email", "paused": False}
    await wait_received(daemon.record, 1)
    await daemon.settled(done=1)
    assert ok(await daemon.cli("stats")).out.splitlines()[1].split()[-1] == "no"


async def test_errors_say_what_and_exit_with_their_status(daemon: Daemon, tmp_path: Path) -> None:
    async def fails(code: int, *args: str, **options: Any) -> str:
        run = await daemon.cli(*args, **options)
        assert (run.code, run.out) == (code, ""), (run.code, run.out, run.err)
        assert run.err.startswith("busgate: ") and run.err.count("\n") == 1
        return run.err.removeprefix("busgate: ").strip()

    # the token: wrong from the environment (which beats the config), wrong from a file
    assert await fails(1, "stats", env={"BUSGATE_ADMIN_TOKEN": "not-the-token-at-all"}) == (
        "wrong or missing admin token (from $BUSGATE_ADMIN_TOKEN)"
    )
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token-either\n")
    message = await fails(1, "stats", "--token-file", str(wrong))
    assert message == f"wrong or missing admin token (from {wrong})"

    # nobody listening
    url = f"http://127.0.0.1:{free_port()}"
    assert await fails(1, "stats", "--url", url) == f"is busgate running? nothing listens on {url}"

    # filters: refused by the CLI (2), or by the server with its 400 message (2)
    message = await fails(2, "dead", "list", "orders/email", "--since", "yesterday")
    assert message.startswith("--since 'yesterday': write unix seconds, an ISO-8601 time")
    message = await fails(2, "dead", "list", "orders/email", "--attribute", "novalue")
    assert message == "attribute must read name:value"
    message = await fails(2, "dead", "list", "orders/email", "--limit", "0")
    assert message == "limit must be between 1 and 500, not '0'"
    assert await fails(2, "pause", "orders") == "'orders': write QUEUE/TOPIC"

    # unknown names: the server's 404 message
    message = await fails(1, "dead", "list", "orders/nope")
    assert message == "unknown topic 'nope' in queue 'orders'"
    assert await fails(1, "pause", "nope/email") == "unknown queue 'nope'"
    message = await fails(1, "jobs", "show", "nope")
    assert message == "no job 'nope' (unknown, or pruned from history)"
    assert await fails(1, "push", "nope", "x") == "unknown queue 'nope'"

    # configuration: no admin token anywhere, a port the CLI cannot know, no file at all
    bare = write_config(tmp_path / "bare", {})
    run = await busgate("stats", "-c", str(bare), "--url", url)
    assert run.code == 2
    assert run.err == (
        f"busgate: no admin token: {bare} sets no admin_token_file (the admin API is off"
        " there); give --token-file or set BUSGATE_ADMIN_TOKEN\n"
    )
    run = await busgate("stats", "-c", str(bare), "--token-file", str(daemon.token_file))
    assert run.code == 2 and "listen.http is port 0" in run.err and "--url" in run.err
    run = await busgate("stats", "-c", str(tmp_path / "missing.yaml"))
    assert run.code == 2 and run.err.startswith("busgate: configuration error: ")
    assert run.err.endswith("(or give --url and --token-file)\n"), run.err


async def test_queue_secrets_are_needed_only_by_commands_that_read_queues(
    daemon: Daemon,
) -> None:
    # As under systemd: the queue's password comes from an EnvironmentFile the operator's
    # shell does not have.  Commands that talk to the admin API read the main file only.
    drop_in = daemon.config.parent / "conf.d" / "orders.yaml"
    drop_in.write_text(drop_in.read_text().replace("s3cret", "${ORDERS_PASSWORD}"))

    assert ok(await daemon.cli("stats")).out.startswith("QUEUE/TOPIC")
    ok(await daemon.cli("pause", "orders/email"))
    assert (await daemon.topic())["paused"] is True
    ok(await daemon.cli("resume", "orders/email"))

    # push takes the queue's password from its drop-in, so that one needs the variable...
    run = await daemon.cli("push", "orders", "{}")
    assert run.code == 2 and "ORDERS_PASSWORD" in run.err, run
    # The hint names what works here (not --token-file, which push does not take).
    assert run.err.endswith(
        "(or give the queue's password with --password or $BUSGATE_QUEUE_PASSWORD)\n"
    ), run.err
    # ...or the password given another way.
    ok(await daemon.cli("push", "orders", "{}", "--password", "s3cret"))
    ok(await daemon.cli("push", "orders", "{}", env={"ORDERS_PASSWORD": "s3cret"}))
    assert len(await wait_received(daemon.record, 2)) == 2


def test_a_replays_progress_off_a_terminal_is_a_line_now_and_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In a script or a log, a `--rate 1` replay of thousands ran silent for hours.
    clock = [100.0]
    monkeypatch.setattr("gateway.admin_cli.time.monotonic", lambda: clock[0])
    stream = io.StringIO()
    bar = admin_cli.ProgressBar(3000, stream)
    for done in range(0, 3000, 10):  # ten jobs a second for five minutes
        bar.show(done)
        clock[0] += 1.0
    bar.show(3000)  # the end: the command's own summary says it
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 29  # one every 10 s
    assert lines[0] == "busgate: replayed 100/3000 jobs, 10/s"
    assert "\r" not in stream.getvalue()
