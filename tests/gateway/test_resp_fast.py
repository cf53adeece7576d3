"""FastRequestParser against RequestParser: the same events from the same bytes, however
they are cut into reads, with hiredis doing the splitting only while the stream is
canonical."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.resp import (
    Command,
    OversizedCommand,
    RequestParser,
    RESPProtocolError,
    encode_command,
)
from gateway.resp_fast import MAX_INCOMPLETE, FastRequestParser
from tests.gateway.test_resp import args_strategy, chunked

Event = Command | OversizedCommand
Parser = RequestParser | FastRequestParser

#: Requests RequestParser accepts or refuses that are not canonical multibulk, and some that
#: are but break a limit: each must send FastRequestParser to RequestParser.
ODD = [
    b"PING\r\n",
    b'LPUSH q "a b"\r\n',
    b"\r\n",
    b"*1\r\n$04\r\nPING\r\n",
    b"*01\r\n$4\r\nPING\r\n",
    b"*1\r\n+PING\r\n",
    b"*1\r\n=8\r\ntxt:PING\r\n",
    b"*2\r\n$4\r\nECHO\r\n:1\r\n",
    b"*1\r\n$4\r\nPINGxx",
    b"*0\r\n",
    b"*-1\r\n",
    b"*-5\r\n",
    b"*1\r\n*1\r\n$1\r\na\r\n",
    b"*1\r\n$-1\r\n",
    b"*x\r\n",
    b"$3\r\nabc\r\n",
    b"*2000000\r\n",
    b"*1048576\r\n",
    b"*4294967295\r\n",
    b"*1\r\n$1\r\n\xff\r\n",
]


def run(parser: Parser, pieces: list[bytes]) -> tuple[list[Event], str | None]:
    events: list[Event] = []
    try:
        for piece in pieces:
            parser.feed(piece)
            while (event := parser.next_event()) is not None:
                events.append(event)
    except RESPProtocolError as exc:
        return events, str(exc)
    return events, None


def same_events(pieces: list[bytes], **limits: int) -> None:
    exact, exact_error = run(RequestParser(**limits), pieces)
    fast_parser = FastRequestParser(RequestParser(**limits))
    fast, fast_error = run(fast_parser, pieces)
    assert fast == exact
    if fast_error is None and exact_error is not None:
        # hiredis does not look at the two bytes after a bulk string: a request whose
        # terminator is wrong is handed over, and refused, only once it is all there.
        assert fast_parser.buffered > 0
    else:
        assert fast_error == exact_error


request = st.one_of(
    args_strategy(40).map(lambda args: encode_command(*args)),
    st.sampled_from(ODD),
)


@settings(max_examples=400)
@given(
    st.lists(request, min_size=1, max_size=6),
    st.sampled_from([{}, {"max_bulk_len": 8}, {"max_bulk_len": 0}, {"max_multibulk_len": 3}]),
    st.data(),
)
def test_the_same_events_and_errors_as_the_exact_parser(
    requests: list[bytes], limits: dict[str, int], data: st.DataObject
) -> None:
    wire = b"".join(requests)
    same_events(data.draw(chunked(wire)), **limits)


def test_canonical_requests_are_split_by_hiredis() -> None:
    parser = FastRequestParser(RequestParser())
    parser.feed(encode_command("LPUSH", "q", "a") + encode_command("PING")[:5])
    assert parser.next_event() == Command((b"LPUSH", b"q", b"a"))
    assert parser.next_event() is None
    assert parser.buffered == 5
    parser.feed(encode_command("PING")[5:])
    assert parser.next_event() == Command((b"PING",))
    assert parser.buffered == 0
    assert parser._exact is None  # still hiredis


def test_an_inline_command_hands_the_connection_over_for_good() -> None:
    parser = FastRequestParser(RequestParser())
    parser.feed(encode_command("ECHO", "a") + b"PING\r\n" + encode_command("ECHO", "b"))
    events = [parser.next_event() for _ in range(3)]
    assert events == [Command((b"ECHO", b"a")), Command((b"PING",)), Command((b"ECHO", b"b"))]
    assert parser._exact is not None


def test_a_count_line_hiredis_would_allocate_for_is_never_given_to_it() -> None:
    # *2000000000 would make hiredis build a 16 GB list before any element arrives, and
    # a nested one is only known to be nested once hiredis has read it.
    for wire in (b"*2000000000\r\n", b"*1\r\n*200000", b"*1\r\n*2"):
        parser = FastRequestParser(RequestParser())
        parser.feed(wire)
        parser.feed(b"0000000\r\n")  # the digits may come in a later read
        assert parser._exact is not None
        assert parser._reader is None


def test_a_resp3_aggregate_count_is_never_given_to_hiredis() -> None:
    # ">10000000" made hiredis reserve an 80 MB list: 59 bytes held 390 MB, no login needed.
    # hiredis skips the two bytes after a bulk string unread: "XY>" starts a push to it.
    cases = (
        [b"*2\r\n>10000000\r\n" * 5],
        [b"*1\r\n", b">1000000000\r\n"],
        [b"*2\r\n$1\r\nAXY>50000000\r\n"],
        [b"*2\r\n$1\r\nAXY>5", b"0000000\r\n"],
    )
    for reads in cases:
        parser = FastRequestParser(RequestParser())
        for data in reads:
            assert parser.next_event() is None
            parser.feed(data)
        assert parser._reader is None
        with pytest.raises(RESPProtocolError):
            parser.next_event()


def test_a_payload_holding_array_and_push_lines_is_parsed_as_sent() -> None:
    parser = FastRequestParser(RequestParser())
    wire = encode_command(
        "LPUSH", "q", b"a list:\r\n* one\r\n*3 more\r\n> quoted 12"
    ) + encode_command("PING")
    parser.feed(wire[:30])
    assert parser.next_event() is None
    parser.feed(wire[30:])
    assert parser.next_event() == Command(
        (b"LPUSH", b"q", b"a list:\r\n* one\r\n*3 more\r\n> quoted 12")
    )
    assert parser.next_event() == Command((b"PING",))


def test_a_request_of_a_thousand_arguments_is_parsed_exactly() -> None:
    parser = FastRequestParser(RequestParser())
    parser.feed(encode_command("LPUSH", "q", *[b"j"] * 998) + encode_command("PING"))
    assert parser.next_event() == Command((b"LPUSH", b"q", *[b"j"] * 998))
    assert parser.next_event() == Command((b"PING",))


def test_a_long_incomplete_request_goes_to_the_exact_parser() -> None:
    parser = FastRequestParser(RequestParser(max_bulk_len=MAX_INCOMPLETE * 4))
    wire = encode_command("LPUSH", "q", b"x" * (MAX_INCOMPLETE * 2))
    parser.feed(wire[: MAX_INCOMPLETE + 100])
    assert parser.next_event() is None
    assert parser._exact is not None  # hiredis holds no more than MAX_INCOMPLETE
    parser.feed(wire[MAX_INCOMPLETE + 100 :])
    assert parser.next_event() == Command((b"LPUSH", b"q", b"x" * (MAX_INCOMPLETE * 2)))


def test_an_oversized_argument_is_reported_as_the_exact_parser_does() -> None:
    parser = FastRequestParser(RequestParser(max_bulk_len=5))
    parser.feed(encode_command("LPUSH", "q", "toolong") + encode_command("PING"))
    assert parser.next_event() == OversizedCommand(b"LPUSH", 7, 5, b"q")
    assert parser.next_event() == Command((b"PING",))


def test_a_low_argument_count_limit_leaves_it_all_to_the_exact_parser() -> None:
    parser = FastRequestParser(RequestParser(max_multibulk_len=2))
    parser.feed(encode_command("ECHO", "a") + encode_command("LPUSH", "q", "a"))
    assert parser.next_event() == Command((b"ECHO", b"a"))
    with pytest.raises(RESPProtocolError, match="invalid multibulk length"):
        parser.next_event()
