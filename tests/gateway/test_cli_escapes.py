"""A producer's bytes reach the operator's terminal escaped, never raw.

A payload ``FAIL ESC]0;PWNED BEL ESC[2J`` retitled and cleared the terminal of whoever ran
`busgate dead list` or `busgate jobs show`, and an attribute name ``k ESC[31m`` turned it red:
only CR, LF and tab were escaped, and attributes not at all.

A real daemon runs in-process, delivering to a real php-fpm that always answers 500; the CLI
runs as a subprocess, as an operator's shell would run it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.gateway.test_admin_cli import TOKEN, Daemon, ok
from tests.support.daemon import running_daemon, write_config
from tests.support.phpfpm import PhpFpm
from tests.support.ports import free_port

# OSC (retitle, ended by BEL), CSI (clear), DEL, and C1's single-character CSI.
PAYLOAD = "FAIL \x1b]0;PWNED\x07\x1b[2J \x7f \x9b31m"
SHOWN = "FAIL \\x1b]0;PWNED\\x07\\x1b[2J \\x7f \\x9b31m"
#: Any control character (C0, DEL, C1) in what the CLI printed.
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # the line feeds are the CLI's own


@pytest.fixture
async def daemon(recording_fpm: PhpFpm, record: Path, tmp_path: Path) -> AsyncIterator[Daemon]:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    queue = f"""\
        queue: orders
        password: s3cret
        topics:
          email:
            backend: fastcgi://127.0.0.1:{recording_fpm.address.port}
            script: {recording_fpm.script("status500.php")}
            retry: {{max_attempts: 1}}
        """
    config = write_config(tmp_path, {"orders": queue}, main_extra="admin_token_file: admin.token\n")
    text = config.read_text()
    config.write_text(text.replace("http: 127.0.0.1:0", f"http: 127.0.0.1:{free_port()}"))
    async with running_daemon(config) as app:
        yield Daemon(app, config, tmp_path / "admin.token", record)


async def test_dead_list_and_jobs_show_escape_every_control_character(daemon: Daemon) -> None:
    ok(await daemon.cli("push", "orders", PAYLOAD, "--id", "esc1", "--attr", "k\x1b[31m=v\x85"))
    await daemon.settled(dead=1)

    run = ok(await daemon.cli("dead", "list", "orders/email"))
    assert not CONTROL.search(run.out), run.out
    (row,) = run.out.splitlines()[1:]
    assert row.startswith("esc1 ") and row.endswith(SHOWN[:39] + "…"), row  # 40 wide

    run = ok(await daemon.cli("jobs", "show", "esc1"))
    assert not CONTROL.search(run.out), run.out
    lines = run.out.splitlines()
    assert "  attributes k\\x1b[31m=v\\x85" in lines, lines
    assert f"  payload    {SHOWN}" in lines, lines

    # --json is for programs: the text as it is, each control character a JSON escape (JSON
    # escapes C0 itself; DEL and C1 it would print raw).
    run = ok(await daemon.cli("jobs", "show", "esc1", "--json"))
    assert not CONTROL.search(run.out), run.out
    (copy,) = json.loads(run.out)["copies"]
    assert (copy["payload"], copy["attributes"]) == (PAYLOAD, {"k\x1b[31m": "v\x85"})


async def test_the_usual_escapes_stay_as_they_were(daemon: Daemon) -> None:
    ok(await daemon.cli("push", "orders", " a\r\nb\tc ", "--id", "lines"))
    await daemon.settled(dead=1)
    run = ok(await daemon.cli("jobs", "show", "lines"))
    assert "  payload    a\\r\\nb\\tc" in run.out.splitlines(), run.out
