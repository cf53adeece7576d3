"""What a delivery adapter returns, whatever the backend protocol.

An adapter never raises for a backend's misbehaviour: a refused connection, a timeout or a
lying server is a ``Delivery`` with a ``failure`` kind, so the dispatcher's policy decides what
it means.  Only cancellation and programming errors propagate.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urljoin

import trio

from adapters.storage.jobs import Job
from fastcgi.cgi import find_header
from fastcgi.errors import (
    BackendError,
    ConnectError,
    ConnectionLost,
    OutOfDescriptors,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    RequestRejected,
    WriteTimeout,
)


class Failure(enum.Enum):
    """Why no usable response came back."""

    CONNECT = "connect"  # refused, no such socket, unreachable: the job never reached it
    OVERLOADED = "overloaded"  # the backend said so (FCGI_OVERLOADED): it never ran the job
    POOL_TIMEOUT = "pool-timeout"  # no free connection in time: the job never left
    #: busgate out of file descriptors (its open files limit): the job never left, and the
    #: backend was not tried, so its circuit does not count it
    NO_DESCRIPTORS = "no-descriptors"
    TIMEOUT = "timeout"  # no complete response within the topic's timeout
    CONNECTION_LOST = "connection-lost"  # reset or closed mid-request
    PROTOCOL = "protocol"  # the backend's bytes broke the protocol
    INTERNAL = "internal"  # busgate failed to make the request (a bug: logged, traceback too)

    @property
    def job_never_ran(self) -> bool:
        """The backend provably did not start the job, so no attempt is spent."""
        return self in _NEVER_RAN


@dataclass(slots=True)  # not frozen: one per attempt, and a frozen one costs 5x to build
class Delivery:
    """The result of one delivery attempt (a value: nothing changes it once built)."""

    duration: float  # seconds, the job's processing time as the backend saw it
    status: int | None = None  # response status; None when ``failure`` is set
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    stderr: bytes = b""  # FastCGI only
    failure: Failure | None = None
    message: str = ""  # the failure in words, naming the backend; for a 3xx, where it points

    def header(self, name: bytes) -> bytes | None:
        return find_header(self.headers, name)


_NEVER_RAN = frozenset(
    {Failure.CONNECT, Failure.OVERLOADED, Failure.POOL_TIMEOUT, Failure.NO_DESCRIPTORS}
)


def failure_of(exc: BackendError | RemoteProtocolError) -> Failure:
    """What kind of failure a transport error was (FastCGI and HTTP alike)."""
    if isinstance(exc, RequestRejected):
        return Failure.OVERLOADED if exc.overloaded else Failure.PROTOCOL
    if isinstance(exc, PoolTimeout):
        return Failure.POOL_TIMEOUT
    if isinstance(exc, OutOfDescriptors):
        return Failure.NO_DESCRIPTORS
    if isinstance(exc, ConnectError):  # ConnectTimeout included
        return Failure.CONNECT
    if isinstance(exc, ReadTimeout | WriteTimeout):
        return Failure.TIMEOUT
    if isinstance(exc, ConnectionLost):
        return Failure.CONNECTION_LOST
    return Failure.PROTOCOL


class Backend(Protocol):
    """A topic's delivery adapter."""

    description: str  # where it delivers, for logs: "fastcgi://127.0.0.1:9000 /srv/index.php"

    async def deliver(self, job: Job) -> Delivery:
        """One attempt, bounded by the topic's timeout; never raises for backend failures."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Background upkeep (closing idle connections) until cancelled."""

    async def aclose(self) -> None: ...

    def statistics(self) -> Any: ...


@asynccontextmanager
async def running(backend: Backend) -> AsyncIterator[Backend]:
    """A backend used outside a dispatcher (a test delivery): its upkeep runs for the block.

    The FastCGI pool enforces deadlines from its ``run()`` task, so a backend must be running
    to deliver.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        try:
            yield backend
        finally:
            await backend.aclose()
            nursery.cancel_scope.cancel()


#: How much of a redirect's target its message shows: enough to tell one target from
#: another, not a page of query string in every log line and dead-letter entry.
_LOCATION_SHOWN = 200


def redirect_message(status: int, headers: tuple[tuple[bytes, bytes], ...], base: str) -> str:
    """Where a 3xx answer points, resolved against ``base`` (the URL the backend was asked)
    as a client following it would: busgate does not follow it, so the operator must see
    where the service moved to.  The status's own phrase, not the server's (which may say
    anything).  An HTTP answer and a script's CGI headers (any case) alike."""
    try:
        said = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        said = str(status)
    # Location is a singleton field (RFC 9110 10.2.2).  The same value repeated is that
    # value; different values are malformed: nobody can tell which the service meant,
    # and joining them with ", " (right only for list fields) makes a URL of neither.
    locations = list(dict.fromkeys(value for name, value in headers if name.lower() == b"location"))
    if not locations:
        return f"{said}, without a Location"
    if len(locations) > 1:
        return f"{said} -> {len(locations)} different Location fields"
    target = _printable(locations[0].decode("utf-8", "backslashreplace"))
    try:
        target = urljoin(base, target)
    except ValueError:  # "http://[oops": not a URL; shown as it came
        pass
    if len(target) > _LOCATION_SHOWN:
        target = target[:_LOCATION_SHOWN] + "…"
    return f"{said} -> {target}"


def _printable(text: str) -> str:
    """``text`` with every character that is not printable written as its escape (``\\x1b``,
    ``\\u202e``, ``\\t``): a backend's text goes to log lines, terminals and the dashboard,
    where a control character or a right-to-left override would rewrite what is shown."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
