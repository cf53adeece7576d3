"""RESP, the Redis protocol, server side and sans-IO: bytes in, commands out; replies to bytes.

Requests are multibulk arrays (``*2\\r\\n$4\\r\\nPING\\r\\n...``) as every client library
sends, or inline lines (``PING\\r\\n``) as typed into telnet.  The parser keeps its place
between ``feed`` calls, so a command split across reads is never re-scanned from its start,
and an argument larger than ``max_bulk_len`` is skipped as it streams in — never buffered —
then reported as ``OversizedCommand`` so the server can answer with an error and keep the
connection in step.  Error messages are worded as Redis words them.

Replies are RESP2.  The reply types busgate sends (simple strings, errors, integers, bulk
strings, arrays) mean the same in RESP3, so a client that switched to RESP3 with ``HELLO 3``
(redis-py 8 does by default) reads them unchanged; only nulls and HELLO's map differ, and
``null``/``mapping`` take the protocol version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"

#: Longest line (a count or length header) accepted in the multibulk form.
_MAX_HEADER_LINE = 64 * 1024
#: Compact the buffer once this much of it has been consumed.
_COMPACT_AT = 64 * 1024


class RESPProtocolError(Exception):
    """The byte stream is not RESP: reply with the message and close the connection."""


@dataclass(frozen=True, slots=True)
class Command:
    args: tuple[bytes, ...]

    @property
    def name(self) -> bytes:
        return self.args[0].upper()


@dataclass(frozen=True, slots=True)
class OversizedCommand:
    """A command with an argument over ``max_bulk_len``; its bytes were discarded."""

    name: bytes | None  # upper-cased, if the command name had been read
    size: int
    limit: int


class RequestParser:
    def __init__(
        self,
        *,
        max_bulk_len: int = 512 * 1024 * 1024,
        max_multibulk_len: int = 1024 * 1024,
        max_inline_len: int = 64 * 1024,
    ) -> None:
        self.max_bulk_len = max_bulk_len
        self.max_multibulk_len = max_multibulk_len
        self.max_inline_len = max_inline_len
        self._buffer = bytearray()
        self._pos = 0
        # State of a multibulk command in progress.
        self._remaining = 0  # arguments still to read; 0 = between commands
        self._args: list[bytes] = []
        self._bulk_len = -1  # length of the argument being read, -1 = header not read
        # Discard mode for an oversized argument.
        self._skip = 0  # bytes of the oversized argument (and its CRLF) still to drop
        self._oversized: OversizedCommand | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def feed(self, data: bytes | bytearray) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        if self._pos >= _COMPACT_AT or (self._pos and self._pos == len(self._buffer)):
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def next_event(self) -> Command | OversizedCommand | None:
        """The next complete command, or None when more bytes are needed."""
        while True:
            if self._skip:
                # Drop what was buffered before the oversized argument was recognised.
                available = len(self._buffer) - self._pos
                dropped = min(self._skip, available)
                self._pos += dropped
                self._skip -= dropped
                if self._skip:
                    return None
            if self._remaining or self._oversized is not None:
                return self._continue_multibulk()
            if self._pos >= len(self._buffer):
                return None
            if self._buffer[self._pos] == 0x2A:  # "*"
                count = self._read_count()
                if count is None:
                    return None
                if count <= 0:
                    continue  # "*0" and "*-1" are ignored, as Redis does
                self._remaining = count
                self._args = []
                self._oversized = None
                continue
            command = self._read_inline()
            if command is None:
                return None
            if command.args:
                return command

    # -- multibulk ----------------------------------------------------------------------------

    def _line(self, what: str) -> bytes | None:
        """The next CRLF-terminated line (without CRLF), or None if incomplete."""
        buffer = self._buffer
        end = buffer.find(b"\r\n", self._pos)
        if end < 0:
            if len(buffer) - self._pos > _MAX_HEADER_LINE:
                raise RESPProtocolError(f"Protocol error: too big {what} count string")
            return None
        line = bytes(buffer[self._pos + 1 : end])
        self._pos = end + 2
        return line

    def _read_count(self) -> int | None:
        line = self._line("mbulk")
        if line is None:
            return None
        try:
            count = int(line)
        except ValueError:
            raise RESPProtocolError("Protocol error: invalid multibulk length") from None
        if count > self.max_multibulk_len:
            raise RESPProtocolError("Protocol error: invalid multibulk length")
        return count

    def _continue_multibulk(self) -> Command | OversizedCommand | None:
        buffer = self._buffer
        while self._remaining:
            if self._bulk_len < 0:
                if self._pos >= len(buffer):
                    return None
                if buffer[self._pos] != 0x24:  # "$"
                    got = chr(buffer[self._pos])
                    raise RESPProtocolError(f"Protocol error: expected '$', got '{got}'")
                line = self._line("bulk")
                if line is None:
                    return None
                try:
                    length = int(line)
                except ValueError:
                    raise RESPProtocolError("Protocol error: invalid bulk length") from None
                if length < 0 or length > 2**32:
                    raise RESPProtocolError("Protocol error: invalid bulk length")
                if length > self.max_bulk_len:
                    name = self._args[0].upper() if self._args else None
                    self._oversized = OversizedCommand(name, length, self.max_bulk_len)
                    self._remaining -= 1
                    # Drop what is buffered of it; feed() drops the rest as it arrives.
                    self._skip = length + 2
                    dropped = min(self._skip, len(buffer) - self._pos)
                    self._pos += dropped
                    self._skip -= dropped
                    if self._skip:
                        return None
                    continue
                self._bulk_len = length
            end = self._pos + self._bulk_len
            if len(buffer) < end + 2:
                return None
            if buffer[end : end + 2] != b"\r\n":
                raise RESPProtocolError("Protocol error: bulk string not terminated by CRLF")
            self._args.append(bytes(buffer[self._pos : end]))
            self._pos = end + 2
            self._bulk_len = -1
            self._remaining -= 1
        return self._finish()

    def _finish(self) -> Command | OversizedCommand:
        oversized, self._oversized = self._oversized, None
        args, self._args = self._args, []
        if oversized is not None:
            return oversized
        return Command(tuple(args))

    # -- inline -------------------------------------------------------------------------------

    def _read_inline(self) -> Command | None:
        buffer = self._buffer
        end = buffer.find(b"\n", self._pos)
        if end < 0:
            if len(buffer) - self._pos > self.max_inline_len:
                raise RESPProtocolError("Protocol error: too big inline request")
            return None
        line = bytes(buffer[self._pos : end]).rstrip(b"\r")
        self._pos = end + 1
        return Command(tuple(split_inline(line)))


_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX = b"0123456789abcdefABCDEF"


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command as Redis's sdssplitargs does (quotes and escapes)."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t":
            i += 1
        if i >= n:
            return args
        current = bytearray()
        quote = line[i] if line[i] in b"\"'" else 0
        if quote:
            i += 1
        while True:
            if i >= n:
                if quote:
                    raise RESPProtocolError("Protocol error: unbalanced quotes in request")
                break
            c = line[i]
            if quote == 0x22 and c == 0x5C and i + 1 < n:  # \ inside "..."
                nxt = line[i + 1]
                if (
                    nxt in (0x78, 0x58)
                    and i + 3 < n
                    and line[i + 2] in _HEX
                    and line[i + 3] in _HEX
                ):
                    current.append(int(line[i + 2 : i + 4], 16))
                    i += 4
                    continue
                current.append(_ESCAPES.get(nxt, nxt))
                i += 2
                continue
            if quote == 0x27 and c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                current.append(0x27)
                i += 2
                continue
            if quote and c == quote:
                i += 1
                if i < n and line[i] not in b" \t":
                    raise RESPProtocolError("Protocol error: unbalanced quotes in request")
                break
            if not quote and c in b" \t":
                break
            current.append(c)
            i += 1
        args.append(bytes(current))


# -- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimpleString:
    text: str


@dataclass(frozen=True, slots=True)
class ErrorReply:
    message: str


def simple_string(text: str) -> bytes:
    if "\r" in text or "\n" in text:
        raise ValueError("a simple string cannot contain CR or LF")
    return b"+" + text.encode() + b"\r\n"


def error(message: str) -> bytes:
    """``message`` starts with the error code: ``ERR ...``, ``NOAUTH ...``, ``WRONGPASS ...``."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def bulk_string(data: bytes | None) -> bytes:
    if data is None:
        return b"$-1\r\n"
    return b"$%d\r\n%b\r\n" % (len(data), data)


def null(protocol: int) -> bytes:
    """The null reply: RESP3 has its own type, RESP2 uses the null bulk string."""
    return b"_\r\n" if protocol == 3 else b"$-1\r\n"


def mapping(pairs: Sequence[tuple[bytes, bytes]], protocol: int) -> bytes:
    """A map of already-encoded keys and values (RESP3), or a flat array (RESP2)."""
    body = b"".join(key + value for key, value in pairs)
    if protocol == 3:
        return b"%%%d\r\n" % len(pairs) + body
    return b"*%d\r\n" % (2 * len(pairs)) + body


def array(items: Sequence[bytes] | None) -> bytes:
    """An array of already-encoded replies."""
    if items is None:
        return b"*-1\r\n"
    return b"*%d\r\n" % len(items) + b"".join(items)


Value = int | bytes | str | None | SimpleString | ErrorReply | Sequence["Value"]


def encode(value: Value) -> bytes:
    if isinstance(value, bool):
        raise TypeError("RESP2 has no boolean; send an integer")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, bytes):
        return bulk_string(value)
    if isinstance(value, str):
        return bulk_string(value.encode())
    if value is None:
        return bulk_string(None)
    if isinstance(value, SimpleString):
        return simple_string(value.text)
    if isinstance(value, ErrorReply):
        return error(value.message)
    return array([encode(item) for item in value])


def encode_command(*args: bytes | str | int) -> bytes:
    """A client-style request (tests, benchmarks, the demo)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)
