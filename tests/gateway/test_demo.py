"""The README's first command, run as a user would run it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]


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


async def _demo_until(line: bytes, *args: str, cwd: Path | None = None) -> tuple[Any, Path]:
    """Start the demo in a session of its own (as a terminal runs it) with ``$TMPDIR`` a fresh
    directory; return once it has printed ``line``."""
    tmpdir = Path(tempfile.mkdtemp(prefix="demo-tmp-"))
    process = await trio.lowlevel.open_process(
        # -P: the working directory must not shadow our gateway package for busgate itself.
        [
            sys.executable,
            "-P",
            "-m",
            "gateway.cli",
            "demo",
            "--port",
            "0",
            "--http-port",
            "0",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=cwd,
        env={**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    out = b""
    with trio.fail_after(30):
        while line not in out:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, out
            out += chunk
    return process, tmpdir


async def _left_behind(tmpdir: Path) -> tuple[list[str], bytes]:
    """The demo's directories and processes (the sample backend) still there; ``tmpdir``
    is removed."""
    left = await trio.run_process(["pgrep", "-f", str(tmpdir)], capture_stdout=True, check=False)
    names = [p.name for p in tmpdir.iterdir()]
    shutil.rmtree(tmpdir)
    return names, left.stdout


@pytest.mark.parametrize("once", [False, True], ids=["running", "once"])
async def test_a_sigterm_before_the_banner_still_cleans_up(once: bool) -> None:
    # The handlers were installed only after the first delivery (never with --once): a
    # SIGTERM before found the default action and left the directory and the backend.
    process, tmpdir = await _demo_until(b"daemon up", *(["--once"] if once else []))
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        assert await process.wait() == 0
    assert await _left_behind(tmpdir) == ([], b"")


async def test_ctrl_c_twice_still_removes_the_directory() -> None:
    # The second KeyboardInterrupt landed in the clean-up (waiting for the backend), which
    # then skipped removing the directory and its admin token.
    process, tmpdir = await _demo_until(b"Ctrl-C to stop.")
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
    await trio.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    with trio.fail_after(20):
        await process.wait()
    assert await _left_behind(tmpdir) == ([], b"")


async def test_the_demo_runs_where_a_gateway_directory_is(tmp_path: Path) -> None:
    # `python -m gateway.sample_backend` found the user's ./gateway first.
    (tmp_path / "gateway").mkdir()
    (tmp_path / "gateway" / "__init__.py").write_text("")
    (tmp_path / "gateway" / "sample_backend.py").write_text("raise SystemExit('not ours')\n")
    process, tmpdir = await _demo_until(b"the sample backend received the job", cwd=tmp_path)
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        assert await process.wait() == 0
    assert await _left_behind(tmpdir) == ([], b"")
