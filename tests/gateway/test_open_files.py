"""A daemon at its open files limit: the connections it has are served, the port says once
that it cannot accept more and accepts again when descriptors are free, and deliveries that
could not open a socket wait, unspent, without opening the backend's circuit."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from tests.support.daemon import write_config

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 64
QUEUE = """\
    queue: q
    topics:
      t: {backend: "fastcgi://127.0.0.1:9", script: /srv/x.php, paused: true}
    """


def at_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))  # the daemon cannot raise it


def resp_port(log: Path, daemon: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if found := re.search(r"Redis protocol on 127\.0\.0\.1:(\d+)", log.read_text()):
            return int(found[1])
        assert daemon.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(log.read_text())


def ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(100)


@contextmanager
def daemon_at_limit(config: Path, log: Path) -> Iterator[int]:
    """The daemon of ``config`` at LIMIT open files, logging to ``log``; its RESP port."""
    with log.open("wb") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=at_limit,
        )
    try:
        yield resp_port(log, daemon)
    finally:
        daemon.terminate()
        daemon.wait(30)


@contextmanager
def hoarded(port: int, log: Path) -> Iterator[None]:
    """More connections than the daemon has descriptors for, until it says it cannot
    accept; closed at the end (the kernel queued the rest)."""
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(LIMIT)]
    try:
        wait_for(log, "cannot accept connections")
        yield
    finally:
        for sock in held:
            sock.close()


def wait_for(log: Path, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_a_full_file_table_is_logged_once_and_the_port_accepts_again(tmp_path: Path) -> None:
    # trio's accept loop logged a traceback ten times a second (17,000 lines in three
    # minutes) for as long as the limit was reached.
    log = tmp_path / "daemon.log"
    with daemon_at_limit(write_config(tmp_path, {"q": QUEUE}), log) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
            first.sendall(b"PING\r\n")
            assert first.recv(100) == b"+PONG\r\n"
            with hoarded(port, log):
                time.sleep(2)
                first.sendall(b"PING\r\n")  # served all along
                assert first.recv(100) == b"+PONG\r\n"
        wait_for(log, "accepts connections again")
        assert ping(port) == b"+PONG\r\n"
    text = log.read_text()
    lines = [line for line in text.splitlines() if "cannot accept connections" in line]
    assert len(lines) == 1, text
    assert lines[0].endswith(
        "listen.resp cannot accept connections: Too many open files: the open files limit"
        " (LimitNOFILE) is reached; the connections open are served, new ones wait"
    )
    assert "Traceback" not in text, text


class Recorder(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_delivery_without_a_descriptor_waits_unspent_and_the_circuit_stays_closed(
    tmp_path: Path,
) -> None:
    # Counted as the backend's failure, it opened the circuit, and each probe that met the
    # limit doubled the cooldown: minutes without a delivery once descriptors were free.
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    queue = f"""\
        queue: q
        topics:
          t:
            backend: http://127.0.0.1:{backend.server_address[1]}/jobs
            concurrency: 1
            retry: {{max_attempts: 1, backoff: 100ms, max_backoff: 200ms}}
            circuit: {{failures: 2, cooldown: 30s}}
        """
    log = tmp_path / "daemon.log"
    try:
        with daemon_at_limit(write_config(tmp_path, {"q": queue}), log) as port:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as producer,
                hoarded(port, log),
            ):
                producer.sendall(b"*3\r\n$5\r\nRPUSH\r\n$1\r\nq\r\n$4\r\nlate\r\n")
                assert producer.recv(100) == b":1\r\n"
                wait_for(log, "busgate is out of file descriptors")
                time.sleep(1)  # several attempts
                assert Recorder.bodies == []
            deadline = time.monotonic() + 10
            while not Recorder.bodies:  # at the next retry, not after a 30 s cooldown
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
    finally:
        backend.shutdown()
    text = log.read_text()
    assert Recorder.bodies == [b"late"]
    assert "circuit opened" not in text, text
    assert "no-descriptors: " in text, text
