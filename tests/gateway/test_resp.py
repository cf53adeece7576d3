"""The RESP2 request parser and reply encoders, byte by byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import resp
from gateway.resp import (
    Command,
    ErrorReply,
    OversizedCommand,
    RequestParser,
    RESPProtocolError,
    SimpleString,
    encode_command,
)


def parse_all(parser: RequestParser) -> list[Command | OversizedCommand]:
    events: list[Command | OversizedCommand] = []
    while (event := parser.next_event()) is not None:
        events.append(event)
    return events


def commands_of(data: bytes, **limits: int) -> list[Command | OversizedCommand]:
    parser = RequestParser(**limits)
    parser.feed(data)
    return parse_all(parser)


PIPELINE = (
    encode_command("AUTH", "orders", "s3cret")
    + encode_command("LPUSH", "orders", b'{"a": 1}', b"\r\n\x00")
    + encode_command("PING")
)
EXPECTED = [
    Command((b"AUTH", b"orders", b"s3cret")),
    Command((b"LPUSH", b"orders", b'{"a": 1}', b"\r\n\x00")),
    Command((b"PING",)),
]


def test_pipelined_commands() -> None:
    assert commands_of(PIPELINE) == EXPECTED
    assert EXPECTED[1].name == b"LPUSH"


def test_every_split_point() -> None:
    for split in range(len(PIPELINE) + 1):
        parser = RequestParser()
        parser.feed(PIPELINE[:split])
        events = parse_all(parser)
        parser.feed(PIPELINE[split:])
        events += parse_all(parser)
        assert events == EXPECTED, split


def test_byte_at_a_time() -> None:
    parser = RequestParser()
    events = []
    for i in range(len(PIPELINE)):
        parser.feed(PIPELINE[i : i + 1])
        events += parse_all(parser)
    assert events == EXPECTED
    assert parser.buffered == 0


def test_empty_multibulk_is_ignored() -> None:
    assert commands_of(b"*0\r\n*-1\r\n" + encode_command("PING")) == [Command((b"PING",))]


def test_inline_commands() -> None:
    data = b"PING\r\nLPUSH q \"a b\\x41\\n\" 'it\\'s'\n\r\nECHO  x\t y\r\n"
    assert commands_of(data) == [
        Command((b"PING",)),
        Command((b"LPUSH", b"q", b"a bA\n", b"it's")),
        Command((b"ECHO", b"x", b"y")),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*x\r\n", "invalid multibulk length"),
        (b"*2000000\r\n", "invalid multibulk length"),
        (b"*1\r\n$-3\r\n", "invalid bulk length"),
        (b"*1\r\n$abc\r\n", "invalid bulk length"),
        (b"*1\r\n+PING\r\n", "expected '$', got '+'"),
        (b"*1\r\n$4\r\nPINGxx", "not terminated by CRLF"),
        (b'LPUSH q "open\r\n', "unbalanced quotes"),
        (b'LPUSH q "a"b\r\n', "unbalanced quotes"),
        (b"P" * 70000, "too big inline request"),
        (b"*" + b"1" * 70000, "too big mbulk count string"),
    ],
)
def test_malformed_streams(data: bytes, message: str) -> None:
    with pytest.raises(RESPProtocolError) as caught:
        commands_of(data)
    assert str(caught.value).startswith("Protocol error: ")
    assert message in str(caught.value)


def test_oversized_argument_is_skipped_without_buffering() -> None:
    parser = RequestParser(max_bulk_len=1000)
    size = 10 * 1024 * 1024
    head = b"*3\r\n$5\r\nLPUSH\r\n$6\r\norders\r\n$%d\r\n" % size
    parser.feed(head)
    assert parse_all(parser) == []
    chunk = b"x" * 65536
    sent = 0
    while sent < size:
        piece = chunk[: min(len(chunk), size - sent)]
        parser.feed(piece)
        sent += len(piece)
        assert parse_all(parser) == []
        assert parser.buffered < 4096
    parser.feed(b"\r\n" + encode_command("PING"))
    assert parse_all(parser) == [OversizedCommand(b"LPUSH", size, 1000), Command((b"PING",))]


def test_oversized_argument_in_the_middle_and_all_at_once() -> None:
    data = encode_command("LPUSH", "q", b"y" * 50, "after") + encode_command("PING")
    assert commands_of(data, max_bulk_len=10) == [
        OversizedCommand(b"LPUSH", 50, 10),
        Command((b"PING",)),
    ]
    assert commands_of(encode_command(b"z" * 20), max_bulk_len=10) == [
        OversizedCommand(None, 20, 10)
    ]


@given(
    st.lists(st.lists(st.binary(max_size=64), min_size=1, max_size=20), min_size=1, max_size=5),
    st.integers(1, 50),
)
def test_round_trip_in_any_chunking(commands: list[list[bytes]], chunk: int) -> None:
    wire = b"".join(encode_command(*args) for args in commands)
    parser = RequestParser()
    events = []
    for i in range(0, len(wire), chunk):
        parser.feed(wire[i : i + chunk])
        events += parse_all(parser)
    assert events == [Command(tuple(args)) for args in commands]


def test_reply_encoders() -> None:
    assert resp.simple_string("OK") == resp.OK
    assert resp.error("ERR bad\r\nthing") == b"-ERR bad  thing\r\n"
    assert resp.integer(-3) == b":-3\r\n"
    assert resp.bulk_string(b"a\r\nb") == b"$4\r\na\r\nb\r\n"
    assert resp.bulk_string(None) == b"$-1\r\n"
    assert resp.array([resp.integer(1), resp.OK]) == b"*2\r\n:1\r\n+OK\r\n"
    assert resp.array(None) == b"*-1\r\n"
    assert resp.encode([b"a", 1, None, ["x"], SimpleString("OK"), ErrorReply("ERR e")]) == (
        b"*6\r\n$1\r\na\r\n:1\r\n$-1\r\n*1\r\n$1\r\nx\r\n+OK\r\n-ERR e\r\n"
    )
    with pytest.raises(TypeError):
        resp.encode(True)
    with pytest.raises(ValueError):
        resp.simple_string("a\nb")
