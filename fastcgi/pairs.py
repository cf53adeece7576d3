"""FastCGI name-value pairs (PARAMS, GET_VALUES, GET_VALUES_RESULT).

Each length is one byte when under 128, otherwise four bytes with the high bit set.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from fastcgi.errors import LocalProtocolError, RemoteProtocolError

_LONG = struct.Struct("!I")
_MAX_LEN = 0x7FFFFFFF


def _encode_length(length: int) -> bytes:
    if length < 0x80:
        return _SHORT[length]
    if length > _MAX_LEN:
        raise LocalProtocolError(f"name or value of {length} bytes exceeds {_MAX_LEN}")
    return _LONG.pack(length | 0x80000000)


_SHORT = [bytes((n,)) for n in range(0x80)]


def encode_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    parts: list[bytes] = []
    for name, value in pairs:
        name_len, value_len = len(name), len(value)
        if name_len < 0x80 and value_len < 0x80:
            parts += (_SHORT[name_len], _SHORT[value_len], name, value)
        else:
            parts += (_encode_length(name_len), _encode_length(value_len), name, value)
    return b"".join(parts)


def _decode_length(data: bytes | memoryview, offset: int) -> tuple[int, int]:
    if offset >= len(data):
        raise RemoteProtocolError("name-value pair truncated in a length")
    first = data[offset]
    if first < 0x80:
        return first, offset + 1
    if offset + 4 > len(data):
        raise RemoteProtocolError("name-value pair truncated in a 4-byte length")
    (length,) = _LONG.unpack_from(data, offset)
    return length & _MAX_LEN, offset + 4


def decode_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    """Decode a complete pair stream; raises ``RemoteProtocolError`` if it is cut short."""
    pairs: list[tuple[bytes, bytes]] = []
    offset = 0
    while offset < len(data):
        name_len, offset = _decode_length(data, offset)
        value_len, offset = _decode_length(data, offset)
        end = offset + name_len + value_len
        if end > len(data):
            raise RemoteProtocolError(
                f"name-value pair claims {name_len}+{value_len} bytes,"
                f" only {len(data) - offset} remain"
            )
        pairs.append((data[offset : offset + name_len], data[offset + name_len : end]))
        offset = end
    return pairs
