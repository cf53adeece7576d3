"""FastCGI 1.0 for busgate.

The protocol core (``records``, ``pairs``, ``events``, ``connection``, ``cgi``) is sans-IO: it
turns events into bytes and bytes into events and never touches a socket.  ``pool`` wraps it
in trio with a capped, kept-alive connection pool for one backend.
"""

from fastcgi.address import Address, parse_address
from fastcgi.cgi import CGIResponse, parse_cgi_response
from fastcgi.connection import NEED_DATA, ClientConnection, Limits, State
from fastcgi.errors import (
    BackendError,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    FastCGIError,
    LocalProtocolError,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    RequestRejected,
    WriteTimeout,
)
from fastcgi.events import (
    AbortRequest,
    BeginRequest,
    ConnectionClosed,
    Data,
    EndRequest,
    GetValues,
    GetValuesResult,
    Params,
    Stderr,
    Stdin,
    Stdout,
    UnknownType,
)
from fastcgi.spec import ProtocolStatus, RecordType, Role

__all__ = [
    "NEED_DATA",
    "AbortRequest",
    "Address",
    "BackendError",
    "BeginRequest",
    "CGIResponse",
    "ClientConnection",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "ConnectionLost",
    "Data",
    "EndRequest",
    "FastCGIError",
    "GetValues",
    "GetValuesResult",
    "Limits",
    "LocalProtocolError",
    "Params",
    "PoolTimeout",
    "ProtocolError",
    "ProtocolStatus",
    "ReadTimeout",
    "RecordType",
    "RemoteProtocolError",
    "RequestRejected",
    "Role",
    "State",
    "Stderr",
    "Stdin",
    "Stdout",
    "UnknownType",
    "WriteTimeout",
    "parse_address",
    "parse_cgi_response",
]
