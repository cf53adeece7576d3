"""The HTTP server on ``listen.http``: h11 over trio, kept-alive connections, a route table.

It carries the producer HTTP API, the admin API, the dashboard, ``/metrics`` and the live
WebSocket.  Every wait has a deadline: a request must arrive whole within
``REQUEST_TIMEOUT``, an idle kept-alive connection is closed after ``IDLE_TIMEOUT``, and a
response the client does not read within ``SEND_TIMEOUT`` ends the connection.  Bodies are
limited per route (``Route.max_body``): an oversized one is refused with 413 before it is
read, so memory stays bounded whatever a client sends.  A WebSocket upgrade is handed, with
the bytes already read, to trio-websocket.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from gateway import logs

log = logging.getLogger("busgate.http")

REQUEST_TIMEOUT = 30.0
IDLE_TIMEOUT = 60.0
SEND_TIMEOUT = 30.0
MAX_HEADERS = 64 * 1024
DEFAULT_MAX_BODY = 1024 * 1024
_RECEIVE_SIZE = 64 * 1024
#: How often a drain looks for requests still being answered.
_DRAIN_POLL = 0.01


class HTTPError(Exception):
    """Ends a request with this status and a JSON ``{"error": message}`` body."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)

    def response(self) -> Response:
        return Response.json({"error": self.message}, self.status, self.headers)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]  # one value a name (see _query_of)
    headers: Mapping[str, str]  # lower-case names (see _fields_of)
    body: bytes
    params: Mapping[str, str] = field(default_factory=dict)  # from the route pattern
    peer: str = ""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self, read: Callable[[str], Any] | None = None) -> Any:
        """The body as JSON, as RFC 8259 has it: Python's NaN and Infinity (or a number too
        large for a float) would be stored as payloads no backend can decode.

        ``read`` reads the document's text in its own way (with ``JSON_DECODER``, piece by
        piece: see ``producer_http``); what it raises is answered as any invalid body is."""
        body = self.body
        try:
            # As json.loads reads bytes, with one decoder built once: loads builds one a call.
            text = body.decode(json.detect_encoding(body), "surrogatepass")
            return JSON_DECODER.decode(text) if read is None else read(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise HTTPError(400, "the body is JSON nested too deeply") from None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text} is out of range")
    return number


#: The strict reader of bodies; its ``raw_decode`` reads one value of a body read piece by piece.
JSON_DECODER = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite_float)


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"

    @classmethod
    def json(
        cls, document: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()
    ) -> Response:
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        # A lone surrogate (a job stored before pushes refused them) is the one thing UTF-8
        # cannot encode; backslashreplace writes it as JSON's own escape, "\ud800", so the
        # answer stays valid JSON and the operator can still see and act on that job.
        return cls(status, text.encode("utf-8", "backslashreplace"), tuple(headers))


Handler = Callable[[Request], Awaitable[Response]]
WebSocketHandler = Callable[[trio.abc.Stream, "Request"], Awaitable[None]]


#: A body size limit, or what returns it when the limit can change (a reload).
BodyLimit = int | Callable[[], int]
#: Checks a request's head (``body`` is empty) before its body is read: raises ``HTTPError``
#: (401, say) so that nobody without credentials can make the daemon hold a body.
Guard = Callable[[Request], None]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    max_body: BodyLimit = DEFAULT_MAX_BODY
    guard: Guard | None = None

    def body_limit(self) -> int:
        return self.max_body if isinstance(self.max_body, int) else self.max_body()


class Router:
    """Routes by method and a path template like ``/v1/queues/{queue}/jobs``."""

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.websockets: dict[str, WebSocketHandler] = {}

    def add(
        self,
        method: str,
        template: str,
        handler: Handler,
        *,
        max_body: BodyLimit | None = None,
        guard: Guard | None = None,
    ) -> None:
        """``max_body``: by default none for a GET (which carries no body: read anyway, an
        unguarded one would hold a megabyte for anyone), DEFAULT_MAX_BODY otherwise."""
        if max_body is None:
            max_body = 0 if method == "GET" else DEFAULT_MAX_BODY
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
        self.routes.append(Route(method, re.compile(f"{regex}$"), handler, max_body, guard))

    def websocket(self, path: str, handler: WebSocketHandler) -> None:
        self.websockets[path] = handler

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route in self.routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, {name: unquote(value) for name, value in found.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            raise HTTPError(
                405, f"{method} is not allowed here", [("Allow", ", ".join(sorted(set(allowed))))]
            )
        if path in self.websockets:  # asked for without the WebSocket handshake
            raise HTTPError(
                426,
                f"{path} is a WebSocket: open it with a WebSocket client",
                [("Upgrade", "websocket")],
            )
        raise HTTPError(404, f"no such endpoint: {path}")


@dataclass(frozen=True, slots=True)
class HTTPStatistics:
    address: str
    connections: int
    connections_total: int
    requests_total: int
    errors_total: int  # 4xx and 5xx answers
    rejected_total: int  # connections refused past max_connections


async def open_listeners(setting: str, host: str, port: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners``, with an error that names the setting and the address:
    "[Errno 98] Address already in use" alone does not say which of busgate's ports."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(exc.errno, f"{setting} {where}: {exc.strerror or exc}") from exc


#: accept(2) failing for want of resources (a full file table): the connections already
#: open go on being served, and the port tries again after ACCEPT_PAUSE.
_ACCEPT_CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE = 0.1


async def serve_listeners(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    listeners: list[trio.SocketListener],
    *,
    setting: str,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``trio.serve_listeners``, but a port that cannot accept for want of descriptors says
    so once a minute, and when it can again: trio's logs a traceback ten times a second
    (17,000 lines in three minutes) for as long as the limit is reached."""
    failures = logs.Repeating(log)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(
                _accept, listener, handler, handler_nursery or nursery, setting, failures
            )
        task_status.started(listeners)


async def _accept(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    nursery: trio.Nursery,
    setting: str,
    failures: logs.Repeating,
) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY:
                    raise
                failures.failed(
                    logging.ERROR,
                    "%s cannot accept connections: %s: the open files limit (LimitNOFILE) is"
                    " reached; the connections open are served, new ones wait",
                    setting,
                    os.strerror(exc.errno),
                )
                await trio.sleep(ACCEPT_PAUSE)
                continue
            if failures.failing:
                failures.recovered("%s accepts connections again", setting)
            nursery.start_soon(_serve_stream, handler, stream)


async def _serve_stream(
    handler: Callable[[trio.SocketStream], Awaitable[object]], stream: trio.SocketStream
) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


class HTTPServer:
    def __init__(
        self,
        router: Router,
        host: str,
        port: int,
        max_connections: Callable[[], int] = lambda: 10_000,
    ) -> None:
        self.router = router
        self.host = host
        self.port = port
        #: Asked per connection: a reload may change it.  Past it a connection gets a 503 and
        #: is closed, so idle connections cannot take every file descriptor (the Redis-protocol
        #: port's and the backends' too).
        self.max_connections = max_connections
        self.address = ""
        self._connections = 0
        self._connections_total = 0
        self._requests = 0
        self._errors = 0
        self._rejected = 0
        #: Requests read and not yet answered: a push among them may be stored already.
        self._answering = 0

    def statistics(self) -> HTTPStatistics:
        return HTTPStatistics(
            self.address,
            self._connections,
            self._connections_total,
            self._requests,
            self._errors,
            self._rejected,
        )

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await open_listeners("listen.http", self.host, self.port)
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("HTTP: producer API, admin API and dashboard on http://%s/", self.address)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve_listeners, self._serve, listeners, setting="listen.http")
            )
            task_status.started(self.address)

    async def drain(self, limit: float) -> None:
        """Return once no request is being answered, or after ``limit`` seconds.

        A push stored while the daemon stops must still get its answer: cut off, the
        producer would push again what the store has.  The server goes on serving meanwhile
        (a push now is refused by the stopped service; health and admin calls are answered).
        """
        with trio.move_on_after(limit):
            # Polled, and only here: an event would cost a check on every request's path.
            while self._answering:  # noqa: ASYNC110
                await trio.sleep(_DRAIN_POLL)

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self._connections >= self.max_connections():
            self._rejected += 1
            with trio.move_on_after(1):
                await _refuse(stream, 503, "too many connections", prefix="")
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        self._connections_total += 1
        peer = "?"
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
            await self._converse(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        except Exception:  # not this connection's failure to end the daemon (see _handle)
            log.exception("HTTP connection from %s failed", peer)
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    async def _converse(self, stream: trio.SocketStream, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        while True:
            try:
                # Idle, a connection waits up to IDLE_TIMEOUT for a request; once one has
                # begun (bytes of it came, maybe with the last one), its head is due within
                # REQUEST_TIMEOUT.
                begun = bool(conn.trailing_data[0])
                with trio.move_on_after(REQUEST_TIMEOUT if begun else IDLE_TIMEOUT) as idle:
                    head = await self._next(conn, stream, None if begun else idle)
            except h11.RemoteProtocolError as exc:  # not HTTP, or no Host: say so, then close
                await _refuse(stream, exc.error_status_hint, str(exc))
                return
            if idle.cancelled_caught or not isinstance(head, h11.Request):
                return
            if _head_size(head) > MAX_HEADERS:
                # h11 bounds a head only while it is incomplete: one that a later read
                # completes (64 KiB each) got through at up to twice the limit.
                await _refuse(stream, 431, f"the request head is over {MAX_HEADERS} bytes")
                return
            self._requests += 1
            self._answering += 1
            try:
                try:
                    request = _request_of(head, peer)
                except HTTPError as exc:  # a head refused whatever its route
                    response = exc.response()
                else:
                    if _is_websocket(head) and request.path in self.router.websockets:
                        self._answering -= 1  # a conversation from now on, not a request
                        try:
                            await self._upgrade(stream, head, conn, request)
                        finally:
                            self._answering += 1  # as the finally below takes it off
                        return
                    try:
                        response = await self._handle(conn, stream, head, request)
                    except h11.RemoteProtocolError as exc:  # in the body: say so, then close
                        self._errors += 1
                        await _refuse(stream, exc.error_status_hint, str(exc))
                        return
                if response.status >= 400:
                    self._errors += 1
                unread = conn.their_state is h11.SEND_BODY  # answered before reading the body
                keep = await self._respond(conn, stream, head, response, close=unread)
            finally:
                self._answering -= 1
            if unread:
                await _lingering_close(stream)
                return
            if not keep or conn.our_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return  # the client had not finished sending its body

    async def _next(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        idle: trio.CancelScope | None = None,
    ) -> h11.Event | type[h11.PAUSED]:
        """The next event; ``idle``, waiting for a request, is cut to REQUEST_TIMEOUT
        once its first bytes come."""
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                # h11's sentinels are classes; mypy cannot narrow `is not` on them.
                return cast("h11.Event | type[h11.PAUSED]", event)
            data = await stream.receive_some(_RECEIVE_SIZE)
            if idle is not None and data:
                idle.deadline = min(idle.deadline, trio.current_time() + REQUEST_TIMEOUT)
                idle = None
            conn.receive_data(bytes(data))

    async def _handle(
        self, conn: h11.Connection, stream: trio.SocketStream, head: h11.Request, request: Request
    ) -> Response:
        """The response to one request; never raises but for cancellation.

        A handler's unexpected exception is a 500 and a logged traceback: one odd request
        must not take the daemon (its producers and dispatchers) down with it.
        """
        try:
            return await self._dispatch(conn, stream, request)
        except h11.RemoteProtocolError:
            raise  # a malformed or cut-off body: the client's doing (_converse answers it)
        except Exception:
            log.exception("HTTP %s %r from %s failed", request.method, head.target, request.peer)
            return Response.json({"error": "internal error; the daemon's log has the details"}, 500)

    async def _dispatch(
        self, conn: h11.Connection, stream: trio.SocketStream, request: Request
    ) -> Response:
        try:
            route, params = self.router.match(request.method, request.path)
            request = replace(request, params=params)
            if route.guard is not None:
                route.guard(request)
            length = request.header("content-length")
            if length is not None and request.header("transfer-encoding") is not None:
                # Framed two ways: a proxy in front may have read it the other way, and
                # what we took for the body would be its next request (RFC 9112 6.3).
                raise HTTPError(400, "Content-Length and Transfer-Encoding together")
            limit = route.body_limit()
            if length is not None and length.isdigit() and int(length) > limit:
                raise HTTPError(
                    413, f"the body of {length} bytes is over the limit of {limit} bytes"
                )
            if conn.they_are_waiting_for_100_continue:
                with trio.move_on_after(SEND_TIMEOUT):
                    await stream.send_all(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
            with trio.fail_after(REQUEST_TIMEOUT):
                body = await self._read_body(conn, stream, limit)
            return await route.handler(replace(request, body=body))
        except HTTPError as exc:
            return exc.response()
        except trio.TooSlowError:
            return Response.json({"error": "the request body did not arrive in time"}, 408)

    async def _read_body(
        self, conn: h11.Connection, stream: trio.SocketStream, limit: int
    ) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next(conn, stream)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise HTTPError(413, f"the body is over the limit of {limit} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise HTTPError(400, "the request ended before its body")

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        head: h11.Request,
        response: Response,
        *,
        close: bool = False,
    ) -> bool:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        body = b"" if head.method == b"HEAD" else response.body
        try:
            head_event = h11.Response(
                status_code=response.status, headers=headers, reason=_reason(response.status)
            )
            data = conn.send(head_event) or b""
            if body:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return False
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            await stream.send_all(data)
        return not scope.cancelled_caught

    async def _upgrade(
        self,
        stream: trio.SocketStream,
        head: h11.Request,
        conn: h11.Connection,
        request: Request,
    ) -> None:
        handler = self.router.websockets[request.path]
        # trio-websocket performs the handshake itself: give it the request again, written
        # out from what h11 parsed (its bytes may have come in the read of an earlier
        # request), then whatever the client sent after it.
        lines = [b"%s %s HTTP/1.1" % (head.method, head.target)]
        lines += [b"%s: %s" % (name, value) for name, value in head.headers]
        replay = b"\r\n".join(lines) + b"\r\n\r\n" + conn.trailing_data[0]
        await handler(_Replay(stream, replay), request)


#: After answering a request whose body we did not read, keep reading (and dropping) what
#: the client still sends for this long, at most this much: closing with unread input makes
#: the kernel send a reset, and the client would lose our answer (nginx's lingering_close).
LINGER_TIME = 2.0
LINGER_BYTES = 64 * 1024 * 1024


async def _lingering_close(stream: trio.SocketStream) -> None:
    try:
        await stream.send_eof()
        drained = 0
        with trio.move_on_after(LINGER_TIME):
            while drained < LINGER_BYTES:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    break
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _head_size(head: h11.Request) -> int:
    """About the size the request head had on the wire (its line and fields)."""
    size = len(head.method) + len(head.target) + 12  # " ", " HTTP/1.1\r\n"
    for name, value in head.headers:
        size += len(name) + len(value) + 4  # ": ", "\r\n"
    return size


async def _refuse(
    stream: trio.SocketStream, status: int, reason: str, *, prefix: str = "malformed request: "
) -> None:
    """Answer, then close, without h11: a request h11 could not parse (its state is now
    ERROR), or a connection refused before any."""
    body = json.dumps({"error": f"{prefix}{reason}"}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with trio.move_on_after(SEND_TIMEOUT):
        await stream.send_all(head.encode() + body)


#: The request fields busgate reads as one value, with the names its errors give them.
#: RFC 9110 5.3 lets a recipient join a field's repeated lines with ", " only when the field
#: is a list.  Joined, two Content-Type lines are no content type (a JSON body was stored as
#: a raw payload), two equal Authorization lines no password; and which of two different
#: values a proxy in front acted on is anyone's guess.  So equal repeats count once and
#: different ones are a 400.  h11 itself refuses a second Host line (RFC 9112 3.2) and
#: Content-Length lines that differ.  A field newly read with ``Request.header`` goes here.
SINGLETON_FIELDS = {
    "authorization": "Authorization",
    "content-type": "Content-Type",
    "origin": "Origin",
    "traceparent": "traceparent",
}


def _request_of(head: h11.Request, peer: str) -> Request:
    """The request a head describes, its body still to come and no route asked yet.

    Raises ``HTTPError`` (400) for a head that busgate would have to guess at.
    """
    try:
        path, query = path_and_query(head.target)
    except ValueError as exc:  # "http://[x": an unbalanced IPv6 bracket
        raise HTTPError(400, f"malformed request target: {exc}") from None
    return Request(head.method.decode(), path, _query_of(query), _fields_of(head), b"", {}, peer)


def _fields_of(head: h11.Request) -> dict[str, str]:
    """A head's fields by lower-case name: a list field's lines joined with ", ", a
    ``SINGLETON_FIELDS`` one's equal lines as one (a 400 if they differ)."""
    fields: dict[str, str] = {}
    for raw_name, raw_value in head.headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name not in fields:
            fields[name] = value
        elif name in SINGLETON_FIELDS:
            if value != fields[name]:
                raise HTTPError(
                    400, f"{SINGLETON_FIELDS[name]} is sent more than once, with different values"
                )
        else:
            fields[name] = f"{fields[name]}, {value}"
    return fields


def _query_of(query: str) -> dict[str, list[str]]:
    """A query's parameters, each one value: every one busgate reads (``id``, ``priority``,
    ``status``, ``cursor``…) is a single value.  Handlers took the last of repeated ones
    while a proxy in front may check the first, so equal repeats count once and different
    ones are a 400."""
    # Blank values are values (XADD keeps an empty attribute; "?id=" is no id, not a new one);
    # bytes that are not UTF-8 are a 400, not U+FFFD standing in for what was sent.
    try:
        parameters = parse_qs(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the query is not valid UTF-8") from None
    for name, values in parameters.items():
        if len(set(values)) > 1:
            raise HTTPError(
                400, f"query parameter {name!r} is given more than once, with different values"
            )
        del values[1:]
    return parameters


def path_and_query(target: bytes) -> tuple[str, str]:
    """The path and query of a request target.

    What clients send (origin form, ``/v1/…?…``) is a path, even one that starts with
    ``//``: urlsplit reads ``//elsewhere/v1/…`` as a host and the rest as the path, so a
    proxy in front, allowing or denying by path, would see one path and busgate serve
    another.  Only the absolute form (``http://host/v1/…``, which proxies get) is a URL.
    """
    text = target.decode("latin-1").partition("#")[0]
    if text.startswith("/"):
        path, _, query = text.partition("?")
        return path, query
    parts = urlsplit(text)
    return parts.path or "/", parts.query  # http://host is http://host/ (RFC 9110 4.2.3)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:  # a status the standard library does not name
        return b""


def _is_websocket(head: h11.Request) -> bool:
    for name, value in head.headers:
        if name.lower() == b"upgrade" and value.lower() == b"websocket":
            return True
    return False


class _Replay(trio.abc.Stream):
    """A stream that first yields bytes already read from it, then reads on."""

    def __init__(self, stream: trio.SocketStream, replay: bytes) -> None:
        self._stream = stream
        self._replay = replay

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._replay:
            size = len(self._replay) if max_bytes is None else max_bytes
            data, self._replay = self._replay[:size], self._replay[size:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
