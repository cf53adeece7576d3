"""The job headers of the delivery contract, and their CGI form."""

from __future__ import annotations

from datetime import datetime

import pytest

from adapters.delivery.fastcgi import FastCGIBackend, FastCGITarget
from adapters.delivery.headers import enqueued_at_text, job_headers
from adapters.storage.jobs import Job, Priority
from fastcgi.address import parse_address
from fastcgi.pairs import decode_pairs, encode_pairs


def _job(enqueued_at: float, attributes: dict[str, str] | None = None) -> Job:
    return Job(
        "01JBX0000000000000000000AB",
        "orders",
        "paid",
        b'{"n":1}',
        attributes or {},
        Priority.NORMAL,
        3,
        enqueued_at,
        enqueued_at,
        "0af7651916cd43dd8448eb211c80319c",
    )


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000.25, "2023-11-14T22:13:20.250Z"),
        (1_700_000_000.9996, "2023-11-14T22:13:21.000Z"),  # rounds into the next second
        (1_700_000_039.9999, "2023-11-14T22:14:00.000Z"),  # and the next minute
    ],
)
def test_enqueued_at_is_rfc3339_utc_with_milliseconds(timestamp: float, text: str) -> None:
    assert enqueued_at_text(timestamp) == text
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - timestamp) <= 0.0005


def test_every_header_and_token_attributes() -> None:
    headers = dict(job_headers(_job(1_700_000_000.25, {"tenant": "acme", "bad name": "x"})))
    assert headers.pop("traceparent").startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert headers == {
        "X-Busgate-Job-Id": "01JBX0000000000000000000AB",
        "X-Busgate-Queue": "orders",
        "X-Busgate-Topic": "paid",
        "X-Busgate-Attempt": "3",
        "X-Busgate-Enqueued-At": "2023-11-14T22:13:20.250Z",
        "X-Busgate-Attr-tenant": "acme",
    }


def test_attributes_become_headers_only_as_valid_http_field_values() -> None:
    attributes = {
        "lang": "héllo wörld",  # any text: sent as UTF-8
        "padded": " \t padded value\t ",  # the spaces around are not part of an HTTP value
        "tab": "a\tb",
        "nul": "a\x00b",
        "vt": "a\x0bb",
        "del": "a\x7fb",
        "surrogate": "a\ud800b",  # JSON lets it through; UTF-8 cannot carry it
        "crlf": "a\r\nX-Injected: 1",
        "bad name": "x",
    }
    headers = dict(job_headers(_job(1_700_000_000.25, attributes)))
    attribute_headers = {k: v for k, v in headers.items() if k.startswith("X-Busgate-Attr-")}
    assert attribute_headers == {
        "X-Busgate-Attr-lang": "héllo wörld",
        "X-Busgate-Attr-padded": "padded value",
        "X-Busgate-Attr-tab": "a\tb",
    }


def test_fastcgi_params_are_the_headers_in_cgi_form() -> None:
    backend = FastCGIBackend(
        FastCGITarget(parse_address("fastcgi://127.0.0.1:9000"), "/srv/app/index.php")
    )
    job = _job(1_700_000_000.25, {"tenant": "acme"})
    params = dict(backend.params(job, b"12345"))
    assert params[b"CONTENT_LENGTH"] == b"5"
    for name, value in job_headers(job):
        cgi = b"HTTP_" + name.upper().replace("-", "_").encode()
        if name == "traceparent":  # a fresh span per delivery
            assert params[cgi][:36] == value[:36].encode()
        else:
            assert params[cgi] == value.encode()


@pytest.mark.parametrize(
    ("job_id", "attributes", "body"),
    [
        ("01JBX0000000000000000000AB", {}, b"12345"),
        ("01JBX0000000000000000000AB", {"tenant": "acme", "lang": "héllo"}, b""),
        ("i" * 127, {}, b"x" * 1000),  # the longest value that fits a one-byte length
        ("i" * 128, {}, b"x"),  # and the shortest that does not
        ("%c%b%%", {"long": "v" * 300}, b"x"),
    ],
)
def test_fastcgi_params_are_sent_as_they_read(
    monkeypatch: pytest.MonkeyPatch, job_id: str, attributes: dict[str, str], body: bytes
) -> None:
    # The request encodes the job's parameters in one step (FastCGIBackend._job_pairs): they
    # must be the pairs params() lists (what `busgate curl` shows), byte for byte.
    monkeypatch.setattr("adapters.delivery.headers.new_span_id", lambda: "00f067aa0ba902b7")
    backend = FastCGIBackend(
        FastCGITarget(parse_address("fastcgi://127.0.0.1:9000"), "/srv/app/index.php")
    )
    job = _job(1_700_000_000.25, attributes)
    job.id = job_id
    expected = encode_pairs(backend.params(job, body))
    assert backend._static_encoded + backend._job_pairs(job, body) == expected
    assert decode_pairs(expected)[-len(attributes) - 7 :][:2] == [
        (b"CONTENT_LENGTH", b"%d" % len(body)),
        (b"HTTP_X_BUSGATE_JOB_ID", job_id.encode()),
    ]
