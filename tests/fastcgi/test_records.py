"""The record layer, byte by byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcgi.errors import LocalProtocolError, RemoteProtocolError
from fastcgi.pairs import decode_pairs, encode_pairs
from fastcgi.records import (
    STREAM_CHUNK,
    Record,
    RecordReader,
    begin_request_body,
    encode_record,
    encode_stream,
    end_request_body,
    parse_begin_request_body,
    parse_end_request_body,
    parse_unknown_type_body,
    unknown_type_body,
)
from fastcgi.spec import MAX_CONTENT_LEN, ProtocolStatus, RecordType, Role


def read_all(data: bytes) -> list[Record]:
    reader = RecordReader()
    reader.feed(data)
    out = []
    while (record := reader.next_record()) is not None:
        out.append(record)
    return out


def test_header_layout_and_padding() -> None:
    wire = encode_record(RecordType.STDOUT, 1, b"abc")
    assert wire == bytes([1, 6, 0, 1, 0, 3, 5, 0]) + b"abc" + bytes(5)
    assert len(wire) % 8 == 0


def test_empty_record_is_end_of_stream() -> None:
    assert encode_record(RecordType.STDIN, 7) == bytes([1, 5, 0, 7, 0, 0, 0, 0])


@pytest.mark.parametrize("record_type", list(RecordType))
def test_every_record_type_round_trips(record_type: RecordType) -> None:
    content = {
        RecordType.BEGIN_REQUEST: begin_request_body(Role.RESPONDER, True),
        RecordType.ABORT_REQUEST: b"",
        RecordType.END_REQUEST: end_request_body(3, ProtocolStatus.OVERLOADED),
        RecordType.UNKNOWN_TYPE: unknown_type_body(42),
        RecordType.GET_VALUES: encode_pairs([(b"FCGI_MAX_CONNS", b"")]),
        RecordType.GET_VALUES_RESULT: encode_pairs([(b"FCGI_MAX_CONNS", b"8")]),
    }.get(record_type, b"some stream bytes")
    assert read_all(encode_record(record_type, 9, content)) == [Record(record_type, 9, content)]


def test_fixed_bodies() -> None:
    assert parse_begin_request_body(begin_request_body(Role.FILTER, False)) == (3, False)
    assert parse_begin_request_body(begin_request_body(Role.RESPONDER, True)) == (1, True)
    assert parse_end_request_body(end_request_body(2**32 - 1, 3)) == (2**32 - 1, 3)
    assert parse_unknown_type_body(unknown_type_body(200)) == 200


def test_stream_is_split_at_the_content_limit() -> None:
    data = bytes(range(256)) * 1024  # 256 KiB
    wire = encode_stream(RecordType.STDIN, 1, data)
    records = read_all(wire)
    assert all(len(r.content) <= MAX_CONTENT_LEN for r in records)
    assert len(records[0].content) == STREAM_CHUNK
    assert b"".join(r.content for r in records) == data
    assert encode_stream(RecordType.STDIN, 1, b"") == b""


def test_oversized_single_record_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_record(RecordType.STDOUT, 1, bytes(MAX_CONTENT_LEN + 1))
    with pytest.raises(LocalProtocolError):
        encode_record(RecordType.STDOUT, 70000, b"")


def test_every_split_point_of_a_pipelined_stream() -> None:
    wire = (
        encode_record(RecordType.STDOUT, 1, b"Status: 200\r\n\r\nhello")
        + encode_record(RecordType.STDERR, 1, b"warning")
        + encode_record(RecordType.STDOUT, 1)
        + encode_record(RecordType.END_REQUEST, 1, end_request_body(0, 0))
    )
    expected = read_all(wire)
    assert len(expected) == 4
    for split in range(len(wire) + 1):
        reader = RecordReader()
        got = []
        for piece in (wire[:split], wire[split:]):
            if piece:  # feeding b"" would mean end of stream
                reader.feed(piece)
            while (record := reader.next_record()) is not None:
                got.append(record)
        assert got == expected, split
    # And one byte at a time.
    reader = RecordReader()
    got = []
    for i in range(len(wire)):
        reader.feed(wire[i : i + 1])
        while (record := reader.next_record()) is not None:
            got.append(record)
    assert got == expected


def test_wrong_version_is_a_remote_error() -> None:
    wire = bytearray(encode_record(RecordType.STDOUT, 1, b"x"))
    wire[0] = 2
    with pytest.raises(RemoteProtocolError, match="version 2"):
        read_all(bytes(wire))


@pytest.mark.parametrize(
    "record_type", [RecordType.END_REQUEST, RecordType.BEGIN_REQUEST, RecordType.UNKNOWN_TYPE]
)
def test_impossible_length_is_a_remote_error(record_type: RecordType) -> None:
    with pytest.raises(RemoteProtocolError, match="content length 3"):
        read_all(encode_record(record_type, 1, b"abc"))


def test_stream_cut_short_is_a_remote_error() -> None:
    wire = encode_record(RecordType.STDOUT, 1, b"hello world")
    for cut in (3, 8, 12, len(wire) - 1):
        reader = RecordReader()
        reader.feed(wire[:cut])
        assert reader.next_record() is None
        reader.feed(b"")
        with pytest.raises(RemoteProtocolError, match="closed inside"):
            reader.next_record()


def test_clean_eof_between_records() -> None:
    reader = RecordReader()
    reader.feed(encode_record(RecordType.STDOUT, 1, b"x"))
    reader.feed(b"")
    assert reader.next_record() == Record(RecordType.STDOUT, 1, b"x")
    assert reader.next_record() is None
    assert reader.at_eof
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"more")


@given(
    st.lists(
        st.tuples(st.sampled_from([4, 5, 6, 7, 8]), st.integers(1, 65535), st.binary(max_size=300)),
        max_size=8,
    ),
    st.integers(1, 64),
)
def test_records_round_trip_in_any_chunking(
    records: list[tuple[int, int, bytes]], chunk: int
) -> None:
    wire = b"".join(encode_record(t, rid, content) for t, rid, content in records)
    reader = RecordReader()
    got = []
    for i in range(0, len(wire), chunk):
        reader.feed(wire[i : i + chunk])
        while (record := reader.next_record()) is not None:
            got.append(record)
    assert got == [Record(t, rid, content) for t, rid, content in records]


# -- name-value pairs ---------------------------------------------------------------------------


def test_pair_lengths_use_one_or_four_bytes() -> None:
    short = encode_pairs([(b"A", b"x" * 127)])
    assert short[:2] == bytes([1, 127])
    long = encode_pairs([(b"A", b"x" * 128)])
    assert long[:5] == bytes([1, 0x80, 0, 0, 128])
    big_name = encode_pairs([(b"N" * 300, b"")])
    assert big_name[:5] == bytes([0x80, 0, 1, 44, 0])


@given(st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=70000)), max_size=5))
def test_pairs_round_trip(pairs: list[tuple[bytes, bytes]]) -> None:
    assert decode_pairs(encode_pairs(pairs)) == pairs


@pytest.mark.parametrize(
    "wire",
    [bytes([5]), bytes([0x80, 0, 0]), bytes([3, 3]) + b"abcd", bytes([1, 0x80, 0, 0, 9]) + b"a"],
)
def test_truncated_pairs_are_remote_errors(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_pairs(wire)
