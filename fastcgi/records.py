"""The FastCGI record layer: framing, padding, and the fixed-size record bodies.

A record is an 8-byte header (version, type, request id, content length, padding length),
the content, and padding.  Streams (PARAMS, STDIN, STDOUT, STDERR, DATA) are sequences of
records ended by one with empty content.  Nothing here knows about request state; that is
``connection``'s job.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple

from fastcgi.errors import LocalProtocolError, RemoteProtocolError
from fastcgi.spec import HEADER_LEN, KEEP_CONN, MAX_CONTENT_LEN, VERSION_1, RecordType, Role

_HEADER = struct.Struct("!BBHHBx")
_BEGIN_REQUEST_BODY = struct.Struct("!HB5x")
_END_REQUEST_BODY = struct.Struct("!IB3x")
_UNKNOWN_TYPE_BODY = struct.Struct("!B7x")

#: Stream data is cut into chunks of this size: the largest multiple of 8 that fits in the
#: 16-bit length field, so full chunks need no padding.
STREAM_CHUNK = MAX_CONTENT_LEN - MAX_CONTENT_LEN % 8

_PADDING = bytes(8)

#: Record types whose content has a fixed length; anything else from the peer is impossible.
_FIXED_CONTENT_LEN = {
    RecordType.BEGIN_REQUEST: _BEGIN_REQUEST_BODY.size,
    RecordType.END_REQUEST: _END_REQUEST_BODY.size,
    RecordType.UNKNOWN_TYPE: _UNKNOWN_TYPE_BODY.size,
    RecordType.ABORT_REQUEST: 0,
}


class Record(NamedTuple):
    """One decoded record.  ``type`` stays an ``int`` so unknown types survive decoding.

    A named tuple rather than a dataclass: one is built per record received, and a tuple is
    the cheapest object Python can build.  The reader builds it with ``tuple.__new__``: the
    generated ``Record(...)`` constructor is a Python-level call costing more than the tuple.
    """

    type: int
    request_id: int
    content: bytes


def encode_record(record_type: int, request_id: int, content: bytes = b"") -> bytes:
    """Encode one record, padded to a multiple of 8 bytes."""
    length = len(content)
    if length > MAX_CONTENT_LEN:
        raise LocalProtocolError(f"record content of {length} bytes exceeds {MAX_CONTENT_LEN}")
    if not 0 <= request_id <= 0xFFFF:
        raise LocalProtocolError(f"request id {request_id} out of range")
    padding = -length % 8
    return _HEADER.pack(VERSION_1, record_type, request_id, length, padding) + (
        content + _PADDING[:padding] if padding else content
    )


def encode_stream(record_type: int, request_id: int, data: bytes) -> bytes:
    """Encode ``data`` as as many stream records as it takes; empty data encodes to nothing.

    The end-of-stream marker is a separate empty record (``encode_record(type, id)``), so a
    caller can stream a body in several pieces.
    """
    if len(data) <= STREAM_CHUNK:
        return encode_record(record_type, request_id, data) if data else b""
    view = memoryview(data)
    return b"".join(
        encode_record(record_type, request_id, bytes(view[i : i + STREAM_CHUNK]))
        for i in range(0, len(data), STREAM_CHUNK)
    )


# Plain ints, as in connection: an enum member is a slower lookup, and this is per request.
_BEGIN_REQUEST, _PARAMS, _STDIN = map(
    int, (RecordType.BEGIN_REQUEST, RecordType.PARAMS, RecordType.STDIN)
)
_RESPONDER = int(Role.RESPONDER)


def encode_request(request_id: int, params: bytes, body: bytes, keep_conn: bool) -> bytes:
    """A whole RESPONDER request: BEGIN_REQUEST, the PARAMS stream of the encoded pairs
    ``params`` and the STDIN stream of ``body``, each stream ended.

    The same bytes as ``encode_record`` and ``encode_stream`` make of them, framed in one join
    when each stream fits one record (a job's request nearly always does): that is a dozen
    calls fewer per request.  ``request_id`` must be valid (1..65535).
    """
    begin, params_end, body_end = _request_records(request_id, keep_conn)
    params_len, body_len = len(params), len(body)
    if not (0 < params_len <= STREAM_CHUNK and 0 < body_len <= STREAM_CHUNK):
        return b"".join(
            (
                begin,
                encode_stream(_PARAMS, request_id, params),
                params_end,
                encode_stream(_STDIN, request_id, body),
                body_end,
            )
        )
    params_padding, body_padding = -params_len % 8, -body_len % 8
    return b"".join(
        (
            begin,
            _HEADER.pack(VERSION_1, _PARAMS, request_id, params_len, params_padding),
            params,
            _PADDING[:params_padding],
            params_end,
            _HEADER.pack(VERSION_1, _STDIN, request_id, body_len, body_padding),
            body,
            _PADDING[:body_padding],
            body_end,
        )
    )


@functools.cache
def _request_records(request_id: int, keep_conn: bool) -> tuple[bytes, bytes, bytes]:
    """The records of a request that are the same for every one on a connection: its
    BEGIN_REQUEST, and the ends of its PARAMS and STDIN streams."""
    return (
        encode_record(_BEGIN_REQUEST, request_id, begin_request_body(_RESPONDER, keep_conn)),
        encode_record(_PARAMS, request_id),
        encode_record(_STDIN, request_id),
    )


def begin_request_body(role: int, keep_conn: bool) -> bytes:
    return _BEGIN_REQUEST_BODY.pack(role, KEEP_CONN if keep_conn else 0)


def parse_begin_request_body(content: bytes) -> tuple[int, bool]:
    role, flags = _BEGIN_REQUEST_BODY.unpack(content)
    return role, bool(flags & KEEP_CONN)


def end_request_body(app_status: int, protocol_status: int) -> bytes:
    return _END_REQUEST_BODY.pack(app_status, protocol_status)


def parse_end_request_body(content: bytes) -> tuple[int, int]:
    app_status, protocol_status = _END_REQUEST_BODY.unpack(content)
    return app_status, protocol_status


def unknown_type_body(record_type: int) -> bytes:
    return _UNKNOWN_TYPE_BODY.pack(record_type)


def parse_unknown_type_body(content: bytes) -> int:
    (record_type,) = _UNKNOWN_TYPE_BODY.unpack(content)
    return int(record_type)


class RecordReader:
    """Incremental decoder: feed bytes in any split, take whole records out.

    The buffer never holds more than one incomplete record (at most 8 + 65535 + 255 bytes)
    beyond what the caller has not yet taken, so the reader itself needs no size limit; the
    limits on what a *response* may add up to live in ``connection``.  Consumed bytes are
    skipped with an offset and dropped once per ``feed``, not once per record.
    """

    __slots__ = ("_buffer", "_eof", "_pos")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0
        self._eof = False

    def feed(self, data: bytes | bytearray) -> None:
        if self._eof and data:
            raise RemoteProtocolError("data received after end of stream")
        if not data:
            self._eof = True
            return
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    @property
    def at_eof(self) -> bool:
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as records."""
        return len(self._buffer) - self._pos

    def next_record(self) -> Record | None:
        """Return the next whole record, or None if more bytes are needed.

        Raises ``RemoteProtocolError`` for a bad version, an impossible length, or a stream
        that ended in the middle of a record.
        """
        buffer, pos = self._buffer, self._pos
        available = len(buffer) - pos
        if available < HEADER_LEN:
            if self._eof and available:
                raise RemoteProtocolError(
                    f"connection closed inside a record header ({available} of 8 bytes)"
                )
            return None
        version, record_type, request_id, length, padding = _HEADER.unpack_from(buffer, pos)
        if version != VERSION_1:
            raise RemoteProtocolError(f"unsupported FastCGI version {version} (expected 1)")
        expected = _FIXED_CONTENT_LEN.get(record_type)
        if expected is not None and length != expected:
            raise RemoteProtocolError(
                f"{RecordType(record_type).name} record with content length {length}"
                f" (must be {expected})"
            )
        total = HEADER_LEN + length + padding
        if available < total:
            if self._eof:
                raise RemoteProtocolError(
                    f"connection closed inside a record ({available} of {total} bytes)"
                )
            return None
        start = pos + HEADER_LEN
        content = bytes(buffer[start : start + length]) if length else b""
        self._pos = pos + total
        return tuple.__new__(Record, (record_type, request_id, content))
