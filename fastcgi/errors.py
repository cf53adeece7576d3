"""Errors, one family per layer.

Protocol errors come from the sans-IO core: ``LocalProtocolError`` means *we* tried to do
something the protocol forbids (a bug in the caller), ``RemoteProtocolError`` means the peer
sent bytes that break the protocol.  Backend errors come from the I/O layer and always name
the backend's address, because an operator reading a log line needs to know which pool broke.
"""

from __future__ import annotations

from fastcgi.spec import ProtocolStatus


class FastCGIError(Exception):
    """Base of everything this package raises on purpose."""


class ProtocolError(FastCGIError):
    """The FastCGI byte stream is not valid in the current state."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow now."""


class RemoteProtocolError(ProtocolError):
    """The backend sent something malformed, out of order, or over a limit."""


class BackendError(FastCGIError):
    """An I/O failure talking to one backend address."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address


class ConnectError(BackendError):
    """The backend could not be reached (refused, no such socket, unreachable)."""


class OutOfDescriptors(ConnectError):
    """busgate could not open a socket: its open files limit (or the system's) is reached.
    The backend was never tried, so this says nothing about it."""


class ConnectionLost(BackendError):
    """The connection broke while a request was in flight (reset, EOF, protocol error)."""


class RequestRejected(BackendError):
    """The backend ended the request with a protocol status other than REQUEST_COMPLETE.

    php-fpm never sends these in practice, other servers do: ``overloaded`` is the signal
    that the job should be retried later *without* spending an attempt.
    """

    def __init__(self, address: str, protocol_status: int) -> None:
        try:
            name = ProtocolStatus(protocol_status).name
        except ValueError:
            name = f"protocol status {protocol_status}"
        super().__init__(address, f"request rejected: {name}")
        self.protocol_status = protocol_status

    @property
    def overloaded(self) -> bool:
        return self.protocol_status == ProtocolStatus.OVERLOADED


class BackendTimeout(BackendError, TimeoutError):
    """A deadline expired; the connection it happened on has been closed."""


class ConnectTimeout(BackendTimeout, ConnectError):
    """Connecting took longer than the connect deadline."""


class WriteTimeout(BackendTimeout):
    """Sending the request took longer than the write deadline."""


class ReadTimeout(BackendTimeout):
    """The response did not complete before the read deadline."""


class PoolTimeout(BackendTimeout):
    """No connection became free before the pool deadline."""
