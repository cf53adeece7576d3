"""The client state machine: what it sends, what it accepts, where it refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcgi.connection import NEED_DATA, ClientConnection, Limits, State
from fastcgi.errors import LocalProtocolError, RemoteProtocolError
from fastcgi.events import (
    AbortRequest,
    BeginRequest,
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
    Record,
    RecordReader,
    encode_record,
    end_request_body,
    parse_begin_request_body,
    unknown_type_body,
)
from fastcgi.spec import ProtocolStatus, RecordType, Role


def response_wire(
    stdout: bytes = b"Status: 200 OK\r\n\r\nok",
    stderr: bytes = b"",
    app_status: int = 0,
    protocol_status: int = ProtocolStatus.REQUEST_COMPLETE,
    request_id: int = 1,
) -> bytes:
    parts = []
    if stderr:
        parts.append(encode_record(RecordType.STDERR, request_id, stderr))
    if stdout:
        parts.append(encode_record(RecordType.STDOUT, request_id, stdout))
    parts.append(encode_record(RecordType.STDOUT, request_id))
    parts.append(
        encode_record(
            RecordType.END_REQUEST, request_id, end_request_body(app_status, protocol_status)
        )
    )
    return b"".join(parts)


def started(conn: ClientConnection | None = None) -> ClientConnection:
    conn = conn or ClientConnection()
    conn.send(BeginRequest())
    conn.send(Params.of({b"SCRIPT_FILENAME": b"/x.php"}))
    conn.send(Stdin(b"body"))
    return conn


def drain(conn: ClientConnection) -> list[ServerEvent]:
    events: list[ServerEvent] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, (EndRequest, ConnectionClosed)):
            break
    return events


def decode(wire: bytes) -> list[Record]:
    reader = RecordReader()
    reader.feed(wire)
    records = []
    while (record := reader.next_record()) is not None:
        records.append(record)
    return records


def test_request_bytes() -> None:
    conn = ClientConnection()
    wire = conn.send(BeginRequest(keep_conn=True))
    wire += conn.send(Params.of([(b"REQUEST_METHOD", b"POST"), (b"CONTENT_LENGTH", b"4")]))
    wire += conn.send(Stdin(b"body"))
    records = decode(wire)
    assert [r.type for r in records] == [
        RecordType.BEGIN_REQUEST,
        RecordType.PARAMS,
        RecordType.PARAMS,
        RecordType.STDIN,
        RecordType.STDIN,
    ]
    assert {r.request_id for r in records} == {1}
    assert parse_begin_request_body(records[0].content) == (Role.RESPONDER, True)
    assert decode_pairs(records[1].content) == [
        (b"REQUEST_METHOD", b"POST"),
        (b"CONTENT_LENGTH", b"4"),
    ]
    assert records[2].content == b"" and records[4].content == b""
    assert records[3].content == b"body"
    assert conn.state is State.AWAIT_END


def test_empty_body_sends_only_the_end_of_stdin() -> None:
    conn = ClientConnection()
    conn.send(BeginRequest())
    conn.send(Params(()))
    assert decode(conn.send(Stdin(b""))) == [Record(RecordType.STDIN, 1, b"")]


def test_streamed_stdin() -> None:
    conn = ClientConnection()
    conn.send(BeginRequest())
    conn.send(Params(()))
    first = conn.send(Stdin(b"ab", end_stream=False))
    assert conn.state is State.SEND_STDIN
    rest = conn.send(Stdin(b"cd"))
    assert [r.content for r in decode(first + rest)] == [b"ab", b"cd", b""]


def test_params_are_encoded_once_pre_encoded_block_first() -> None:
    fixed = encode_pairs([(b"SCRIPT_FILENAME", b"/srv/app.php")])
    params = Params(((b"HTTP_X_JOB", b"42"),), fixed)
    assert params.wire == fixed + encode_pairs([(b"HTTP_X_JOB", b"42")])
    assert params == Params(((b"HTTP_X_JOB", b"42"),), fixed)  # wire is derived, not compared
    conn = ClientConnection()
    conn.send(BeginRequest())
    assert decode_pairs(decode(conn.send(params))[0].content) == [
        (b"SCRIPT_FILENAME", b"/srv/app.php"),
        (b"HTTP_X_JOB", b"42"),
    ]


def test_large_params_are_split_into_records() -> None:
    conn = ClientConnection()
    conn.send(BeginRequest())
    wire = conn.send(Params.of({b"HTTP_X_BIG": b"v" * 200_000}))
    records = decode(wire)
    assert len(records) == 5  # four content records of <= 65535 bytes, then the terminator
    assert decode_pairs(b"".join(r.content for r in records)) == [(b"HTTP_X_BIG", b"v" * 200_000)]


def test_response_events_and_keep_alive_cycle() -> None:
    conn = started()
    conn.receive_data(response_wire(stdout=b"Status: 200\r\n\r\nhi", stderr=b"PHP Warning"))
    assert drain(conn) == [
        Stderr(b"PHP Warning"),
        Stdout(b"Status: 200\r\n\r\nhi"),
        EndRequest(0, ProtocolStatus.REQUEST_COMPLETE),
    ]
    assert conn.state is State.DONE
    conn.start_next_cycle()
    started(conn)
    conn.receive_data(response_wire(app_status=255))
    assert drain(conn)[-1] == EndRequest(255, 0)


def test_every_split_point_of_a_response() -> None:
    wire = response_wire(stdout=b"Status: 500\r\n\r\n" + b"x" * 100, stderr=b"PHP Fatal error")
    whole = started()
    whole.receive_data(wire)
    expected = drain(whole)

    def merged(events: list[ServerEvent]) -> tuple[bytes, bytes, ServerEvent]:
        out = b"".join(e.data for e in events if isinstance(e, Stdout))
        err = b"".join(e.data for e in events if isinstance(e, Stderr))
        return out, err, events[-1]

    for split in range(1, len(wire)):
        conn = started()
        conn.receive_data(wire[:split])
        events = drain(conn)
        conn.receive_data(wire[split:])
        events += drain(conn)
        assert merged(events) == merged(expected), split


def test_close_after_end_request_is_clean() -> None:
    conn = ClientConnection()
    conn.send(BeginRequest(keep_conn=False))
    conn.send(Params(()))
    conn.send(Stdin(b""))
    conn.receive_data(response_wire())
    conn.receive_data(b"")
    events = drain(conn)
    assert isinstance(events[-1], EndRequest)
    assert drain(conn) == [ConnectionClosed()]
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.start_next_cycle()


def test_stream_cut_short_is_a_remote_error() -> None:
    wire = response_wire()
    for cut in (1, 5, 16, len(wire) - 1):
        conn = started()
        conn.receive_data(wire[:cut])
        drain(conn)
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError):
            drain(conn)
        assert conn.state is State.ERROR
    conn = started()
    conn.receive_data(b"")  # closed before a single byte of the response
    with pytest.raises(RemoteProtocolError, match="before END_REQUEST"):
        conn.next_event()


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x02" + response_wire()[1:], "version 2"),
        (encode_record(RecordType.STDOUT, 2, b"x"), "request id 2"),
        (encode_record(RecordType.BEGIN_REQUEST, 1, bytes(8)), "type 1"),
        (encode_record(RecordType.STDIN, 1, b"x"), "type 5"),
        (encode_record(RecordType.END_REQUEST, 1, b"abc"), "content length 3"),
        (encode_record(RecordType.GET_VALUES_RESULT, 0, b""), "without a GET_VALUES"),
        (encode_record(RecordType.PARAMS, 0, b""), "management record"),
    ],
)
def test_malformed_responses(wire: bytes, message: str) -> None:
    conn = started()
    conn.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=message):
        drain(conn)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_records_after_end_request_are_rejected() -> None:
    conn = started()
    conn.receive_data(response_wire() + encode_record(RecordType.STDOUT, 1, b"late"))
    drain(conn)
    assert conn.buffered_bytes > 0
    with pytest.raises(RemoteProtocolError, match="state done"):
        conn.next_event()


def test_output_past_the_limits_is_read_and_dropped() -> None:
    end = encode_record(
        RecordType.END_REQUEST, 1, end_request_body(0, ProtocolStatus.REQUEST_COMPLETE)
    )
    conn = started(ClientConnection(Limits(max_stdout=10, max_stderr=5)))
    conn.receive_data(encode_record(RecordType.STDOUT, 1, b"x" * 8))
    assert drain(conn) == [Stdout(b"x" * 8)]
    conn.receive_data(
        encode_record(RecordType.STDOUT, 1, b"yyy")
        + encode_record(RecordType.STDOUT, 1, b"zzz")
        + encode_record(RecordType.STDERR, 1, b"e" * 6)
        + encode_record(RecordType.STDERR, 1, b"f")
    )
    assert drain(conn) == [Stdout(b"yy"), Stderr(b"eeeee")]
    conn.receive_data(end)
    assert drain(conn) == [EndRequest(0, ProtocolStatus.REQUEST_COMPLETE)]
    # Folded, the same: the response is whole, with what fits.
    conn = started(ClientConnection(Limits(max_stdout=10, max_stderr=5)))
    conn.receive_data(
        encode_record(RecordType.STDOUT, 1, b"Status: 200\r\n\r\n" + b"x" * 100)
        + encode_record(RecordType.STDERR, 1, b"warning " * 100)
        + end
    )
    response = conn.receive_response()
    assert response == FullResponse(b"Status: 20", b"warni", 0, ProtocolStatus.REQUEST_COMPLETE)


def test_events_in_the_wrong_order_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError, match="Params in state idle"):
        ClientConnection().send(Params(()))
    conn = ClientConnection()
    conn.send(BeginRequest())
    with pytest.raises(LocalProtocolError, match="Stdin in state send-params"):
        conn.send(Stdin(b""))
    assert conn.state is State.ERROR
    conn = started()
    with pytest.raises(LocalProtocolError):
        conn.send(BeginRequest())
    with pytest.raises(LocalProtocolError):
        started().start_next_cycle()
    with pytest.raises(LocalProtocolError, match="must be"):
        Params(((b"A", "text"),))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        ClientConnection().send(AbortRequest())


def test_abort_waits_for_end_request() -> None:
    conn = ClientConnection()
    conn.send(BeginRequest())
    conn.send(Params(()))
    conn.send(Stdin(b"part", end_stream=False))
    assert decode(conn.send(AbortRequest())) == [Record(RecordType.ABORT_REQUEST, 1, b"")]
    conn.receive_data(response_wire(stdout=b""))
    assert drain(conn) == [EndRequest(0, 0)]


def test_filter_role_sends_data_after_stdin() -> None:
    conn = ClientConnection()
    conn.send(BeginRequest(role=Role.FILTER))
    conn.send(Params(()))
    conn.send(Stdin(b""))
    assert conn.state is State.SEND_DATA
    assert [r.type for r in decode(conn.send(Data(b"file")))] == [RecordType.DATA] * 2
    assert conn.state in (State.AWAIT_END,)  # `in`: mypy narrowed state on the line above


def test_get_values_management_exchange() -> None:
    conn = ClientConnection()
    wire = conn.send(GetValues((b"FCGI_MAX_CONNS", b"FCGI_MPXS_CONNS")))
    (record,) = decode(wire)
    assert record.request_id == 0 and record.type == RecordType.GET_VALUES
    assert decode_pairs(record.content) == [(b"FCGI_MAX_CONNS", b""), (b"FCGI_MPXS_CONNS", b"")]
    conn.receive_data(
        encode_record(RecordType.GET_VALUES_RESULT, 0, encode_pairs([(b"FCGI_MAX_CONNS", b"8")]))
    )
    assert drain(conn) == [GetValuesResult(((b"FCGI_MAX_CONNS", b"8"),))]
    conn.send(GetValues((b"X",)))
    conn.receive_data(encode_record(RecordType.UNKNOWN_TYPE, 0, unknown_type_body(9)))
    assert drain(conn) == [UnknownType(9)]
    assert conn.state is State.IDLE


@given(
    stdout=st.binary(max_size=200_000),
    stderr=st.binary(max_size=5000),
    app_status=st.integers(0, 2**32 - 1),
    chunk=st.integers(1, 70_000),
)
def test_response_round_trip(stdout: bytes, stderr: bytes, app_status: int, chunk: int) -> None:
    from fastcgi.records import encode_stream

    wire = (
        encode_stream(RecordType.STDERR, 1, stderr)
        + encode_stream(RecordType.STDOUT, 1, stdout)
        + encode_record(RecordType.STDOUT, 1)
        + encode_record(RecordType.END_REQUEST, 1, end_request_body(app_status, 0))
    )
    conn = started()
    events: list[ServerEvent] = []
    for i in range(0, len(wire), chunk):
        conn.receive_data(wire[i : i + chunk])
        events += drain(conn)
    assert b"".join(e.data for e in events if isinstance(e, Stdout)) == stdout
    assert b"".join(e.data for e in events if isinstance(e, Stderr)) == stderr
    assert events[-1] == EndRequest(app_status, 0)


def test_send_request_is_the_three_events_in_one() -> None:
    params = Params.of({b"SCRIPT_FILENAME": b"/x.php", b"HTTP_X_BIG": b"v" * 70_000})
    body = b"b" * 100_000
    one_by_one = ClientConnection()
    expected = (
        one_by_one.send(BeginRequest()) + one_by_one.send(params) + one_by_one.send(Stdin(body))
    )
    conn = ClientConnection()
    assert conn.send_request(params, body) == expected
    assert (conn.state, conn.keep_conn) == (State.AWAIT_END, True)
    with pytest.raises(LocalProtocolError, match="in state await-end"):
        conn.send_request(params)
    assert conn.state is State.ERROR


@pytest.mark.parametrize("keep_conn", [True, False])
def test_send_request_frames_small_requests_as_the_events_do(keep_conn: bool) -> None:
    # A request whose streams fit one record each is framed in one step: every padding,
    # and the empty streams, must come out as sending the three events does.
    for params_size in (0, 1, 7, 8, 9, 15, 16, 17, 65528):
        for body_size in (0, 1, 6, 8, 13, 65528, 65529):
            params = Params((), b"p" * params_size)
            body = b"b" * body_size
            one_by_one = ClientConnection(request_id=513)
            expected = (
                one_by_one.send(BeginRequest(keep_conn=keep_conn))
                + one_by_one.send(params)
                + one_by_one.send(Stdin(body))
            )
            conn = ClientConnection(request_id=513)
            assert conn.send_request(params, body, keep_conn=keep_conn) == expected


@pytest.mark.parametrize("keep_conn", [True, False])
def test_send_request_keep_conn_flag(keep_conn: bool) -> None:
    conn = ClientConnection()
    records = decode(conn.send_request(Params(()), keep_conn=keep_conn))
    assert parse_begin_request_body(records[0].content) == (Role.RESPONDER, keep_conn)


def test_receive_response_at_every_split_point() -> None:
    wire = response_wire(stdout=b"Status: 500\r\n\r\n" + b"x" * 100, stderr=b"PHP Fatal error")
    expected = FullResponse(
        b"Status: 500\r\n\r\n" + b"x" * 100, b"PHP Fatal error", 0, ProtocolStatus.REQUEST_COMPLETE
    )
    for split in range(1, len(wire)):
        conn = started()
        conn.receive_data(wire[:split])
        assert conn.receive_response() is NEED_DATA, split
        conn.receive_data(wire[split:])
        assert conn.receive_response() == expected, split
        assert conn.state is State.DONE
    # a kept-alive connection folds its next response from scratch
    conn.start_next_cycle()
    started(conn)
    conn.receive_data(response_wire(stdout=b"\r\n\r\nsecond", app_status=7))
    assert conn.receive_response() == FullResponse(b"\r\n\r\nsecond", b"", 7, 0)


def test_receive_response_rejects_management_records_and_eof() -> None:
    conn = started()
    conn.receive_data(encode_record(RecordType.UNKNOWN_TYPE, 0, unknown_type_body(99)))
    with pytest.raises(RemoteProtocolError, match="UNKNOWN_TYPE without a management request"):
        conn.receive_response()
    conn = started()
    conn.send(GetValues((b"FCGI_MAX_CONNS",)))
    conn.receive_data(encode_record(RecordType.UNKNOWN_TYPE, 0, unknown_type_body(9)))
    with pytest.raises(RemoteProtocolError, match="unexpected UnknownType"):
        conn.receive_response()
    assert conn.state is State.ERROR
    conn = started()
    conn.receive_data(encode_record(RecordType.STDOUT, 1, b"half"))
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed before END_REQUEST"):
        conn.receive_response()
