"""Free loopback ports for servers that cannot bind port 0 themselves (php-fpm, redis)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair(offset: int, *, below: int = 55536) -> int:
    """A free port whose ``port + offset`` is free too, below ``below``.

    Redis Cluster listens on its port and on port + 10000 (the cluster bus), and refuses a
    port above 55535; ephemeral ports the kernel hands out often are.
    """
    for _ in range(1000):
        port = free_port()
        if port + offset >= 65536 or port >= below:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below {below} with a free port {offset} above it")


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


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: a connect to it never completes, as to an
    overloaded server or a host that drops SYNs (no refusal either)."""
    listener = socket.socket()
    clients: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):  # fill the accept queue: further SYNs are dropped
            client = socket.socket()
            client.setblocking(False)
            clients.append(client)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", port))
        yield port
    finally:
        for sock in [listener, *clients]:
            sock.close()
