"""CGI response parsing (RFC 3875 section 6): the header block php-fpm writes to stdout.

The status comes from a ``Status:`` header, defaulting to 200, or to 302 when only a
``Location:`` is given.  Header lines end with CRLF or a bare LF (PHP writes CRLF; other
FastCGI apps do not always).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import NamedTuple

from fastcgi.errors import RemoteProtocolError

DEFAULT_MAX_HEADER_SIZE = 64 * 1024

#: Header blocks up to this size are parsed once and remembered (see ``_parse_head``).
_CACHED_HEAD_SIZE = 1024

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_STATUS = re.compile(rb"\s*(\d{3})(?:\s+(.*?))?\s*")

Headers = tuple[tuple[bytes, bytes], ...]


class CGIResponse(NamedTuple):
    # A named tuple: one is built per delivery, and a tuple is the cheapest object to build.
    status: int
    reason: str
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return find_header(self.headers, name)


def find_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first header called ``name`` (case-insensitive), or None."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def parse_cgi_response(
    stdout: bytes, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE
) -> CGIResponse:
    """Split a complete CGI response into status, headers and body."""
    limit = max_header_size + 4
    end = stdout.find(b"\r\n\r\n", 0, limit)  # what PHP writes: skip the regex
    if 0 <= end <= _CACHED_HEAD_SIZE:
        parsed = _parse_cached_crlf_head(stdout[:end])
        if parsed is not None:  # the usual answer, in one look-up
            status, reason, headers = parsed
            return tuple.__new__(CGIResponse, (status, reason, headers, stdout[end + 4 :]))
    head = stdout[:end] if end >= 0 else b""
    if end >= 0 and b"\n\n" not in head and b"\n\r\n" not in head:
        body = stdout[end + 4 :]
    else:
        match = _HEADER_END.search(stdout, 0, limit)
        if match is None:
            if len(stdout) > max_header_size:
                raise RemoteProtocolError(
                    f"CGI header block exceeds the limit of {max_header_size} bytes"
                )
            if not stdout:
                raise RemoteProtocolError("empty CGI response: no header block")
            raise RemoteProtocolError("CGI response has no end of headers (blank line)")
        head, body = stdout[: match.start()], stdout[match.end() :]
    if len(head) <= _CACHED_HEAD_SIZE:
        status, reason, headers = _parse_cached_head(head)
    else:
        status, reason, headers = _parse_head(head)
    # tuple.__new__, not the generated constructor: one Python call less per response.
    return tuple.__new__(CGIResponse, (status, reason, headers, body))


def _parse_head(head: bytes) -> tuple[int, str, Headers]:
    """Status, reason and headers of a header block (without its blank line)."""
    headers: list[tuple[bytes, bytes]] = []
    status: int | None = None
    reason = ""
    location = False
    for line in head.split(b"\n"):
        name, colon, value = line.partition(b":")
        name = name.strip()
        if not colon or not name or b" " in name:
            shown = line.rstrip(b"\r")[:80]
            raise RemoteProtocolError(f"malformed CGI header line {shown!r}")
        value = value.strip()  # also the CR of a CRLF line end
        lowered = name.lower()
        if lowered == b"status":
            parsed = _STATUS.fullmatch(value)
            if parsed is None or not 100 <= int(parsed.group(1)) <= 599:
                raise RemoteProtocolError(f"malformed CGI Status header {value[:80]!r}")
            status = int(parsed.group(1))
            reason = (parsed.group(2) or b"").decode("latin-1")
            continue
        location = location or lowered == b"location"
        headers.append((name, value))

    if status is None:
        status = 302 if location else 200
    return status, reason, tuple(headers)


def _parse_crlf_head(head: bytes) -> tuple[int, str, Headers] | None:
    """``_parse_head`` of what precedes the first CRLF blank line, unless a blank line with
    a bare LF ends the headers before it (None: the general path finds where they end)."""
    if b"\n\n" in head or b"\n\r\n" in head:
        return None
    return _parse_head(head)


# An application answers with a handful of header blocks, byte for byte the same each time
# (a no-op script's is always "X-Powered-By ... Content-type ..."): parsing is a pure
# function of the bytes, so a short block is parsed once, and looked for bare-LF blank lines
# once.  The results are immutable, and the size bound caps what each cache holds at
# 256 KiB.  Errors are not cached; they are rare.
_parse_cached_head = functools.lru_cache(maxsize=256)(_parse_head)
_parse_cached_crlf_head = functools.lru_cache(maxsize=256)(_parse_crlf_head)
