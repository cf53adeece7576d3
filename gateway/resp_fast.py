"""RESP requests split by hiredis's C reader while they are canonical: the events
``resp.RequestParser`` would return, for a fraction of the cost.

Every Redis client library sends a command as ``*<n>\\r\\n`` and then ``$<len>\\r\\n<arg>\\r\\n``
per argument, with no leading zeros: exactly what ``hiredis.pack_command`` writes.  hiredis's
reply reader splits such a stream into argument lists in C, and a list is accepted only if
encoding it again gives back, byte for byte, what it was read from; so whatever is accepted
is what ``RequestParser`` would have made of the same bytes.  The first request that is
anything else (an inline command, a malformed or unusual line, an element of another type,
an argument over the size limit), and an incomplete request already holding more than
``MAX_INCOMPLETE`` bytes, hands the connection to ``RequestParser`` for good, fed from that
request's first byte: errors, oversized arguments and every limit are its own.

hiredis allocates an aggregate's whole list as soon as it reads its count line, nested ones
included (about 1,000 deep): a few bytes that never complete a request could hold hundreds
of MB.  So hiredis is never given a ``*`` or a ``>`` (a RESP3 push, reserved for as an array)
followed by four digits or more: such input (a request of 1,000 arguments or more, or a
payload that happens to hold such bytes) is handed over before hiredis reads it, and the
most a connection can make hiredis reserve is 1,000 nested lists of 999 entries, 8 MB.  (The
searches add about 1,000 instructions to a read of one push.)  Two differences in timing:
hiredis does not look at the two bytes after a bulk string, so a request with a wrong
terminator is refused once all of it has arrived rather than as soon as the terminator has;
and an element of another type (``$-1``, ``_``, ``#``, a nested array) is refused once the
request's other elements have arrived.

Measured with callgrind (feed one 3-argument LPUSH, then next_event until it returns None):
31,700 instructions with ``RequestParser``, 19,400 here; the whole push path of a RESP
connection, parse to reply without the store, went from 90,900 to 78,600.
"""

from __future__ import annotations

import re

import hiredis

from gateway.resp import Command, OversizedCommand, RequestParser

#: A count line of 1,000 or more arguments; a payload byte sequence looking like one.
_LARGE_COUNT = re.compile(rb"\*[0-9]{4}")
_LARGE_COUNT_BYTES = 5
#: The same for a RESP3 push, whose count hiredis reserves a list for as an array's (its maps,
#: sets and attributes reserve nothing up front).  Not only at a line start: hiredis skips the
#: two bytes after a bulk string unread, so "$1\r\nAXY>50000000" is a push count to it.  A
#: search of its own, and only once a cheaper one finds a ">": one alternation with
#: ``_LARGE_COUNT`` costs three times as much per read (callgrind).
_LARGE_PUSH = re.compile(rb">[0-9]{4}")
#: A bulk length of 100 MB or more in an incomplete request: RequestParser refuses one over
#: Redis's limit at once, where hiredis would wait for all of it to arrive.
_HUGE_BULK = re.compile(rb"\$[0-9]{9}")
#: The most arguments hiredis is given a request of (see _LARGE_COUNT).
_MAX_COUNT = 999
#: An incomplete request longer than this goes to RequestParser, which does not buffer an
#: oversized argument; large arguments gain nothing from hiredis anyway.
MAX_INCOMPLETE = 64 * 1024


class FastRequestParser:
    """``RequestParser``'s interface and events; see the module docstring."""

    def __init__(self, exact: RequestParser) -> None:
        """``exact``: a fresh RequestParser with the limits to apply; it takes over the
        connection when hiredis cannot."""
        self._exact_parser = exact
        # Set once the connection is handed over; from the start if the argument count limit
        # is below the counts hiredis is given.
        self._exact: RequestParser | None = exact if exact.max_multibulk_len < _MAX_COUNT else None
        self.max_bulk_len = exact.max_bulk_len
        self._reader: hiredis.Reader | None = hiredis.Reader()
        self._pending = bytearray()  # what hiredis was fed and has not returned as a request
        self._start = 0  # where in _pending the next request starts

    def set_max_bulk_len(self, limit: int) -> None:
        """A new argument size limit (a reload changed ``max_payload``), from the next one."""
        self.max_bulk_len = self._exact_parser.max_bulk_len = limit

    @property
    def buffered(self) -> int:
        """Bytes received and held, not yet parsed into an event."""
        if self._exact is not None:
            return self._exact.buffered
        return len(self._pending) - self._start

    def feed(self, data: bytes) -> None:
        if self._exact is not None:
            self._exact.feed(data)
            return
        assert self._reader is not None
        pending = self._pending
        if self._start:
            del pending[: self._start]  # moves the start: cheap in CPython
            self._start = 0
        # A count line may straddle this read and an incomplete request before it.
        if pending:
            seam = pending[-(_LARGE_COUNT_BYTES - 1) :] + data[: _LARGE_COUNT_BYTES - 1]
            straddles = bool(_LARGE_COUNT.search(seam) or _LARGE_PUSH.search(seam))
        else:
            straddles = False
        pending += data
        if (
            straddles
            or _LARGE_COUNT.search(data)
            or (data.find(b">") >= 0 and _LARGE_PUSH.search(data))
        ):
            self._hand_over()  # before hiredis sees it
            return
        self._reader.feed(data)

    def next_event(self) -> Command | OversizedCommand | None:
        """The next request, or None when more bytes are needed."""
        if self._exact is not None:
            return self._exact.next_event()
        reader = self._reader
        assert reader is not None
        pending, start = self._pending, self._start
        if start == len(pending):
            return None
        if pending[start] != 0x2A:  # "*": not a multibulk request
            return self._hand_over().next_event()
        try:
            request = reader.gets()
        except (hiredis.ProtocolError, MemoryError):
            return self._hand_over().next_event()
        if request is False:
            if len(pending) - start > MAX_INCOMPLETE or _HUGE_BULK.search(pending, start):
                return self._hand_over().next_event()
            return None
        if type(request) is not list or not request:
            return self._hand_over().next_event()
        args = tuple(request)
        try:
            wire = hiredis.pack_command(args)
        except TypeError:  # an element that is not a string (a nested array, a null)
            return self._hand_over().next_event()
        if not pending.startswith(wire, start) or (
            len(wire) > self.max_bulk_len and max(map(len, args)) > self.max_bulk_len
        ):
            return self._hand_over().next_event()
        self._start = start + len(wire)
        return Command(args)

    def _hand_over(self) -> RequestParser:
        """From the request at ``_start`` on, RequestParser parses this connection."""
        exact = self._exact = self._exact_parser
        exact.feed(bytes(self._pending[self._start :]))
        self._reader = None
        self._pending = bytearray()
        self._start = 0
        return exact
