"""The client side of one FastCGI connection, as a state machine with no I/O.

    conn = ClientConnection()
    wire = conn.send(BeginRequest()) + conn.send(Params.of(env)) + conn.send(Stdin(body))
    ... write wire, then feed whatever arrives:
    conn.receive_data(chunk)
    while (event := conn.next_event()) is not NEED_DATA: ...

One request at a time per connection (no multiplexing: php-fpm does not multiplex either).
After ``EndRequest`` a kept-alive connection goes back to ``IDLE`` with
``start_next_cycle()``.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Final, Literal

from fastcgi.errors import LocalProtocolError, RemoteProtocolError
from fastcgi.events import (
    AbortRequest,
    BeginRequest,
    ClientEvent,
    ConnectionClosed,
    Data,
    EndRequest,
    FullResponse,
    GetValues,
    GetValuesResult,
    Params,
    ServerEvent,
    Stderr,
    Stdin,
    Stdout,
    UnknownType,
)
from fastcgi.pairs import decode_pairs, encode_pairs
from fastcgi.records import (
    RecordReader,
    begin_request_body,
    encode_record,
    encode_request,
    encode_stream,
    parse_end_request_body,
    parse_unknown_type_body,
)
from fastcgi.spec import NULL_REQUEST_ID, RecordType, Role


class _NeedData(enum.Enum):
    # A one-member enum rather than object(): type checkers narrow `is NEED_DATA` on it.
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event`` when the buffered bytes hold no complete event.
NEED_DATA: Final = _NeedData.NEED_DATA
NeedData = Literal[_NeedData.NEED_DATA]


@functools.cache
def _begin_request_record(request_id: int, role: Role, keep_conn: bool) -> bytes:
    return encode_record(RecordType.BEGIN_REQUEST, request_id, begin_request_body(role, keep_conn))


@functools.cache
def _end_of_stream(record_type: RecordType, request_id: int) -> bytes:
    return encode_record(record_type, request_id)


def _params_stream(request_id: int, params: Params) -> bytes:
    return encode_stream(RecordType.PARAMS, request_id, params.wire) + _end_of_stream(
        RecordType.PARAMS, request_id
    )


class State(enum.Enum):
    IDLE = "idle"  # no request; may begin one
    SEND_PARAMS = "send-params"  # BEGIN_REQUEST sent, PARAMS next
    SEND_STDIN = "send-stdin"  # PARAMS sent, body next
    SEND_DATA = "send-data"  # FILTER role: stdin done, data stream next
    AWAIT_END = "await-end"  # request fully sent, waiting for END_REQUEST
    DONE = "done"  # END_REQUEST received
    CLOSED = "closed"  # the server closed the connection cleanly
    ERROR = "error"  # a protocol error happened; the connection must be discarded


# Plain ints for the per-record comparisons: reading an enum member is a class attribute
# lookup through the enum machinery, several times slower than a global.
_STDOUT, _STDERR, _END_REQUEST = map(
    int, (RecordType.STDOUT, RecordType.STDERR, RecordType.END_REQUEST)
)
_SENDING = (State.SEND_PARAMS, State.SEND_STDIN, State.SEND_DATA)
_IN_REQUEST = (*_SENDING, State.AWAIT_END)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one response may make us hold in memory.

    Past a bound the rest of that stream is read and dropped, not refused: the response is
    still whole, and its status (in the CGI headers, at the start of stdout) still counts.  A
    PHP script that succeeds after printing megabytes of warnings has succeeded.
    """

    max_stdout: int = 64 * 1024 * 1024
    max_stderr: int = 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_stdout < 0 or self.max_stderr < 0:
            raise ValueError("limits must not be negative")


class ClientConnection:
    def __init__(self, limits: Limits = Limits(), request_id: int = 1) -> None:
        if not 1 <= request_id <= 0xFFFF:
            raise LocalProtocolError(f"request id {request_id} out of range 1..65535")
        self.limits = limits
        self.request_id = request_id
        self.state = State.IDLE
        self.keep_conn = False
        self._role = Role.RESPONDER
        self._reader = RecordReader()
        self._stdout_bytes = 0
        self._stderr_bytes = 0
        self._received = 0  # bytes of the current request's answer, records or not
        self._management_pending = 0
        self._stdout: list[bytes] = []  # what receive_response has folded so far
        self._stderr: list[bytes] = []

    # -- sending ------------------------------------------------------------------------------

    def send(self, event: ClientEvent) -> bytes:
        """Return the bytes for ``event``; raises ``LocalProtocolError`` if not allowed now."""
        try:
            return self._send(event)
        except LocalProtocolError:
            self.state = State.ERROR
            raise

    def _send(self, event: ClientEvent) -> bytes:
        rid = self.request_id
        if isinstance(event, BeginRequest):
            self._expect(State.IDLE, event)
            self.state = State.SEND_PARAMS
            self.keep_conn = event.keep_conn
            self._role = event.role
            self._stdout_bytes = self._stderr_bytes = self._received = 0
            return _begin_request_record(rid, event.role, event.keep_conn)
        if isinstance(event, Params):
            self._expect(State.SEND_PARAMS, event)
            self.state = State.SEND_STDIN
            return _params_stream(rid, event)
        if isinstance(event, Stdin):
            self._expect(State.SEND_STDIN, event)
            out = encode_stream(RecordType.STDIN, rid, event.data)
            if event.end_stream:
                out += _end_of_stream(RecordType.STDIN, rid)
                self.state = State.SEND_DATA if self._role is Role.FILTER else State.AWAIT_END
            return out
        if isinstance(event, Data):
            self._expect(State.SEND_DATA, event)
            out = encode_stream(RecordType.DATA, rid, event.data)
            if event.end_stream:
                out += encode_record(RecordType.DATA, rid)
                self.state = State.AWAIT_END
            return out
        if isinstance(event, AbortRequest):
            if self.state not in _IN_REQUEST:
                raise LocalProtocolError(f"cannot abort in state {self.state.value}")
            # The server still answers with END_REQUEST, so we keep waiting for it.
            self.state = State.AWAIT_END
            return encode_record(RecordType.ABORT_REQUEST, rid)
        if isinstance(event, GetValues):
            if self.state in (State.CLOSED, State.ERROR):
                raise LocalProtocolError(f"cannot send GET_VALUES in state {self.state.value}")
            self._management_pending += 1
            query = encode_pairs((name, b"") for name in event.names)
            return encode_record(RecordType.GET_VALUES, NULL_REQUEST_ID, query)
        raise LocalProtocolError(f"not a client event: {event!r}")

    def send_request(self, params: Params, body: bytes = b"", *, keep_conn: bool = True) -> bytes:
        """The bytes of a whole RESPONDER request: BEGIN_REQUEST, PARAMS and all of STDIN.

        The same as sending ``BeginRequest``, ``Params`` and ``Stdin(body)`` one by one, in
        one step: what a client with the body in hand (every busgate delivery) does.
        """
        if self.state is not State.IDLE:
            state, self.state = self.state, State.ERROR
            raise LocalProtocolError(f"cannot begin a request in state {state.value}")
        rid = self.request_id
        self.state = State.AWAIT_END
        self.keep_conn = keep_conn
        self._role = Role.RESPONDER
        self._stdout_bytes = self._stderr_bytes = self._received = 0
        return encode_request(rid, params.wire, body, keep_conn)

    def _expect(self, state: State, event: ClientEvent) -> None:
        if self.state is not state:
            raise LocalProtocolError(
                f"cannot send {type(event).__name__} in state {self.state.value}"
            )

    def start_next_cycle(self) -> None:
        """Reuse a kept-alive connection for another request after END_REQUEST."""
        if self.state is not State.DONE or not self.keep_conn:
            raise LocalProtocolError(
                f"connection cannot be reused (state {self.state.value},"
                f" keep_conn={self.keep_conn})"
            )
        self.state = State.IDLE

    # -- receiving ----------------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet turned into events (a reuse hazard after END_REQUEST)."""
        return self._reader.buffered

    @property
    def answered_nothing(self) -> bool:
        """No byte has arrived since the current request began."""
        return self._received == 0

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed received bytes; ``b""`` means the server closed the connection."""
        self._received += len(data)
        self._reader.feed(data)

    def receive_response(self) -> FullResponse | Literal[_NeedData.NEED_DATA]:
        """The whole response of the current request once END_REQUEST is in, else NEED_DATA.

        The events ``next_event`` would return (stdout and stderr pieces, then END_REQUEST),
        folded as the records are decoded: one call, no event objects, for a caller that
        wants the response whole.  Anything else in a response is a ``RemoteProtocolError``.
        Call it after each ``receive_data``.
        """
        result = self._guarded(True)
        if result is NEED_DATA or type(result) is FullResponse:
            return result
        self.state = State.ERROR
        raise RemoteProtocolError(f"unexpected {result!r} in a response")

    def next_event(self) -> ServerEvent | Literal[_NeedData.NEED_DATA]:
        """The next complete event, or ``NEED_DATA``.

        Raises ``RemoteProtocolError`` (and enters ``ERROR``) on anything malformed.
        """
        event = self._guarded(False)
        assert not isinstance(event, FullResponse)  # only folding makes one
        return event

    def _guarded(self, fold: bool) -> ServerEvent | FullResponse | Literal[_NeedData.NEED_DATA]:
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection is in the error state")
        try:
            return self._next_event(fold)
        except RemoteProtocolError:
            self.state = State.ERROR
            raise

    def _next_event(self, fold: bool) -> ServerEvent | FullResponse | Literal[_NeedData.NEED_DATA]:
        """Decode records into the next event; with ``fold``, stdout and stderr pieces go to
        ``_stdout``/``_stderr`` instead of being returned, and END_REQUEST comes back as the
        whole ``FullResponse``."""
        reader = self._reader
        while True:
            record = reader.next_record()
            if record is None:
                if not reader.at_eof:
                    return NEED_DATA
                if self.state in _IN_REQUEST:
                    raise RemoteProtocolError("connection closed before END_REQUEST")
                if self._management_pending:
                    raise RemoteProtocolError("connection closed before GET_VALUES_RESULT")
                self.state = State.CLOSED
                return ConnectionClosed()

            record_type, request_id, content = record
            if request_id == NULL_REQUEST_ID:
                return self._management_event(record_type, content)
            if request_id != self.request_id or self.state not in _IN_REQUEST:
                raise RemoteProtocolError(
                    f"unexpected record (type {record_type}, request id {request_id})"
                    f" in state {self.state.value}"
                )
            if record_type == _STDOUT:
                if not content:
                    continue  # end of the stdout stream; END_REQUEST follows
                room = self.limits.max_stdout - self._stdout_bytes
                self._stdout_bytes += len(content)
                if len(content) > room:  # past the bound: dropped (see Limits)
                    if room <= 0:
                        continue
                    content = content[:room]
                if fold:
                    self._stdout.append(content)
                    continue
                return Stdout(content)
            if record_type == _STDERR:
                if not content:
                    continue
                room = self.limits.max_stderr - self._stderr_bytes
                self._stderr_bytes += len(content)
                if len(content) > room:
                    if room <= 0:
                        continue
                    content = content[:room]
                if fold:
                    self._stderr.append(content)
                    continue
                return Stderr(content)
            if record_type == _END_REQUEST:
                app_status, protocol_status = parse_end_request_body(content)
                self.state = State.DONE
                if not fold:
                    return EndRequest(app_status, protocol_status)
                # Built as records.Record is, for the same reason: no EndRequest in between.
                stdout, stderr = self._stdout, self._stderr
                response = tuple.__new__(
                    FullResponse,
                    (b"".join(stdout), b"".join(stderr), app_status, protocol_status),
                )
                stdout.clear()
                stderr.clear()
                return response
            raise RemoteProtocolError(f"server sent a record of type {record_type} to a client")

    def _management_event(self, record_type: int, content: bytes) -> ServerEvent:
        if record_type == RecordType.GET_VALUES_RESULT:
            if not self._management_pending:
                raise RemoteProtocolError("GET_VALUES_RESULT without a GET_VALUES")
            self._management_pending -= 1
            return GetValuesResult(tuple(decode_pairs(content)))
        if record_type == RecordType.UNKNOWN_TYPE:
            if not self._management_pending:
                raise RemoteProtocolError("UNKNOWN_TYPE without a management request")
            self._management_pending -= 1
            return UnknownType(parse_unknown_type_body(content))
        raise RemoteProtocolError(f"unexpected management record of type {record_type}")
