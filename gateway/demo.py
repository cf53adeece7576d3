"""``busgate demo``: the whole path on one machine with nothing but pip.

Starts the bundled flup sample backend on a unix socket, runs the daemon on an embedded
SQLite store in a temporary directory with one queue (``demo``, no password), pushes one
job over the Redis protocol, and shows the sample backend receiving it.  Then it keeps
running so more jobs can be pushed with any Redis client, until Ctrl-C, SIGTERM or SIGHUP
(its terminal closed); the temporary directory goes with it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from gateway import resp
from gateway.app import App
from gateway.config import Config, load_config

_CONFIG = """\
store: sqlite:{db}
listen:
  resp: 127.0.0.1:{port}
  http: 127.0.0.1:{http_port}
admin_token_file: admin.token
include: conf.d/*.yaml
shutdown_timeout: 5s
"""

_QUEUE = """\
queue: demo
topics:
  hello:
    backend: fastcgi+unix://{socket}
    script: /srv/demo/public/index.php
    uri: /jobs/hello
    concurrency: 4
    timeout: 10s
    retry: {{max_attempts: 3, backoff: 500ms, max_backoff: 5s}}
"""


#: A socket path the demo can write into its ``fastcgi+unix://`` backend URL as it is (a space
#: is refused there, and ``#`` or ``?`` would end the path) and that fits a unix socket's
#: ``sun_path`` (108 bytes with the NUL).
_USABLE_SOCKET_PATH = re.compile(r"[\w./+-]{1,107}", re.ASCII)


def _make_workdir() -> Path:
    """The demo's temporary directory: in ``$TMPDIR`` as usual, unless the sample backend's
    socket could not be named there (a space in the path, or a path too long for a unix
    socket); then in /tmp, whose short plain name always can."""
    workdir = Path(tempfile.mkdtemp(prefix="busgate-demo-"))
    if _USABLE_SOCKET_PATH.fullmatch(str(workdir / "sample.sock")):
        return workdir
    workdir.rmdir()
    return Path(tempfile.mkdtemp(prefix="busgate-demo-", dir="/tmp"))


class _Stop:
    """SIGTERM and SIGHUP as Ctrl-C, from the demo's first moment: the default action (death)
    would leave the directory, its admin token and the sample backend behind.

    Outside trio the handler only records the signal; inside, ``_demo`` receives them itself
    (``trio.open_signal_receiver``) and looks here first for one that came before.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_demo(*, once: bool, port: int, http_port: int) -> int:
    stop = _Stop()
    workdir = _make_workdir()
    try:
        return _run(workdir, stop, once=once, port=port, http_port=http_port)
    finally:
        stop.restore()


def _run(workdir: Path, stop: _Stop, *, once: bool, port: int, http_port: int) -> int:
    socket = workdir / "sample.sock"
    record = workdir / "received.jsonl"
    backend: subprocess.Popen[bytes] | None = None
    try:
        (workdir / "conf.d").mkdir()
        (workdir / "admin.token").write_text(secrets.token_urlsafe(24) + "\n")
        (workdir / "busgate.yaml").write_text(
            _CONFIG.format(db=workdir / "busgate.db", port=port, http_port=http_port)
        )
        (workdir / "conf.d" / "demo.yaml").write_text(_QUEUE.format(socket=socket))
        backend = _start_backend(workdir, socket, record)
        deadline = time.monotonic() + 10
        while not socket.exists():
            if stop.requested:
                return 0
            if backend.poll() is not None or time.monotonic() > deadline:
                print("busgate demo: the sample backend did not start", file=sys.stderr)
                return 1
            time.sleep(0.02)
        config = load_config(workdir / "busgate.yaml")
        trio.run(_demo, config, record, once, stop)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not cut the clean-up short: it is bounded (the backend is
        # killed if it does not stop in time) and it removes the admin token.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if backend is not None:
                _stop_backend(backend)
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


def _start_backend(workdir: Path, socket: Path, record: Path) -> subprocess.Popen[bytes]:
    """The sample backend, from this very ``gateway`` package: ``-m`` puts the working
    directory first on the module path, so it runs in the demo's directory (a ``gateway``
    directory where the user stands must not shadow ours), with our package's root on the
    path for a busgate that is not installed."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.sample_backend",
            "--socket",
            str(socket),
            "--record",
            str(record),
        ],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": path},
    )


def _stop_backend(backend: subprocess.Popen[bytes]) -> None:
    backend.terminate()
    try:
        backend.wait(10)
    except subprocess.TimeoutExpired:
        backend.kill()
        backend.wait()


async def _demo(config: Config, record: Path, once: bool, stop: _Stop) -> None:
    # Received for the whole run: a SIGTERM before the banner stops the demo as one after it.
    with trio.open_signal_receiver(*_Stop.SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            app: App = await nursery.start(App(config).run)
            watching, showing = trio.CancelScope(), trio.CancelScope()

            async def stop_on_signal() -> None:
                with watching:
                    if not stop.requested:  # one that came before the receiver
                        async for _ in signals:  # as Ctrl-C: the daemon, then the backend
                            break
                    showing.cancel()
                    app.shutdown()

            nursery.start_soon(stop_on_signal)
            with showing:
                await _show(app, config, record, once)
            if once and not showing.cancelled_caught:  # else a signal has shut it down
                watching.cancel()
                app.shutdown()


async def _show(app: App, config: Config, record: Path, once: bool) -> None:
    """Push one job, wait for the sample backend to receive it, and say how to go on."""
    host, _, port = app.resp_address.rpartition(":")
    # Ports picked by the system (--port 0) are written into the file, where the operator
    # commands the demo suggests read the admin API's address.
    await trio.Path(config.path).write_text(
        _CONFIG.format(
            db=config.store.path,
            port=port,
            http_port=app.http_address.rpartition(":")[2],
        )
    )
    print(f"busgate demo: daemon up, Redis protocol on {app.resp_address}", flush=True)
    payload = b'{"hello": "world", "sent_by": "busgate demo"}'
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(resp.encode_command(b"LPUSH", b"demo", payload))
    reply = await stream.receive_some(1024)
    await stream.aclose()
    print(f"busgate demo: LPUSH demo {payload.decode()} -> {reply.decode().strip()}", flush=True)
    received = trio.Path(record)
    with trio.fail_after(15):
        # Another process writes this file: polling it is the simplest honest wait.
        while not await received.exists() or not (await received.read_text()).strip():  # noqa: ASYNC110
            await trio.sleep(0.05)
    print("busgate demo: the sample backend received the job (its line is above).", flush=True)
    if once:
        return
    token = (record.parent / "admin.token").read_text().strip()
    busgate = _command()
    print(
        f"busgate demo: push more with  redis-cli -p {port} LPUSH demo '{{\"n\": 1}}'\n"
        # redis-cli is not on the fresh machine the README starts from: busgate is.
        f"busgate demo:            or   {busgate} push demo '{{\"n\": 1}}'"
        f" -c {config.path}\n"
        f"busgate demo: a failing job:   redis-cli -p {port} LPUSH demo"
        ' \'{"respond_status": 500}\'  (retried, then dead; also "sleep_ms": N)\n'
        f"busgate demo: dashboard at http://{app.http_address}/  (admin token: {token})\n"
        f"busgate demo: operator commands: {busgate} stats -c {config.path}"
        "  (this directory is removed when the demo stops)\n"
        "busgate demo: Ctrl-C to stop.",
        flush=True,
    )


def _command() -> str:
    """How to run busgate again as this demo was run: ``busgate`` if that is on the PATH."""
    started_as = Path(sys.argv[0])
    if started_as.name != "busgate":  # python -m gateway.cli
        return f"{sys.executable} -m gateway.cli"
    on_path = shutil.which("busgate")
    if on_path is not None and Path(on_path).resolve() == started_as.resolve():
        return "busgate"
    return str(started_as.absolute())
