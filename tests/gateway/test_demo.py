"""The README's first command, run as a user would run it."""

from __future__ import annotations

import re
import sys

import trio


async def test_busgate_demo_delivers_a_job() -> None:
    done = await trio.run_process(
        [sys.executable, "-m", "gateway.cli", "demo", "--once", "--port", "0", "--http-port", "0"],
        capture_stdout=True,
        capture_stderr=True,
    )
    out = done.stdout.decode()
    assert "LPUSH demo" in out and "-> :1" in out
    assert "sample backend: job " in out and "queue=demo topic=hello attempt=1" in out
    assert "the sample backend received the job" in out
    # One line per attempt, in the format gateway.logs writes.
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO busgate\.dispatch job=\S+ queue=demo"
        r" topic=hello attempt=1 outcome=done status=200 duration_ms=[\d.]+ trace=[0-9a-f]{32}$",
        done.stderr.decode(),
        re.MULTILINE,
    )
