"""CGI response parsing."""

from __future__ import annotations

import pytest

from fastcgi.cgi import parse_cgi_response
from fastcgi.errors import RemoteProtocolError


def test_php_style_response() -> None:
    raw = (
        b"Status: 503 Service Unavailable\r\nX-Powered-By: PHP/8.2\r\n"
        b"Retry-After: 30\r\nContent-type: text/html; charset=UTF-8\r\n\r\nbusy"
    )
    response = parse_cgi_response(raw)
    assert response.status == 503
    assert response.reason == "Service Unavailable"
    assert response.header(b"retry-after") == b"30"
    assert response.header(b"Content-Type") == b"text/html; charset=UTF-8"
    assert response.body == b"busy"
    assert all(name.lower() != b"status" for name, _ in response.headers)


def test_status_defaults() -> None:
    assert parse_cgi_response(b"Content-Type: text/plain\n\nok").status == 200
    assert parse_cgi_response(b"Location: /next\r\n\r\n").status == 302
    assert parse_cgi_response(b"Status: 201\r\n\r\n").reason == ""


def test_body_may_contain_blank_lines_and_binary() -> None:
    body = b"\r\n\r\n\x00\xff"
    assert parse_cgi_response(b"Content-Type: a/b\r\n\r\n" + body).body == body


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (b"Content-Type: text/plain\r\nno end", "no end of headers"),
        (b"Status: abc\r\n\r\n", "malformed CGI Status"),
        (b"Status: 999 Nope\r\n\r\n", "malformed CGI Status"),
        (b"not a header\r\n\r\n", "malformed CGI header"),
        (b"Bad Name: x\r\n\r\n", "malformed CGI header"),
    ],
)
def test_malformed_responses(raw: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        parse_cgi_response(raw)


def test_header_block_limit() -> None:
    raw = b"X-Big: " + b"a" * 200 + b"\r\n\r\nbody"
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 100"):
        parse_cgi_response(raw, max_header_size=100)
    assert parse_cgi_response(raw, max_header_size=300).body == b"body"


@pytest.mark.parametrize("size", [10, 5000])  # a header block that is cached, and one too big
def test_a_repeated_header_block_parses_the_same_each_time(size: int) -> None:
    raw = b"Status: 404 Gone\r\nX-Pad: " + b"p" * size + b"\r\n\r\n"
    first = parse_cgi_response(raw + b"one")
    second = parse_cgi_response(raw + b"two")
    assert (first.status, first.reason, first.headers) == (404, "Gone", ((b"X-Pad", b"p" * size),))
    assert (second.status, second.reason, second.headers) == (
        first.status,
        first.reason,
        first.headers,
    )
    assert (first.body, second.body) == (b"one", b"two")


def test_a_malformed_block_fails_every_time() -> None:
    for _ in range(2):  # errors are not remembered as results
        with pytest.raises(RemoteProtocolError, match="malformed CGI Status"):
            parse_cgi_response(b"Status: 700\r\n\r\n")


@pytest.mark.parametrize("blank", [b"\n\n", b"\r\n\n", b"\n\r\n"])
def test_the_first_blank_line_ends_the_headers_whatever_its_line_ends(blank: bytes) -> None:
    # A CRLF blank line later in the body must not be taken for the end of the headers, the
    # second time either (the header block of a PHP answer is parsed once and remembered).
    raw = b"Status: 201\r\nX-A: 1" + blank + b"Content-Type: a/b\r\n\r\nrest"
    for _ in range(2):
        response = parse_cgi_response(raw)
        assert (response.status, response.headers) == (201, ((b"X-A", b"1"),))
        assert response.body == b"Content-Type: a/b\r\n\r\nrest"
