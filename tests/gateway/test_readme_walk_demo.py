"""The README's first command, ``busgate demo``, where a newcomer's machine is not the
developer's: an odd $TMPDIR, a closed terminal, the default ports already taken."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

DEMO = [sys.executable, "-m", "gateway.cli", "demo"]


async def _stop(process: trio.Process) -> None:
    """End a demo a test left running: SIGTERM first, so that it takes its sample backend
    with it (a SIGKILL would leave that behind); SIGKILL if it does not go."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            await process.wait()
    process.kill()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("my tmp", id="a space in TMPDIR"),
        pytest.param("t" * 90, id="TMPDIR too long for a unix socket path"),
    ],
)
async def test_the_demo_delivers_whatever_tmpdir_is(tmp_path: Path, name: str) -> None:
    tmpdir = tmp_path / name
    tmpdir.mkdir()
    done = await trio.run_process(
        [*DEMO, "--once", "--port", "0", "--http-port", "0"],
        env={**os.environ, "TMPDIR": str(tmpdir)},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "queue=demo topic=hello attempt=1" in out and "-> 200" in out, out
    assert "the sample backend received the job" in out
    socket_path = re.search(r"sample backend listening on (\S+) ", out)
    assert socket_path is not None, out
    assert not Path(socket_path.group(1)).parent.exists()  # removed on the way out
    assert list(tmpdir.iterdir()) == []


async def test_the_demo_prints_a_push_that_needs_no_redis_cli() -> None:
    """The README starts from a fresh machine with Python: redis-cli may not be there, so the
    demo also says how to push with busgate itself, and that line works as printed."""
    process = await trio.lowlevel.open_process(
        [*DEMO, "--port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    out = b""

    async def read_until(marker: bytes) -> None:
        nonlocal out
        assert process.stdout is not None
        with trio.fail_after(30):
            while marker not in out:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, out
                out += chunk

    try:
        await read_until(b"Ctrl-C to stop.")
        match = re.search(r"^busgate demo: +or +(.+ push demo .+)$", out.decode(), re.MULTILINE)
        assert match is not None, out
        pushed = await trio.run_process(
            shlex.split(match.group(1)), capture_stdout=True, capture_stderr=True, check=False
        )
        assert pushed.returncode == 0, pushed.stderr
        job_id = pushed.stdout.decode().strip()
        await read_until(f"sample backend: job {job_id} queue=demo topic=hello".encode())
        assert b"payload=b'{\"n\": 1}' -> 200" in out
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        await _stop(process)
        await process.stdout.aclose()


async def test_a_taken_port_says_how_to_pick_others() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await trio.run_process(
            [*DEMO, "--once", "--port", str(port), "--http-port", "0"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "Address already in use" in err
    assert f"port {port} or 0" in err and "--port and --http-port" in err, err
    left = await trio.run_process(
        ["pgrep", "-f", "gateway.sample_backend"], capture_stdout=True, check=False
    )
    demo_dirs = re.findall(r"sample backend listening on (\S+)/sample\.sock", done.stdout.decode())
    for workdir in demo_dirs:
        assert not Path(workdir).exists()
        assert workdir.encode() not in left.stdout
