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
#: What an HTTP field value may not hold (RFC 9110 5.5): control characters other than tab;
#: and what UTF-8 cannot encode, a lone surrogate (JSON's "\ud800").
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
#: W3C Trace Context: version, trace id, parent id, flags, in lower-case hex.  A later version
#: may add fields after them (version 00 may not); version ff is invalid, as are all-zero ids.
_TRACEPARENT = re.compile(r"(?!ff)([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
_ZERO_TRACE, _ZERO_PARENT = "0" * 32, "0" * 16


def enqueued_at_text(timestamp: float) -> str:
    """RFC 3339 in UTC with milliseconds: what PHP's strtotime and every JSON parser read."""
    return _millisecond_text(round(timestamp * 1000))


@functools.lru_cache(maxsize=256)
def _millisecond_text(ms: int) -> str:
    # The jobs of one push share their enqueue time: formatted once for the lot.
    seconds, millis = divmod(ms, 1000)
    return f"{_second_text(seconds)}.{millis:03d}Z"


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
    if match is None:
        return None
    version, trace_id, parent_id, more = match.groups()
    if (
        (version == "00" and more is not None)
        or trace_id == _ZERO_TRACE
        or parent_id == _ZERO_PARENT
    ):
        return None
    return trace_id


#: The headers every delivery carries, in this order; ``job_header_values`` gives their values.
JOB_HEADER_NAMES = (
    "X-Busgate-Job-Id",
    "X-Busgate-Queue",
    "X-Busgate-Topic",
    "X-Busgate-Attempt",
    "X-Busgate-Enqueued-At",
    "traceparent",
)


def job_header_values(job: Job) -> tuple[str, str, str, str, str, str]:
    """The values of ``JOB_HEADER_NAMES`` for a delivery of ``job`` (a fresh span each time)."""
    return (
        job.id,
        job.queue,
        job.topic,
        str(job.attempt),
        enqueued_at_text(job.enqueued_at),
        traceparent(job.trace_id),
    )


def attribute_headers(job: Job) -> list[tuple[str, str]]:
    """Producer attributes that make valid HTTP headers, as ``X-Busgate-Attr-<name>``.

    The name must be a token and the value free of control characters but tab; spaces and
    tabs around the value are not part of it, in HTTP, so they are dropped.  Both backends
    get the same: a value is text, sent as UTF-8.  Other attributes stay in the store,
    visible through the admin API.
    """
    return [
        (f"X-Busgate-Attr-{name}", value.strip(" \t"))
        for name, value in job.attributes.items()
        if _TOKEN.fullmatch(name) and not _CONTROL.search(value)
    ]


def job_headers(job: Job) -> list[tuple[str, str]]:
    """Header names and values for a delivery of ``job``."""
    headers = list(zip(JOB_HEADER_NAMES, job_header_values(job), strict=True))
    if job.attributes:
        headers += attribute_headers(job)
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
