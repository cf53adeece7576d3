"""The RESP2 request parser and reply encoders, byte by byte."""

from __future__ import annotations

from itertools import pairwise

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

Event = Command | OversizedCommand


def drain(parser: RequestParser) -> list[Event]:
    events: list[Event] = []
    while (event := parser.next_event()) is not None:
        events.append(event)
    return events


def parse(data: bytes, **limits: int) -> list[Event]:
    parser = RequestParser(**limits)
    parser.feed(data)
    return drain(parser)


def parse_in_pieces(pieces: list[bytes], **limits: int) -> list[Event]:
    parser = RequestParser(**limits)
    events: list[Event] = []
    for piece in pieces:
        parser.feed(piece)
        events += drain(parser)
    assert parser.buffered == 0
    return events


def splits(data: bytes) -> list[list[bytes]]:
    """The data cut in two at every index, and byte by byte."""
    cut_once = [[data[:i], data[i:]] for i in range(len(data) + 1)]
    return [*cut_once, [data[i : i + 1] for i in range(len(data))]]


def protocol_error(data: bytes, **limits: int) -> str:
    with pytest.raises(RESPProtocolError) as caught:
        parse(data, **limits)
    return str(caught.value)


PIPELINE = (
    encode_command("AUTH", "orders", "s3cret")
    + encode_command("LPUSH", "orders", b'{"a": 1}', b"\r\n\x00", b"")
    + encode_command("ping")
)
EXPECTED = [
    Command((b"AUTH", b"orders", b"s3cret")),
    Command((b"LPUSH", b"orders", b'{"a": 1}', b"\r\n\x00", b"")),
    Command((b"ping",)),
]


# -- multibulk requests ------------------------------------------------------------------------


def test_pipelined_commands_in_one_feed() -> None:
    assert parse(PIPELINE) == EXPECTED
    assert [event.name for event in EXPECTED] == [b"AUTH", b"LPUSH", b"PING"]


def test_pipeline_of_many_commands() -> None:
    wire = b"".join(encode_command("LPUSH", "q", str(i)) for i in range(1000))
    assert parse(wire) == [Command((b"LPUSH", b"q", str(i).encode())) for i in range(1000)]


@pytest.mark.parametrize("pieces", splits(PIPELINE))
def test_every_split_point(pieces: list[bytes]) -> None:
    assert parse_in_pieces(pieces) == EXPECTED


def test_partial_input_is_held_until_complete() -> None:
    parser = RequestParser()
    parser.feed(PIPELINE[:-3])
    assert drain(parser) == EXPECTED[:2]
    assert 0 < parser.buffered < len(encode_command("ping"))
    parser.feed(PIPELINE[-3:])
    assert drain(parser) == EXPECTED[2:]
    assert parser.buffered == 0


@pytest.mark.parametrize("empty", [b"*0\r\n", b"*-1\r\n", b"*-10\r\n"])
def test_empty_multibulk_is_ignored(empty: bytes) -> None:
    for pieces in splits(empty + encode_command("PING")):
        assert parse_in_pieces(pieces) == [Command((b"PING",))]


def test_multibulk_count_limit() -> None:
    assert parse(encode_command(*"abc"), max_multibulk_len=3) == [Command((b"a", b"b", b"c"))]
    assert protocol_error(encode_command(*"abcd"), max_multibulk_len=3) == (
        "Protocol error: invalid multibulk length"
    )
    assert protocol_error(b"*2000000\r\n") == "Protocol error: invalid multibulk length"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*x\r\n", "invalid multibulk length"),
        (b"*\r\n", "invalid multibulk length"),
        (b"* 1\r\n", "invalid multibulk length"),
        (b"*+1\r\n", "invalid multibulk length"),
        (b"*1_0\r\n", "invalid multibulk length"),
        (b"*-\r\n", "invalid multibulk length"),
        (b"*1\r\n$-3\r\n", "invalid bulk length"),
        (b"*1\r\n$abc\r\n", "invalid bulk length"),
        (b"*1\r\n$\r\n", "invalid bulk length"),
        (b"*1\r\n$+4\r\nPING\r\n", "invalid bulk length"),
        (b"*1\r\n$" + b"9" * 5000 + b"\r\n", "invalid bulk length"),
        # Longer than Redis's proto-max-bulk-len: refused at once, not skipped for a terabyte.
        (b"*3\r\n$5\r\nLPUSH\r\n$1\r\nq\r\n$999999999999\r\n", "invalid bulk length"),
        (b"*3\r\n$5\r\nLPUSH\r\n$1\r\nq\r\n$536870913\r\n", "invalid bulk length"),
        (b"*1\r\n+PING\r\n", "expected '$', got '+'"),
        (b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n", "expected '$', got 'f'"),
        (b"*1\r\n\x01\r\n", "expected '$', got '\\x01'"),
        (b"*1\r\n$4\r\nPINGxx", "bulk string not terminated by CRLF"),
        (b"*" + b"1" * 70000, "too big mbulk count string"),
        (b"*" + b"1" * 70000 + b"\r\n", "too big mbulk count string"),
        (b"*1\r\n$" + b"1" * 70000, "too big bulk count string"),
        (b"P" * 70000, "too big inline request"),
        (b'LPUSH q "open\r\n', "unbalanced quotes in request"),
    ],
)
def test_malformed_streams(data: bytes, message: str) -> None:
    assert protocol_error(data) == f"Protocol error: {message}"


def test_a_broken_stream_stays_broken() -> None:
    # The bad line is consumed before it is found bad: a parser that carried on would go on to
    # read the PING after it.
    parser = RequestParser()
    parser.feed(b'LPUSH q "open\r\n' + encode_command("PING"))
    for _ in range(2):
        with pytest.raises(RESPProtocolError, match="unbalanced quotes"):
            parser.next_event()


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        RequestParser(max_bulk_len=-1)


# -- oversized arguments -----------------------------------------------------------------------


def test_oversized_argument_streams_through_without_buffering() -> None:
    size = 10 * 1024 * 1024
    wire = (
        b"*4\r\n$5\r\nLPUSH\r\n$6\r\norders\r\n$%d\r\n" % size
        + b"x" * size
        + b"\r\n$5\r\nafter\r\n"
        + encode_command("PING")
    )
    parser = RequestParser(max_bulk_len=1000)
    events: list[Event] = []
    for i in range(0, len(wire), 64 * 1024):
        parser.feed(wire[i : i + 64 * 1024])
        if i:  # the first piece holds the length line: the parser learns the size from it
            assert parser.buffered <= 4096
        events += drain(parser)
        assert parser.buffered <= 4096
    assert events == [OversizedCommand(b"LPUSH", size, 1000, b"orders"), Command((b"PING",))]
    assert parser.buffered == 0


OVERSIZED_WIRE = (
    encode_command("lpush", "q", b"y" * 50, "after", b"z" * 60, b"")
    + encode_command(b"n" * 20, "q")
    + encode_command("LPUSH", "q", b"fits in10!")
)
OVERSIZED_EXPECTED = [
    OversizedCommand(b"LPUSH", 50, 10, b"q"),
    OversizedCommand(None, 20, 10),
    Command((b"LPUSH", b"q", b"fits in10!")),
]


@pytest.mark.parametrize("pieces", splits(OVERSIZED_WIRE))
def test_oversized_commands_at_every_split_point(pieces: list[bytes]) -> None:
    assert parse_in_pieces(pieces, max_bulk_len=10) == OVERSIZED_EXPECTED


def test_oversized_argument_as_last_argument() -> None:
    wire = encode_command("LPUSH", "q", b"y" * 11) + encode_command("PING")
    for pieces in splits(wire):
        assert parse_in_pieces(pieces, max_bulk_len=10) == [
            OversizedCommand(b"LPUSH", 11, 10, b"q"),
            Command((b"PING",)),
        ]


def args_strategy(max_size: int) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.binary(max_size=max_size), min_size=1, max_size=20)


@st.composite
def chunked(draw: st.DrawFn, wire: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in pairwise(bounds)]


@given(st.lists(args_strategy(64), min_size=1, max_size=5), st.data())
def test_round_trip_in_any_chunking(commands: list[list[bytes]], data: st.DataObject) -> None:
    wire = b"".join(encode_command(*args) for args in commands)
    pieces = data.draw(chunked(wire))
    assert parse_in_pieces(pieces) == [Command(tuple(args)) for args in commands]


@given(st.lists(args_strategy(24), min_size=1, max_size=5), st.integers(0, 16), st.data())
def test_oversized_in_any_chunking(
    commands: list[list[bytes]], limit: int, data: st.DataObject
) -> None:
    def expected(args: list[bytes]) -> Event:
        for i, arg in enumerate(args):
            if len(arg) > limit:
                name, target = (args[0].upper() if i else None), (args[1] if i > 1 else None)
                return OversizedCommand(name, len(arg), limit, target)
        return Command(tuple(args))

    wire = b"".join(encode_command(*args) for args in commands)
    pieces = data.draw(chunked(wire))
    events = parse_in_pieces(pieces, max_bulk_len=limit)
    assert events == [expected(args) for args in commands]


def test_argument_of_exactly_the_limit_fits() -> None:
    assert parse(encode_command("ECHO", b"x" * 10), max_bulk_len=10) == [
        Command((b"ECHO", b"x" * 10))
    ]


# -- inline requests ---------------------------------------------------------------------------


INLINE = b"PING\r\nLPUSH q \"a b\\x41\\n\" 'it\\'s'\n\r\n  \t \nECHO  x\t y\r\n"


@pytest.mark.parametrize("pieces", splits(INLINE))
def test_inline_commands_at_every_split_point(pieces: list[bytes]) -> None:
    assert parse_in_pieces(pieces) == [
        Command((b"PING",)),
        Command((b"LPUSH", b"q", b"a bA\n", b"it's")),
        Command((b"ECHO", b"x", b"y")),
    ]


def test_empty_inline_line_first_in_the_buffer() -> None:
    # The byte before the line end belongs to this line only if the line is not empty.
    parser = RequestParser()
    parser.feed(b"\nECHO a\r")
    assert drain(parser) == []
    parser.feed(b"\n")
    assert drain(parser) == [Command((b"ECHO", b"a"))]


def test_inline_and_multibulk_mixed() -> None:
    wire = b"PING\n" + encode_command("ECHO", "x y") + b"ECHO z\r\n"
    assert parse(wire) == [
        Command((b"PING",)),
        Command((b"ECHO", b"x y")),
        Command((b"ECHO", b"z")),
    ]


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"set k v", [b"set", b"k", b"v"]),
        (b"  set\tk  ", [b"set", b"k"]),
        (b'"\\n\\r\\t\\b\\a\\\\\\"\\q"', [b'\n\r\t\b\a\\"q']),
        (b'"\\x00\\xfF\\x4"', [b"\x00\xff" + b"x4"]),
        (b'"\\X41"', [b"X41"]),
        (b"'a\\'b\\n\"c'", [b"a'b\\n\"c"]),
        (b"\"\" ''", [b"", b""]),
        (b'a"b c"', [b"ab c"]),
        (b"a'b c' d", [b"ab c", b"d"]),
        (b'"a"\x0bb', [b"a", b"b"]),
        (b"a\x0bb \x0c c", [b"a\x0bb", b"c"]),
        (b"set k v\x00 ignored", [b"set", b"k", b"v"]),
        (b"\x00set", []),
    ],
)
def test_inline_quoting(line: bytes, args: list[bytes]) -> None:
    expected = [Command(tuple(args))] if args else []
    assert parse(line + b"\r\n") == expected
    assert parse(line + b"\n") == expected


@pytest.mark.parametrize(
    "line",
    [b'set "k', b"set 'k", b'set "k"v', b"set 'k'v", b'"a\\"', b"'a\\'", b'"a\x00"'],
)
def test_inline_unbalanced_quotes(line: bytes) -> None:
    assert protocol_error(line + b"\r\n") == "Protocol error: unbalanced quotes in request"


def test_inline_length_limit_is_the_same_at_every_split_point() -> None:
    fits = b"E" * 32 + b"\r\n"
    for pieces in splits(fits):
        assert parse_in_pieces(pieces, max_inline_len=32) == [Command((b"E" * 32,))]
    too_long = b"E" * 33 + b"\r\n"
    for pieces in splits(too_long):
        parser = RequestParser(max_inline_len=32)
        with pytest.raises(RESPProtocolError, match=r"^Protocol error: too big inline request$"):
            for piece in pieces:
                parser.feed(piece)
                drain(parser)


def test_long_inline_line_in_small_pieces() -> None:
    line = b"ECHO " + b"x" * 60000 + b"\r\n"
    pieces = [line[i : i + 7] for i in range(0, len(line), 7)]
    assert parse_in_pieces(pieces) == [Command((b"ECHO", b"x" * 60000))]


# -- replies -----------------------------------------------------------------------------------


def test_reply_encoders() -> None:
    assert resp.simple_string("OK") == resp.OK == b"+OK\r\n"
    assert resp.simple_string("PONG") == resp.PONG
    assert resp.error("ERR bad\r\nthing") == b"-ERR bad  thing\r\n"
    assert resp.error("WRONGPASS invalid\nusername") == b"-WRONGPASS invalid username\r\n"
    assert resp.integer(-3) == b":-3\r\n"
    assert resp.integer(0) == b":0\r\n"
    assert resp.bulk_string(b"a\r\nb") == b"$4\r\na\r\nb\r\n"
    assert resp.bulk_string(b"") == b"$0\r\n\r\n"
    assert resp.bulk_string(None) == b"$-1\r\n"
    assert resp.array([resp.integer(1), resp.OK]) == b"*2\r\n:1\r\n+OK\r\n"
    assert resp.array([]) == b"*0\r\n"
    assert resp.array(None) == b"*-1\r\n"
    with pytest.raises(ValueError):
        resp.simple_string("a\nb")
    with pytest.raises(ValueError):
        resp.simple_string("a\rb")


def test_resp3_variants() -> None:
    assert resp.null(2) == b"$-1\r\n"
    assert resp.null(3) == b"_\r\n"
    pairs = [(resp.bulk_string(b"proto"), resp.integer(3))]
    assert resp.mapping(pairs, 3) == b"%1\r\n$5\r\nproto\r\n:3\r\n"
    assert resp.mapping(pairs, 2) == b"*2\r\n$5\r\nproto\r\n:3\r\n"


def test_generic_encode() -> None:
    value: resp.Value = [b"a", 1, None, ("x", "é"), SimpleString("OK"), ErrorReply("ERR e\n")]
    assert resp.encode(value) == (
        b"*6\r\n$1\r\na\r\n:1\r\n$-1\r\n*2\r\n$1\r\nx\r\n$2\r\n\xc3\xa9\r\n+OK\r\n-ERR e \r\n"
    )
    assert resp.encode([]) == b"*0\r\n"
    with pytest.raises(TypeError):
        resp.encode(True)
    with pytest.raises(TypeError):
        resp.encode(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SimpleString("two\r\nlines")


def test_encode_command() -> None:
    assert encode_command("SET", b"k", 12) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    assert encode_command("ECHO", "é") == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError):
        encode_command("SET", "k", True)
