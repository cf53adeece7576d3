"""The README's first command, run as a user would run it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
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


# SIGHUP: a closed terminal or ssh session must not leave the directory, its admin token and
# the sample backend behind either.
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_a_signal_stops_the_demo_its_backend_and_removes_its_directory(
    stop: signal.Signals,
) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gateway.cli", "demo", "--port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    out = b""
    try:
        with trio.fail_after(30):
            while b"Ctrl-C to stop." not in out:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, out
                out += chunk
        match = re.search(rb"operator commands: (.+?) stats -c (\S+)", out)
        assert match is not None, out
        config = Path(match.group(2).decode())
        assert config.is_file()
        # The command runs as printed, though the ports were picked by the system (port 0).
        command = match.group(1).decode()
        assert command == f"{sys.executable} -m gateway.cli"  # how this test started it
        stats = await trio.run_process(
            [*command.split(), "stats", "-c", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert stats.returncode == 0, stats.stderr
        assert b"demo/hello" in stats.stdout or b"hello" in stats.stdout, stats.stdout
        process.send_signal(stop)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.stdout.aclose()
    assert not config.parent.exists()
    # The sample backend went too: nothing is left serving the demo's socket.
    left = await trio.run_process(
        ["pgrep", "-f", str(config.parent)], capture_stdout=True, check=False
    )
    assert left.stdout == b""
