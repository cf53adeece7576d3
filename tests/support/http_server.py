"""A recording HTTP/1.1 test backend on h11 and trio, optionally over TLS.

Like record.php, a JSON payload steers the answer: ``{"respond_status": 503,
"retry_after": "7", "sleep_ms": 100, "close": true, "garbage": true}``.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import h11
import trio


class Runnable(Protocol):
    @property
    def run(self) -> Callable[..., Awaitable[None]]: ...


R = TypeVar("R", bound=Runnable)


@contextlib.asynccontextmanager
async def serving(server: R) -> AsyncIterator[R]:
    """``server`` running (its ``run(task_status=...)``) until the block ends: what a test
    server fixture yields."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which TCP connection carried it


@dataclass
class RecordingServer:
    ssl_context: ssl.SSLContext | None = None
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    peak_open: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/hooks/job"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = tcp[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp)
        if self.ssl_context is not None:
            listeners = [
                trio.SSLListener(listener, self.ssl_context, https_compatible=True)
                for listener in tcp
            ]
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self._serve, listeners))
            task_status.started()

    async def _serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(conn, stream)
                if request is None:
                    return
                headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                self.requests.append(
                    Request(request.method.decode(), request.target.decode(), headers, body, number)
                )
                if not await self._answer(conn, stream, body):
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError, ssl.SSLError):
            return
        finally:
            self.open_now -= 1
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _read_request(
        conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[h11.Request | None, bytes]:
        request = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    @staticmethod
    async def _answer(conn: h11.Connection, stream: trio.abc.Stream, body: bytes) -> bool:
        try:
            steer = json.loads(body)
        except ValueError:
            steer = None
        if not isinstance(steer, dict):
            steer = {}
        await trio.sleep(int(steer.get("sleep_ms", 0)) / 1000)
        if steer.get("garbage"):
            await stream.send_all(b"this is not HTTP at all\r\n\r\n")
            return False
        headers = [("Content-Type", "text/plain")]
        if "retry_after" in steer:
            headers.append(("Retry-After", str(steer["retry_after"])))
        if steer.get("close"):
            headers.append(("Connection", "close"))
        answer = b"accepted"
        headers.append(("Content-Length", str(len(answer))))
        status = int(steer.get("respond_status", 200))
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=answer)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        return True
