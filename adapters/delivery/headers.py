"""The job headers every backend receives, FastCGI and HTTP alike (the delivery contract)."""

from __future__ import annotations

import functools
import re
import time
from urllib.parse import quote_from_bytes

from adapters.storage.jobs import Job, new_span_id

SERVER_SOFTWARE = "busgate"

#: The ``content_type`` word that sends the payload as an HTML form field.
FORM = "form"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

_TOKEN = re.compile(r"[A-Za-z0-9-]{1,64}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def enqueued_at_text(timestamp: float) -> str:
    """RFC 3339 in UTC with milliseconds: what PHP's strtotime and every JSON parser read."""
    seconds = int(timestamp)
    millis = round((timestamp - seconds) * 1000)
    if millis == 1000:
        seconds, millis = seconds + 1, 0
    return _second_text(seconds) + f".{millis:03d}Z"


@functools.lru_cache(maxsize=64)
def _second_text(seconds: int) -> str:
    # Jobs delivered together were mostly pushed in the same few seconds: strftime once each.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def traceparent(trace_id: str, span_id: str | None = None) -> str:
    """W3C trace context: the job's trace, a fresh span per attempt, sampled."""
    return f"00-{trace_id}-{span_id or new_span_id()}-01"


def trace_id_of(value: str) -> str | None:
    """The trace id of a W3C ``traceparent`` a producer sent, or None if it is not one."""
    match = _TRACEPARENT.fullmatch(value.strip())
    return None if match is None else match.group(1)


def job_headers(job: Job) -> list[tuple[str, str]]:
    """Header names and values for a delivery of ``job``.

    Producer attributes whose names are header tokens travel as ``X-Busgate-Attr-<name>``;
    others stay in the store, visible through the admin API.
    """
    headers = [
        ("X-Busgate-Job-Id", job.id),
        ("X-Busgate-Queue", job.queue),
        ("X-Busgate-Topic", job.topic),
        ("X-Busgate-Attempt", str(job.attempt)),
        ("X-Busgate-Enqueued-At", enqueued_at_text(job.enqueued_at)),
        ("traceparent", traceparent(job.trace_id)),
    ]
    for name, value in job.attributes.items():
        if _TOKEN.fullmatch(name) and "\r" not in value and "\n" not in value:
            headers.append((f"X-Busgate-Attr-{name}", value))
    return headers


@functools.lru_cache(maxsize=4096)
def cgi_name(header: str) -> bytes:
    """``X-Busgate-Job-Id`` -> ``HTTP_X_BUSGATE_JOB_ID``."""
    return b"HTTP_" + header.upper().replace("-", "_").encode("latin-1")


def request_body(content_type: str, payload: bytes) -> tuple[str, bytes]:
    """The Content-Type and body for a delivery.

    ``form`` sends ``payload=<urlencoded payload>`` so a script that reads
    ``$_POST['payload']`` (or a servlet's request parameter) works untouched; any other
    media type sends the payload byte for byte.
    """
    if content_type == FORM:
        return FORM_CONTENT_TYPE, b"payload=" + quote_from_bytes(payload, safe="").encode("ascii")
    return content_type, payload
