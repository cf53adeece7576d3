"""Delivering a job to php-fpm (or any FastCGI responder) as an ordinary POST request.

The script sees what it would see behind nginx: ``SCRIPT_FILENAME`` is the topic's script,
``REQUEST_URI`` the topic's ``uri`` (so a front controller routes the job to a normal route),
the payload is the request body byte for byte, and the job headers arrive as ``HTTP_*``.
In ``form`` mode the payload is sent urlencoded as the field ``payload``, so scripts that read
``$_POST['payload']`` work untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

from adapters.delivery.base import Delivery, Failure, failure_of, redirect_message
from adapters.delivery.headers import (
    JOB_HEADER_NAMES,
    SERVER_SOFTWARE,
    attribute_headers,
    cgi_name,
    job_header_values,
    request_body,
)
from adapters.storage.jobs import Job
from fastcgi.address import Address
from fastcgi.errors import (
    BackendError,
    ConnectTimeout,
    ReadTimeout,
    RemoteProtocolError,
    WriteTimeout,
)
from fastcgi.events import Params
from fastcgi.pairs import encode_pairs
from fastcgi.pool import ConnectionPool, PoolLimits, PoolStatistics, Timeouts


@dataclass(frozen=True, slots=True)
class FastCGITarget:
    address: Address
    script: str
    uri: str = "/"
    document_root: str | None = None  # default: the script's directory
    content_type: str = "application/json"  # or "form"
    timeout: float = 30.0  # the whole attempt: connection wait, write, the script's run
    host: str = "localhost"  # HTTP_HOST / SERVER_NAME the application sees
    max_connections: int = 4  # never more: each open connection pins a php-fpm worker
    connect_timeout: float = 5.0
    #: An idle connection still holds its php-fpm worker, which nginx or another daemon may
    #: need: let it go soon.  Reconnecting costs a connect(); a busy topic never idles this long.
    idle_timeout: float = 2.0
    #: Reuse a connection for the next job.  A script that calls fastcgi_finish_request()
    #: answers, then keeps its php-fpm child (and this connection) while it works on; a
    #: job sent on the connection meanwhile waits for that work, which its timeout and
    #: duration then count.  A new connection per job is accepted by a free child.
    keep_alive: bool = True
    extra_params: tuple[tuple[str, str], ...] = field(default=())


#: The names of the parameters each job has its own values for (``_job_values``): the body's
#: length, and the job headers as PHP reads them: ``$_SERVER['HTTP_X_BUSGATE_JOB_ID']``.
_JOB_PARAM_NAMES = (b"CONTENT_LENGTH", *(cgi_name(name) for name in JOB_HEADER_NAMES))


def _escaped(data: bytes) -> bytes:
    return data.replace(b"%", b"%%")


#: Those parameters as ``encode_pairs`` encodes them when every value is under 128 bytes: a
#: pair is the name's length, the value's length (``%c``), the name, the value (``%b``).  One
#: ``%`` per delivery builds them, rather than a list of pairs encoded one by one.
_SHORT_JOB_PAIRS = b"".join(
    _escaped(bytes((len(name),))) + b"%c" + _escaped(name) + b"%b" for name in _JOB_PARAM_NAMES
)


class FastCGIBackend:
    def __init__(self, target: FastCGITarget) -> None:
        self.target = target
        self.description = f"{target.address} {target.script}"
        self.pool = ConnectionPool(
            target.address,
            limits=PoolLimits(
                max_connections=target.max_connections,
                idle_timeout=target.idle_timeout,
                max_requests=None if target.keep_alive else 1,
            ),
            timeouts=Timeouts(connect=target.connect_timeout, write=None, read=None),
        )
        self._static = _static_params(target)
        self._static_encoded = encode_pairs(self._static)  # the same for every job: once
        #: What a relative Location in a script's answer is relative to: the URL it was
        #: asked for, as the application sees it (HTTP_HOST, REQUEST_URI).
        self._location_base = f"http://{target.host}{target.uri}"
        #: trio's clock; run() binds its own reader, without the three calls behind
        #: trio.current_time(): every delivery reads it.
        self._now: Callable[[], float] = trio.current_time

    def params(self, job: Job, body: bytes) -> list[tuple[bytes, bytes]]:
        """The CGI environment for one delivery (``busgate curl`` prints the same)."""
        return [*self._static, *self._job_params(job, body)]

    def _job_params(self, job: Job, body: bytes) -> list[tuple[bytes, bytes]]:
        params = list(zip(_JOB_PARAM_NAMES, _job_values(job, body), strict=True))
        if job.attributes:
            params += _attribute_params(job)
        return params

    def _job_pairs(self, job: Job, body: bytes) -> bytes:
        """``encode_pairs(self._job_params(job, body))``: the same bytes, built in one step."""
        values = _job_values(job, body)
        if max(map(len, values)) < 0x80:
            length, job_id, queue, topic, attempt, enqueued_at, trace = values
            pairs = _SHORT_JOB_PAIRS % (
                len(length),
                length,
                len(job_id),
                job_id,
                len(queue),
                queue,
                len(topic),
                topic,
                len(attempt),
                attempt,
                len(enqueued_at),
                enqueued_at,
                len(trace),
                trace,
            )
        else:
            pairs = encode_pairs(zip(_JOB_PARAM_NAMES, values, strict=True))
        if job.attributes:
            pairs += encode_pairs(_attribute_params(job))
        return pairs

    def body(self, job: Job) -> bytes:
        return request_body(self.target.content_type, job.payload)[1]

    async def deliver(self, job: Job) -> Delivery:
        timeout = self.target.timeout
        body = self.body(job)
        started = self._now()
        # One deadline for the whole attempt, waiting for and opening a connection included;
        # the pool enforces it without a cancel scope of ours.
        deadline = started + timeout
        # Pairs this backend built itself are bytes by construction: encoded here, they skip
        # the per-pair type check Params makes of pairs handed to it.
        params = Params((), self._static_encoded + self._job_pairs(job, body))
        try:
            response = await self.pool.request(params, body, deadline=deadline)
        except (BackendError, RemoteProtocolError) as exc:
            now = self._now()
            # Only once the request is on its way is the deadline a timeout, spending an
            # attempt.  Not connected or no free connection by then, php never saw the job:
            # a connect or pool failure, which spends nothing.
            if isinstance(exc, ReadTimeout | WriteTimeout) and now >= deadline:
                return Delivery(
                    now - started,
                    failure=Failure.TIMEOUT,
                    message=f"{self.target.address}: no response within {timeout:g}s",
                )
            message = self._failure_message(exc, now, deadline)
            return Delivery(now - started, failure=failure_of(exc), message=message)
        status = response.status
        # Positional (duration, status, headers, body, stderr): keywords cost more to bind.
        delivery = Delivery(
            response.elapsed, status, response.headers, response.body, response.stderr
        )
        if 300 <= status < 400:  # not followed: the attempt says where it pointed
            delivery.message = redirect_message(status, response.headers, self._location_base)
        return delivery

    def _failure_message(
        self, exc: BackendError | RemoteProtocolError, now: float, deadline: float
    ) -> str:
        if isinstance(exc, ConnectTimeout) and now < deadline:
            # The topic's connect_timeout ran out, not the attempt's: say it was the connect
            # (the pool's words, "not connected within 5.0s", leave the reader to guess).
            connect_timeout = self.target.connect_timeout
            return f"{exc.address}: connect timeout: not connected within {connect_timeout:g}s"
        return str(exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._now = trio.lowlevel.current_clock().current_time
        try:
            await self.pool.run(task_status=task_status)
        finally:
            self._now = trio.current_time

    async def aclose(self) -> None:
        await self.pool.aclose()

    def statistics(self) -> PoolStatistics:
        return self.pool.statistics()


def _job_values(job: Job, body: bytes) -> tuple[bytes, ...]:
    """The values of ``_JOB_PARAM_NAMES`` for a delivery of ``job`` (a fresh span each time)."""
    # str.encode (UTF-8) through map: no comprehension frame per job.
    return (b"%d" % len(body), *map(str.encode, job_header_values(job)))


def _attribute_params(job: Job) -> list[tuple[bytes, bytes]]:
    return [(cgi_name(name), value.encode("utf-8")) for name, value in attribute_headers(job)]


def _static_params(target: FastCGITarget) -> list[tuple[bytes, bytes]]:
    """The part of the environment that is the same for every job of a topic."""
    document_root = target.document_root or os.path.dirname(target.script)
    parts = urlsplit(target.uri)
    script_name = target.script
    if script_name.startswith(document_root.rstrip("/") + "/"):
        script_name = script_name[len(document_root.rstrip("/")) :]
    content_type = request_body(target.content_type, b"")[0]
    if target.address.is_unix:
        server_addr, server_port = "127.0.0.1", "80"
    else:
        server_addr, server_port = target.address.host, "80"
    pairs = [
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_SOFTWARE", SERVER_SOFTWARE),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("SERVER_NAME", target.host),
        ("SERVER_ADDR", server_addr),
        ("SERVER_PORT", server_port),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", "0"),
        ("REQUEST_METHOD", "POST"),
        ("REQUEST_SCHEME", "http"),
        ("SCRIPT_FILENAME", target.script),
        ("SCRIPT_NAME", script_name),
        ("DOCUMENT_ROOT", document_root),
        ("DOCUMENT_URI", parts.path or "/"),
        ("REQUEST_URI", target.uri),
        ("QUERY_STRING", parts.query),
        ("CONTENT_TYPE", content_type),
        ("HTTP_HOST", target.host),
        *target.extra_params,
    ]
    return [(name.encode(), value.encode("utf-8")) for name, value in pairs]
