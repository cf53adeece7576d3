"""RESP, the Redis protocol, server side and sans-IO: bytes in, commands out; replies to bytes.

Requests are multibulk arrays (``*2\\r\\n$4\\r\\nECHO\\r\\n$2\\r\\nhi\\r\\n``), as every client
library sends them, or inline lines (``PING\\r\\n``), as typed into telnet.  The parser keeps
its place between ``feed`` calls, so a command split across reads is never re-scanned from its
start.  An argument longer than ``max_bulk_len`` is dropped as it streams in, never buffered,
and the command is reported as ``OversizedCommand``: the server answers it with an error and
the connection stays in step.  A malformed stream raises ``RESPProtocolError``, worded as Redis
words it; the server sends that text and closes the connection.

Measured: 100k ``*3 LPUSH mylist xxx`` requests fed 16 per ``feed`` parse at 290k-325k
commands/s (median of 7 runs; about 3.3 us each) with CPython 3.11 on the shared 2-core
development machine.  The producer server uses ``resp_fast.FastRequestParser``, which lets
hiredis split canonical requests and hands anything else to this parser.

Replies are RESP2.  The reply types busgate sends (simple strings, errors, integers, bulk
strings, arrays) mean the same in RESP3, so a client that switched to RESP3 with ``HELLO 3``
(redis-py 8 does by default) reads them unchanged; only nulls, maps and the verbatim text of
INFO and CLIENT LIST differ, and ``null``/``mapping``/``verbatim`` take the protocol version.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"

#: Longest ``*<count>`` or ``$<length>`` line, as Redis's PROTO_INLINE_MAX_SIZE.
_MAX_LENGTH_LINE = 64 * 1024
#: Redis's proto-max-bulk-len: a longer bulk string is refused, not read (nor skipped).
PROTO_MAX_BULK_LEN = 512 * 1024 * 1024


class RESPProtocolError(Exception):
    """The byte stream is not RESP: reply with the message and close the connection."""


@dataclass(slots=True)  # not frozen: a frozen dataclass costs twice as much to make
class Command:
    args: tuple[bytes, ...]  # never empty: empty requests are skipped, as Redis does

    @property
    def name(self) -> bytes:
        return self.args[0].upper()


@dataclass(frozen=True, slots=True)
class OversizedCommand:
    """A command with an argument over ``limit``; all of its bytes were discarded."""

    name: bytes | None  # upper-cased; None if the oversized argument was the name itself
    size: int  # length of the first oversized argument
    limit: int
    #: The argument after the name (a push's queue), if it came before the oversized one.
    target: bytes | None = None


class RequestParser:
    """Turns the bytes a producer sends into ``Command`` and ``OversizedCommand`` events."""

    def __init__(
        self,
        *,
        max_bulk_len: int = 512 * 1024 * 1024,
        max_multibulk_len: int = 1024 * 1024,
        max_inline_len: int = 64 * 1024,
    ) -> None:
        if min(max_bulk_len, max_multibulk_len, max_inline_len) < 0:
            raise ValueError("parser limits cannot be negative")
        self.max_bulk_len = max_bulk_len
        self.max_multibulk_len = max_multibulk_len
        self.max_inline_len = max_inline_len
        self._buffer = bytearray()
        self._pos = 0  # start of the bytes not parsed yet
        # Where the search for the end of an incomplete line resumes, so a long line arriving
        # in small pieces is scanned once.  Only meaningful while it is past _pos.
        self._scan_from = 0
        # The multibulk request in progress.
        self._remaining = 0  # arguments whose length line is still to read; 0 = between requests
        self._bulk_len = -1  # length of the argument being read; -1 = its length line is next
        self._args: list[bytes] = []
        # Discarding a request with an oversized argument.
        self._oversized: OversizedCommand | None = None
        self._skip = 0  # bytes of the argument being dropped (and its CRLF) not yet received
        self._error: RESPProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and held, not yet parsed into an event."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        if self._pos:
            # Compact once per feed.  Deleting a bytearray's prefix only moves its start in
            # CPython, so this is cheap even when a large argument is half received.
            del buffer[: self._pos]
            self._scan_from -= self._pos
            self._pos = 0
        if self._skip:
            # Dropping an oversized argument: its bytes never reach the buffer, which is empty.
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            buffer += memoryview(data)[dropped:]
        else:
            buffer += data

    def next_event(self) -> Command | OversizedCommand | None:
        """The next request, or None when more bytes are needed."""
        if self._error is not None:
            # The stream is out of step for good; a server that carries on gets the same error.
            raise RESPProtocolError(*self._error.args)
        buffer = self._buffer
        try:
            while True:
                if self._skip:
                    return None  # feed() is still dropping an oversized argument
                if self._remaining or self._oversized is not None:
                    return self._read_arguments()
                if self._pos == len(buffer):
                    return None
                if buffer[self._pos] == 0x2A:  # "*"
                    if not self._read_count():
                        return None
                    continue  # "*0" and negative counts leave nothing to read: Redis ignores them
                args = self._read_inline()
                if args is None:
                    return None
                if args:
                    return Command(tuple(args))
                # An empty line, as telnet users type: ignored.
        except RESPProtocolError as exc:
            self._error = exc
            raise

    # -- multibulk ----------------------------------------------------------------------------

    def _read_count(self) -> bool:
        """Read a ``*<count>`` line; False when it is not complete yet."""
        buffer = self._buffer
        pos = self._pos
        end = buffer.find(b"\r\n", pos if pos > self._scan_from else self._scan_from)
        if end < 0:
            self._wait_for_line(_MAX_LENGTH_LINE, "Protocol error: too big mbulk count string")
            return False
        digits = buffer[pos + 1 : end]
        if digits.isdigit():
            try:
                count = int(digits)
            except ValueError:  # more digits than int() converts
                raise _invalid_length("mbulk", end - pos) from None
            if count > self.max_multibulk_len:
                raise RESPProtocolError("Protocol error: invalid multibulk length")
            self._remaining = count
        elif not (digits[:1] == b"-" and digits[1:].isdigit()):
            raise _invalid_length("mbulk", end - pos)
        self._pos = end + 2
        return True

    def _read_arguments(self) -> Command | OversizedCommand | None:
        # The hot path: every argument of every request goes through this loop, so it works on
        # locals and writes its place back only when it returns.
        buffer = self._buffer
        args = self._args
        pos = self._pos
        remaining = self._remaining
        length = self._bulk_len
        # Once an argument was oversized, the rest of the request is dropped too: -1 makes every
        # remaining argument, even an empty one, take the dropping branch.
        limit = self.max_bulk_len if self._oversized is None else -1
        while remaining:
            if length < 0:
                end = buffer.find(b"\r\n", pos if pos > self._scan_from else self._scan_from)
                if end < 0:
                    self._pos, self._remaining, self._bulk_len = pos, remaining, -1
                    self._wait_for_line(
                        _MAX_LENGTH_LINE, "Protocol error: too big bulk count string"
                    )
                    return None
                if buffer[pos] != 0x24:  # "$"
                    raise RESPProtocolError(
                        f"Protocol error: expected '$', got '{_printable(buffer[pos])}'"
                    )
                digits = buffer[pos + 1 : end]
                if not digits.isdigit():  # rules out signs, spaces and "_", which int() takes
                    raise _invalid_length("bulk", end - pos)
                try:
                    length = int(digits)
                except ValueError:  # more digits than int() converts
                    raise _invalid_length("bulk", end - pos) from None
                pos = end + 2
                if length > limit:
                    if length > PROTO_MAX_BULK_LEN:  # not a payload to skip: a broken stream
                        raise RESPProtocolError("Protocol error: invalid bulk length")
                    remaining -= 1
                    if self._oversized is None:
                        name = args[0].upper() if args else None
                        target = args[1] if len(args) > 1 else None
                        self._oversized = OversizedCommand(name, length, self.max_bulk_len, target)
                        args.clear()
                        limit = -1
                    skip = length + 2
                    if skip > len(buffer) - pos:
                        # feed() drops the rest as it arrives, without buffering it.
                        self._skip = skip - (len(buffer) - pos)
                        self._pos, self._remaining, self._bulk_len = len(buffer), remaining, -1
                        return None
                    pos += skip
                    length = -1
                    continue
            end = pos + length
            if len(buffer) < end + 2:
                self._pos, self._remaining, self._bulk_len = pos, remaining, length
                return None
            if buffer[end] != 0x0D or buffer[end + 1] != 0x0A:
                # Redis skips these two bytes unread; checking them reports a client that
                # miscounted here rather than at some later, confusing place.
                raise RESPProtocolError("Protocol error: bulk string not terminated by CRLF")
            args.append(bytes(buffer[pos:end]))
            pos = end + 2
            length = -1
            remaining -= 1
        self._pos, self._remaining, self._bulk_len = pos, 0, -1
        oversized = self._oversized
        if oversized is not None:
            self._oversized = None
            return oversized
        self._args = []
        return Command(tuple(args))

    def _wait_for_line(self, limit: int, too_big: str) -> None:
        """No line end in the buffer yet: fail if the line is already too long."""
        buffer = self._buffer
        length = len(buffer) - self._pos
        if buffer.endswith(b"\r"):
            length -= 1  # the start of the line end, not part of the line
        if length > limit:
            raise RESPProtocolError(too_big)
        # Keep a trailing "\r" in the next search: it may yet meet its "\n".
        self._scan_from = len(buffer) - 1

    # -- inline -------------------------------------------------------------------------------

    def _read_inline(self) -> list[bytes] | None:
        buffer = self._buffer
        pos = self._pos
        end = buffer.find(b"\n", pos if pos > self._scan_from else self._scan_from)
        if end < 0:
            self._wait_for_line(self.max_inline_len, "Protocol error: too big inline request")
            return None
        line_end = end - 1 if end > pos and buffer[end - 1] == 0x0D else end
        # Redis checks this only while the line is incomplete; checking the whole line too
        # makes the outcome independent of how the bytes were split into reads.
        if line_end - pos > self.max_inline_len:
            raise RESPProtocolError("Protocol error: too big inline request")
        self._pos = end + 1
        args = _split_inline(bytes(buffer[pos:line_end]))
        if args and args[0].upper() in _HTTP_WORDS:
            # A browser made to send an HTTP request here by a hostile page: its body
            # would run as commands.  Redis closes on these words too.
            raise RESPProtocolError("Protocol error: an HTTP request, not the Redis protocol")
        return args


#: Inline "commands" that start an HTTP request (a POST, and the Host header every request
#: has): the words Redis closes on.
_HTTP_WORDS = frozenset({b"POST", b"HOST:"})


def _invalid_length(kind: str, line_length: int) -> RESPProtocolError:
    if line_length > _MAX_LENGTH_LINE:
        # The same line split across reads fails as too big: say so either way.
        return RESPProtocolError(f"Protocol error: too big {kind} count string")
    shown = "multibulk" if kind == "mbulk" else kind
    return RESPProtocolError(f"Protocol error: invalid {shown} length")


def _printable(byte: int) -> str:
    return chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"


# Inline requests are split as Redis's sdssplitargs splits them.  Without quotes, NULs, \v or
# \f in the line, that is exactly bytes.split(); the tokenizer below handles the rest.
_NEEDS_TOKENIZER = re.compile(b"[\"'\x00\x0b\x0c]")
_SPACE = b" \t\n\v\f\r"  # C isspace(): skipped between arguments, required after a quote
_ARGUMENT_END = b" \t\n\r"  # what ends an unquoted argument
_ESCAPES = {ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09, ord("b"): 0x08, ord("a"): 0x07}
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_UNBALANCED = "Protocol error: unbalanced quotes in request"


def _split_inline(line: bytes) -> list[bytes]:
    if _NEEDS_TOKENIZER.search(line) is None:
        return line.split()
    nul = line.find(b"\x00")
    if nul >= 0:
        line = line[:nul]  # sdssplitargs reads a C string: a NUL ends the line
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i == n:
            return args
        argument = bytearray()
        quote = 0  # the quote character we are inside, if any
        while True:
            if i == n:
                if quote:
                    raise RESPProtocolError(_UNBALANCED)
                break
            c = line[i]
            if quote == 0x22:  # inside "...": backslash escapes
                if (
                    c == 0x5C
                    and i + 3 < n
                    and line[i + 1] == 0x78  # \xHH
                    and line[i + 2] in _HEX_DIGITS
                    and line[i + 3] in _HEX_DIGITS
                ):
                    argument.append(int(line[i + 2 : i + 4], 16))
                    i += 4
                    continue
                if c == 0x5C and i + 1 < n:
                    argument.append(_ESCAPES.get(line[i + 1], line[i + 1]))
                    i += 2
                    continue
            elif quote == 0x27:  # inside '...': only \' is an escape
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    argument.append(0x27)
                    i += 2
                    continue
            elif c in _ARGUMENT_END:
                i += 1
                break
            elif c in b"\"'":
                quote = c
                i += 1
                continue
            if quote and c == quote:
                # A closing quote must end the argument: "a"b is an error, not "ab".
                if i + 1 < n and line[i + 1] not in _SPACE:
                    raise RESPProtocolError(_UNBALANCED)
                i += 1
                break
            argument.append(c)
            i += 1
        args.append(bytes(argument))


# -- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimpleString:
    """A status reply such as ``+OK``, for ``encode``."""

    text: str

    def __post_init__(self) -> None:
        _check_simple(self.text)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error reply for ``encode``; ``message`` starts with its code (``ERR``, ``NOAUTH``)."""

    message: str


def _check_simple(text: str) -> None:
    if "\r" in text or "\n" in text:
        raise ValueError(f"a simple string cannot contain CR or LF: {text!r}")


def simple_string(text: str) -> bytes:
    _check_simple(text)
    return b"+" + text.encode() + b"\r\n"


def error(message: str) -> bytes:
    """``message`` starts with the error code: ``ERR ...``, ``NOAUTH ...``, ``WRONGPASS ...``."""
    # Redis does the same: a line break would end the reply early and desync the client.
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk_string(data: bytes | None) -> bytes:
    if data is None:
        return b"$-1\r\n"
    return b"$%d\r\n%b\r\n" % (len(data), data)


def array(items: Sequence[bytes] | None) -> bytes:
    """An array of already-encoded replies; None is the null array."""
    if items is None:
        return b"*-1\r\n"
    return b"*%d\r\n" % len(items) + b"".join(items)


def null(protocol: int) -> bytes:
    """The null reply: RESP3 has its own type, RESP2 uses the null bulk string."""
    return b"_\r\n" if protocol == 3 else b"$-1\r\n"


def verbatim(text: bytes, protocol: int) -> bytes:
    """Text for people to read (INFO, CLIENT LIST): RESP3's verbatim string, format ``txt``,
    as Redis sends it; a bulk string under RESP2."""
    if protocol == 3:
        return b"=%d\r\ntxt:%b\r\n" % (len(text) + 4, text)
    return bulk_string(text)


def mapping(pairs: Sequence[tuple[bytes, bytes]], protocol: int) -> bytes:
    """A map of already-encoded keys and values (RESP3), or a flat array (RESP2)."""
    body = b"".join(key + value for key, value in pairs)
    if protocol == 3:
        return b"%%%d\r\n" % len(pairs) + body
    return b"*%d\r\n" % (2 * len(pairs)) + body


Value: TypeAlias = (
    "int | bytes | str | SimpleString | ErrorReply | list[Value] | tuple[Value, ...] | None"
)


def encode(value: Value) -> bytes:
    """A reply from Python values: str is sent as a UTF-8 bulk string, None as the null bulk."""
    if isinstance(value, bool):
        # A bool is an int to Python but an answer of its own to a caller: make them choose.
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
    if isinstance(value, list | tuple):
        return array([encode(item) for item in value])
    raise TypeError(f"cannot encode {type(value).__name__} as RESP")


def encode_command(*args: bytes | str | int) -> bytes:
    """A request as a client sends it (tests, benchmarks, the demo)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bool):
            raise TypeError("a command argument cannot be a bool")
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)
