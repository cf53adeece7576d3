"""``busgate demo``: the whole path on one machine with nothing but pip.

Starts the bundled flup sample backend on a unix socket, runs the daemon on an embedded
SQLite store in a temporary directory with one queue (``demo``, no password), pushes one
job over the Redis protocol, and shows the sample backend receiving it.  Then it keeps
running so more jobs can be pushed with any Redis client, until Ctrl-C, SIGTERM or SIGHUP
(its terminal closed); the temporary directory goes with it.
"""

from __future__ import annotations

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


def run_demo(*, once: bool, port: int, http_port: int) -> int:
    workdir = _make_workdir()
    socket = workdir / "sample.sock"
    record = workdir / "received.jsonl"
    (workdir / "conf.d").mkdir()
    (workdir / "admin.token").write_text(secrets.token_urlsafe(24) + "\n")
    (workdir / "busgate.yaml").write_text(
        _CONFIG.format(db=workdir / "busgate.db", port=port, http_port=http_port)
    )
    (workdir / "conf.d" / "demo.yaml").write_text(_QUEUE.format(socket=socket))
    backend = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.sample_backend",
            "--socket",
            str(socket),
            "--record",
            str(record),
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if backend.poll() is not None or time.monotonic() > deadline:
                print("busgate demo: the sample backend did not start", file=sys.stderr)
                return 1
            time.sleep(0.02)
        config = load_config(workdir / "busgate.yaml")
        trio.run(_demo, config, record, once)
    except KeyboardInterrupt:
        pass
    finally:
        backend.terminate()
        backend.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


async def _demo(config: Config, record: Path, once: bool) -> None:
    async with trio.open_nursery() as nursery:
        app: App = await nursery.start(App(config).run)
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
        print(
            f"busgate demo: LPUSH demo {payload.decode()} -> {reply.decode().strip()}", flush=True
        )
        received = trio.Path(record)
        with trio.fail_after(15):
            # Another process writes this file: polling it is the simplest honest wait.
            while not await received.exists() or not (await received.read_text()).strip():  # noqa: ASYNC110
                await trio.sleep(0.05)
        print("busgate demo: the sample backend received the job (its line is above).", flush=True)
        if once:
            app.shutdown()
            return
        # Listening before the line that says how to stop it: a SIGTERM sent on reading it
        # must not find the default action (death, leaving the sample backend behind).
        # SIGHUP too: a closed terminal or ssh session must not leave the directory behind.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
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
            async for _ in signals:  # as Ctrl-C: stop the daemon, then the sample backend
                app.shutdown()
                return


def _command() -> str:
    """How to run busgate again as this demo was run: ``busgate`` if that is on the PATH."""
    started_as = Path(sys.argv[0])
    if started_as.name != "busgate":  # python -m gateway.cli
        return f"{sys.executable} -m gateway.cli"
    on_path = shutil.which("busgate")
    if on_path is not None and Path(on_path).resolve() == started_as.resolve():
        return "busgate"
    return str(started_as.absolute())
