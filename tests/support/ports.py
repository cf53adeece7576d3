"""Free loopback ports for servers that cannot bind port 0 themselves (php-fpm, redis)."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_connectable(host: str, port: int | None = None, *, timeout: float = 10.0) -> None:
    """Block until a TCP port (or, with ``port=None``, a unix socket path) accepts."""
    deadline = time.monotonic() + timeout
    while True:
        family = socket.AF_UNIX if port is None else socket.AF_INET
        target: str | tuple[str, int] = host if port is None else (host, port)
        with socket.socket(family) as sock:
            try:
                sock.connect(target)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target} not accepting after {timeout}s") from None
            else:
                return
        time.sleep(0.02)
