"""The producer HTTP API: ``POST /v1/queues/{queue}[/{topic}]/jobs``.

The same checks and the same store call as a Redis-protocol push (``ProducerService``):

* a JSON body ``{"payload": …, "id": …, "delay_ms": …, "priority": …, "attributes": {…},
  "traceparent": …}`` or ``{"jobs": [ {…}, … ]}`` pushes one or many jobs; a ``payload``
  that is a string is sent as its UTF-8 bytes, anything else as the JSON text it was
  written as (numbers, spacing and repeated keys as the producer wrote them);
* any other content type pushes the raw body as one payload, with the options as query
  parameters (``?id=&delay_ms=&priority=&attr.tenant=acme``);
* a W3C ``traceparent`` request header is the trace of every job of the request that does
  not name its own (a JSON job's "traceparent", a raw body's ``?traceparent=``); an invalid
  one is ignored, as W3C says;
* the queue's password comes as ``Authorization: Bearer <password>`` or HTTP Basic with the
  queue as the user.

Answers ``202 {"ids": […], "duplicates": n}`` once the jobs are durable.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from adapters.delivery.headers import trace_id_of
from adapters.storage.errors import StoreError, StoreUnavailable, store_error_text
from adapters.storage.jobs import NewJob, Priority, check_job_id
from gateway.http_server import JSON_DECODER, HTTPError, Request, Response, Router
from gateway.producer import (
    AuthRequired,
    PayloadTooLarge,
    ProducerError,
    ProducerService,
    QueueEntry,
    ShuttingDown,
    UnknownQueue,
    UnknownTopic,
    WrongPassword,
)

#: A batch may carry this many jobs.
MAX_BATCH = 1000
#: What JSON lets stand between its tokens; a member's ":"; what ends a value in an object
#: or list: "}" or "]" (group 1), or "," and what stands before the next one.
_SPACE = re.compile(r"[ \t\n\r]*")
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
_AFTER_VALUE = re.compile(r"[ \t\n\r]*(?:([}\]])|,[ \t\n\r]*)")
#: A payload that may not be a string: only a body without one is read by the decoder alone.
_PAYLOAD_NOT_STRING = re.compile(r'"payload"[ \t\n\r]*:[ \t\n\r]*[^" \t\n\r]')
#: The value at an index and the index past it, or StopIteration: what ``raw_decode`` calls.
_scan: Callable[[str, int], tuple[Any, int]] = JSON_DECODER.scan_once  # type: ignore[attr-defined]
#: A JSON escape of a surrogate ("\ud800"): alone, no UTF-8 can say what it means.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def add_producer_routes(router: Router, service: ProducerService) -> None:
    async def push(request: Request) -> Response:
        return await _push(service, request)

    # Bodies up to the largest queue's max_payload per job, times a generous batch margin;
    # each payload is checked against its own queue's limit afterwards.  Asked per request:
    # a reload may change max_payload.
    def limit() -> int:
        return max(service.directory.max_payload, 1024 * 1024) * 8

    def guard(request: Request) -> None:
        _admit(service, request)

    router.add("POST", "/v1/queues/{queue}/jobs", push, max_body=limit, guard=guard)
    router.add("POST", "/v1/queues/{queue}/{topic}/jobs", push, max_body=limit, guard=guard)


def _admit(service: ProducerService, request: Request) -> QueueEntry:
    """The queue (or queue/topic) a push goes to, once its head shows it may: checked
    before the body is read, and again with it."""
    queue = request.params["queue"]
    if not _same_origin(request):
        # A page on another site, submitting a form in the operator's browser: producers
        # are programs, and send no Origin.
        message = "cross-origin browser requests cannot push jobs"
        service.refused(queue, "cross_origin", message, via="http")
        raise HTTPError(403, message)
    topic = request.params.get("topic")
    target = queue if topic is None else f"{queue}/{topic}"
    try:
        service.directory.entry(queue)  # unknown queue: 404 before any password check
        return service.resolve(target, _authenticate(service, queue, request))
    except ProducerError as exc:
        service.refused(queue, exc.reason, str(exc), via="http")
        raise _http_error(exc, queue) from None
    except HTTPError as exc:  # malformed credentials
        service.refused(queue, "invalid", exc.message, via="http")
        raise


def _http_error(exc: ProducerError | StoreError, queue: str) -> HTTPError:
    if isinstance(exc, UnknownQueue | UnknownTopic):
        return HTTPError(404, str(exc))
    if isinstance(exc, AuthRequired | WrongPassword):
        return HTTPError(401, str(exc), [("WWW-Authenticate", f'Basic realm="{queue}"')])
    if isinstance(exc, PayloadTooLarge):
        return HTTPError(413, str(exc))
    if isinstance(exc, ShuttingDown):
        return HTTPError(503, str(exc), [("Retry-After", "5")])
    if isinstance(exc, StoreUnavailable):  # down, loading, refusing us: try again soon
        return HTTPError(503, store_error_text(exc), [("Retry-After", "1")])
    if isinstance(exc, StoreError):
        return HTTPError(503, store_error_text(exc))
    return HTTPError(400, str(exc))


def _same_origin(request: Request) -> bool:
    """No ``Origin`` (a program), or a page of this very host named by an address.

    By name is not enough: a hostile page whose DNS then points its name at 127.0.0.1 (DNS
    rebinding) is the same origin as the requests it sends here, by name.  An address, or
    localhost, names this host whatever any DNS says.
    """
    origin = request.header("origin")
    if origin is None:
        return True
    host = (request.header("host") or "").lower()
    try:
        origin_host: str = urlsplit(origin).netloc
        hostname = urlsplit(f"//{host}").hostname or ""
    except ValueError:  # "http://[x": not an origin any browser sends
        return False
    return origin_host.lower() == host and (hostname == "localhost" or _is_address(hostname))


def _is_address(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


async def _push(service: ProducerService, request: Request) -> Response:
    entry = _admit(service, request)
    try:
        jobs = _jobs_of(service, request, request.params.get("topic"))
        service.check_sizes(entry, [job.payload for job in jobs])
        result = await service.push(entry, jobs)
    except HTTPError as exc:  # a body that is not jobs
        reason = "too_large" if exc.status == 413 else "invalid"
        service.refused(entry.config.name, reason, exc.message, via="http")
        raise
    except (ProducerError, StoreError) as exc:
        if isinstance(exc, ProducerError):  # a store error refuses nothing of the push's
            service.refused(entry.config.name, exc.reason, str(exc), via="http")
        raise _http_error(exc, entry.config.name) from None
    return Response.json({"ids": list(result.ids), "duplicates": result.duplicates}, 202)


@dataclass(frozen=True, slots=True)
class JSONPayload:
    """A job's ``payload`` as a push reads it: its value, and the text it was written as.

    A payload that is not a string goes to backends as that text: written again by Python it
    was another text (``1E2`` became ``100.0``, ``0.10000000000000000001`` became ``0.1``, a
    big number lost digits, one of two equal keys was dropped)."""

    value: Any
    text: str


def payload_bytes(value: Any) -> bytes:
    """A JSON ``payload`` field as job bytes: a string as its UTF-8; anything else as the text
    it was written as (a ``JSONPayload``), or else as compact JSON."""
    if isinstance(value, JSONPayload):
        if not isinstance(value.value, str):
            if _SURROGATE_ESCAPE.search(value.text):  # refused as a string holding one is
                _utf8(_compact(value.value))
            return _utf8(value.text)
        value = value.value
    return _utf8(value if isinstance(value, str) else _compact(value))


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") that JSON let through
        raise HTTPError(400, "payload is not valid Unicode (a lone surrogate)") from None


def attributes_of(value: Any) -> dict[str, str]:
    """A JSON ``attributes`` field, checked: an object of strings, all valid Unicode (400
    otherwise)."""
    if not isinstance(value, dict):
        raise HTTPError(400, "attributes must be an object of strings")
    for name, text in value.items():
        if not (isinstance(name, str) and isinstance(text, str)):
            raise HTTPError(400, "attributes must be an object of strings")
        # JSON lets a lone surrogate ("\ud800") through, as for a payload; UTF-8 cannot say
        # it, so no backend would ever see the attribute: refused now, not stored.  ASCII,
        # most attributes, cannot hold one: isascii() is a flag, no scan.
        if not (name.isascii() and text.isascii()):
            try:
                (name + text).encode()
            except UnicodeEncodeError:
                raise HTTPError(
                    400, f"attribute {name!r} is not valid Unicode (a lone surrogate)"
                ) from None
    return value


def _authenticate(service: ProducerService, queue: str, request: Request) -> dict[str, str]:
    header = request.header("authorization")
    if header is None:
        return {}
    scheme, _, credentials = header.partition(" ")
    credentials = credentials.strip()  # one space or more after the scheme (RFC 9110 11.4)
    if scheme.lower() == "bearer":
        # The field's bytes were read as ISO-8859-1; a client (curl) sends them as UTF-8.
        password = _credential_text(credentials.encode("latin-1"))
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII
            raise HTTPError(400, "malformed Basic credentials") from None
        user_pass = _credential_text(decoded)
        if ":" not in user_pass:  # no user/password split: what it holds may be a password
            raise HTTPError(400, "malformed Basic credentials")
        # A queue name may hold ':' ("app:emails"), which Basic auth also uses to end the
        # user: the queue of the URL, when the credentials start with it, is the user.
        if user_pass.startswith(f"{queue}:"):
            password = user_pass[len(queue) + 1 :]
        else:
            user, _, password = user_pass.partition(":")
            if user in service.directory.queues:
                raise WrongPassword(f"credentials are for queue '{user}', not '{queue}'")
            if user:  # not echoed: a producer that swapped its fields sent a password there
                raise WrongPassword(f"credentials are for another queue, not '{queue}'")
    else:
        raise HTTPError(400, f"unsupported Authorization scheme {scheme!r}: use Bearer or Basic")
    service.check_password(queue, password)
    return {queue: password}


def _credential_text(raw: bytes) -> str:
    """Credentials as text: UTF-8, as clients send them now, else ISO-8859-1, as older
    ones do (RFC 7617 2.1); so a password that is not ASCII matches as it does over AUTH."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _jobs_of(service: ProducerService, request: Request, topic: str | None) -> list[NewJob]:
    trace_id = _header_trace_id(request)
    encoding = request.header("content-encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        # Stored as sent, a compressed body would reach the backend as bytes it never asked for.
        raise HTTPError(415, f"Content-Encoding {encoding!r} is not supported: send the body as is")
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        # A raw body carries its options in the query; attributes as attr.NAME=value.
        if "payload" in request.query:
            raise HTTPError(400, "the payload of a raw body is the body, not ?payload=")
        options: dict[str, Any] = {
            name: values[-1]
            for name, values in request.query.items()
            if not name.startswith("attr.")
        }
        attributes = {
            name[len("attr.") :]: values[-1]
            for name, values in request.query.items()
            if name.startswith("attr.")
        }
        if attributes:
            options["attributes"] = attributes
        return [_job(service, request.body, options, topic, trace_id=trace_id)]
    if request.query:  # options in two places: one would be dropped without a word
        raise HTTPError(
            400,
            f"query option(s) {', '.join(sorted(request.query))} with a JSON body: "
            "give options in the JSON body, or send a raw body",
        )
    document = request.json(_read_push)
    if isinstance(document, dict) and "jobs" in document:
        beside = set(document) - {"jobs"}
        if beside:  # a batch's options would not reach its jobs
            raise HTTPError(400, f"unknown batch field(s): {', '.join(sorted(beside))}")
        items = document["jobs"]
        if not isinstance(items, list) or not items:
            raise HTTPError(400, "'jobs' must be a non-empty list")
        if len(items) > MAX_BATCH:
            raise HTTPError(413, f"{len(items)} jobs in one request; the limit is {MAX_BATCH}")
    else:
        items = [document]
    batch = isinstance(document, dict) and "jobs" in document
    jobs = []
    for index, item in enumerate(items):
        where = f"jobs[{index}]: " if batch else ""
        if not isinstance(item, dict) or "payload" not in item:
            raise HTTPError(400, f"{where}each job is an object with a 'payload'")
        try:
            jobs.append(
                _job(service, payload_bytes(item["payload"]), item, topic, trace_id=trace_id)
            )
        except HTTPError as exc:
            raise HTTPError(exc.status, where + exc.message) from None
    return jobs


def _read_push(text: str) -> Any:
    """A push's JSON body, as ``JSON_DECODER`` reads any (and refuses what it refuses), but
    with its jobs' payloads as ``JSONPayload`` when one of them is not a string.

    Where a payload's text is takes a walk of the body in Python, and the decoder alone
    reads a batch of string payloads several times faster: a body in which no ``"payload":``
    is followed by anything but a string is only decoded."""
    if not _PAYLOAD_NOT_STRING.search(text):
        document = JSON_DECODER.decode(text)
        # The search misses a payload only behind a name with escapes ("p\\u0061yload").
        if "\\u" not in text or _strings_only(document):
            return document
    start = _past(_SPACE, text, 0)
    if not text.startswith("{", start):  # no job: refused as such once read
        return JSON_DECODER.decode(text)
    document, end = _object(text, start, batch=True)
    end = _past(_SPACE, text, end)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return document


def _strings_only(document: Any) -> bool:
    """Whether every job of the document has a string payload (or none: refused later)."""
    jobs = document.get("jobs") if isinstance(document, dict) else None
    return all(
        not isinstance(item, dict) or isinstance(item.get("payload", ""), str)
        for item in (jobs if isinstance(jobs, list) else [document])
    )


def _object(text: str, index: int, *, batch: bool) -> tuple[dict[str, Any], int]:
    """The object at ``text[index]`` (its "{") and the index past it, as the decoder reads
    one (with its errors), but its payload a ``JSONPayload`` and, in a ``batch``, its "jobs"
    list's objects read the same way."""
    members: dict[str, Any] = {}
    index = _past(_SPACE, text, index + 1)
    if text.startswith("}", index):
        return members, index + 1
    while True:
        if not text.startswith('"', index):
            raise _expecting("property name enclosed in double quotes", text, index)
        name, index = _scan(text, index)
        colon = _COLON.match(text, index)
        if colon is None:
            raise _expecting("':' delimiter", text, index)
        start = colon.end()
        if batch and name == "jobs" and text.startswith("[", start):
            members[name], index = _jobs(text, start)
        else:
            value, index = _value(text, start)
            members[name] = JSONPayload(value, text[start:index]) if name == "payload" else value
        after = _AFTER_VALUE.match(text, index)
        if after is None or after[1] == "]":
            raise _expecting("',' delimiter", text, index)
        if after[1]:
            return members, after.end()
        index = after.end()


def _jobs(text: str, index: int) -> tuple[list[Any], int]:
    """The "jobs" list at ``text[index]`` (its "[") and the index past it; its objects read
    by ``_object``, anything else as the decoder reads it (and refused as no job)."""
    items: list[Any] = []
    index = _past(_SPACE, text, index + 1)
    if text.startswith("]", index):
        return items, index + 1
    while True:
        if text.startswith("{", index):
            item, index = _object(text, index, batch=False)
        else:
            item, index = _value(text, index)
        items.append(item)
        after = _AFTER_VALUE.match(text, index)
        if after is None or after[1] == "}":
            raise _expecting("',' delimiter", text, index)
        if after[1]:
            return items, after.end()
        index = after.end()


def _value(text: str, index: int) -> tuple[Any, int]:
    try:
        return _scan(text, index)
    except StopIteration as stop:  # as raw_decode says it
        raise _expecting("value", text, stop.value) from None


def _expecting(what: str, text: str, index: int) -> json.JSONDecodeError:
    return json.JSONDecodeError(f"Expecting {what}", text, _past(_SPACE, text, index))


def _past(pattern: re.Pattern[str], text: str, index: int) -> int:
    """The index past what ``pattern`` (all of it optional: it always matches) matches."""
    return pattern.match(text, index).end()  # type: ignore[union-attr]


def _header_trace_id(request: Request) -> str | None:
    """The trace id of the request's ``traceparent`` header, if it has a valid one.

    An invalid one is ignored, as W3C Trace Context says a receiver must: the jobs start a
    trace of their own.  The producer's tracing is its own business, and a push that worked
    must not fail for it (a trace a job names itself is an option: it is checked)."""
    header = request.header("traceparent")
    return trace_id_of(header) if header else None


def _whole_number(value: Any) -> int | None:
    """An integer from JSON (1000, 1e3) or a query ("1000"); None for anything else: JSON's
    true is not 1, nor 1.5 one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None  # not inf (1e400), not NaN
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _job(
    service: ProducerService,
    payload: bytes,
    options: dict[str, Any],
    topic: str | None,
    *,
    trace_id: str | None = None,
) -> NewJob:
    """The job ``options`` describe; its trace is its own "traceparent", else ``trace_id``
    (the request header's), else a new one (None)."""
    unknown = set(options) - {"payload", "id", "delay_ms", "priority", "attributes", "traceparent"}
    if unknown:
        raise HTTPError(400, f"unknown job field(s): {', '.join(sorted(unknown))}")
    job_id = options.get("id")
    if job_id is not None:
        if not isinstance(job_id, str):  # 12 and 12.0 would be one key, or two
            raise HTTPError(400, "id must be a string")
        try:
            job_id = check_job_id(job_id)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
    run_at = None
    if "delay_ms" in options:
        delay = _whole_number(options["delay_ms"])
        if delay is None:
            raise HTTPError(400, "delay_ms must be an integer")
        try:
            run_at = service.run_at(delay)
        except ProducerError as exc:
            raise HTTPError(400, f"delay_ms: {exc}") from None
    try:
        priority = Priority.parse(str(options.get("priority", "normal")))
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    attributes = attributes_of(options.get("attributes", {}))
    service.check_attributes(attributes)
    if "traceparent" in options:
        trace_id = trace_id_of(str(options["traceparent"]))
        if trace_id is None:
            raise HTTPError(400, "traceparent is not a W3C trace context")
    return NewJob(
        payload,
        id=job_id,
        topic=topic,
        priority=priority,
        run_at=run_at,
        attributes=attributes,
        trace_id=trace_id,
    )
