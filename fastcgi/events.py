"""Events of a FastCGI client connection: what the client sends, and what it receives.

Events are frozen dataclasses validated when built, so a bad value fails where it is made,
not somewhere inside the encoder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from fastcgi.errors import LocalProtocolError
from fastcgi.pairs import encode_pairs
from fastcgi.spec import ProtocolStatus, Role

Pair = tuple[bytes, bytes]


def _check_pairs(pairs: tuple[Pair, ...]) -> None:
    for pair in pairs:
        if (
            type(pair) is not tuple
            or len(pair) != 2
            or type(pair[0]) is not bytes
            or (type(pair[1]) is not bytes)
        ):
            raise LocalProtocolError(f"name-value pairs must be (bytes, bytes), got {pair!r}")


# -- sent by the client ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BeginRequest:
    role: Role = Role.RESPONDER
    keep_conn: bool = True


@dataclass(frozen=True, slots=True)
class Params:
    """The whole parameter set of a request; encoding appends the end-of-stream record.

    ``encoded`` is a block of name-value pairs already encoded (``pairs.encode_pairs``) and
    sent before ``pairs``: a client whose parameters are mostly the same on every request
    (busgate's per-topic CGI environment) encodes and checks that part once.

    The value is immutable, so it is encoded once, when built (``wire``): a parameter set
    reused for many requests costs its encoding once, not per request.
    """

    pairs: tuple[Pair, ...]
    encoded: bytes = b""
    wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.encoded) is not bytes:
            raise LocalProtocolError("pre-encoded parameters must be bytes")
        wire = self.encoded
        if self.pairs:  # none, for a delivery's parameters: all pre-encoded, built per job
            _check_pairs(self.pairs)
            wire += encode_pairs(self.pairs)
        object.__setattr__(self, "wire", wire)

    @classmethod
    def of(cls, params: Mapping[bytes, bytes] | Iterable[Pair]) -> Params:
        items = params.items() if isinstance(params, Mapping) else params
        return cls(tuple(items))


@dataclass(frozen=True, slots=True)
class Stdin:
    """A piece of the request body; ``end_stream`` closes the body (the usual case)."""

    data: bytes
    end_stream: bool = True


@dataclass(frozen=True, slots=True)
class Data:
    """FILTER role only: a piece of the file data stream sent after stdin."""

    data: bytes
    end_stream: bool = True


@dataclass(frozen=True, slots=True)
class AbortRequest:
    pass


@dataclass(frozen=True, slots=True)
class GetValues:
    """Management query (request id 0) for variables such as FCGI_MAX_CONNS."""

    names: tuple[bytes, ...]


# -- received from the server ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stdout:
    data: bytes


@dataclass(frozen=True, slots=True)
class Stderr:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndRequest:
    app_status: int
    protocol_status: int

    @property
    def complete(self) -> bool:
        return self.protocol_status == ProtocolStatus.REQUEST_COMPLETE


@dataclass(frozen=True, slots=True)
class GetValuesResult:
    values: tuple[Pair, ...]


@dataclass(frozen=True, slots=True)
class UnknownType:
    """The server did not understand a management record type we sent."""

    record_type: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The server closed the connection at a point where that is allowed."""


class FullResponse(NamedTuple):
    """A whole response, folded from its events by ``ClientConnection.receive_response``.

    A named tuple: one is built per request on the hot path, and nothing is cheaper to build.
    """

    stdout: bytes
    stderr: bytes
    app_status: int
    protocol_status: int

    @property
    def complete(self) -> bool:
        return self.protocol_status == ProtocolStatus.REQUEST_COMPLETE


ClientEvent = BeginRequest | Params | Stdin | Data | AbortRequest | GetValues
ServerEvent = Stdout | Stderr | EndRequest | GetValuesResult | UnknownType | ConnectionClosed
