"""The admin API: stats, jobs, dead letters, pause/resume, test delivery, config, live events.

Every endpoint but ``/healthz`` and ``/readyz`` takes ``Authorization: Bearer <token>`` with
the token from ``admin_token_file``.  There is no cookie or other ambient credential, so a
page on another site cannot make a browser call these endpoints with the operator's rights
(no CSRF); mutations also insist on a JSON body, which a cross-site form cannot send without
a CORS preflight this server never grants.  Without ``admin_token_file`` the admin API is
off (403).  The WebSocket (``/v1/live``) authenticates with its first message,
``{"token": "…"}``, as browsers cannot set headers on a WebSocket.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import math
import mimetypes
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket

from adapters.delivery.base import running
from adapters.storage.base import Store, parse_dead_cursor
from adapters.storage.bulk import (
    Confirmation,
    delete_ids,
    matching_dead,
    matching_dead_ids,
    replay_ids,
)
from adapters.storage.errors import StoreError
from adapters.storage.jobs import (
    EXCERPT_BYTES,
    DeadFilter,
    DeadJob,
    Job,
    JobRecord,
    Priority,
    TopicStats,
    new_job_id,
    new_trace_id,
)
from gateway import logs
from gateway.config import NAME_PATTERN, Config, TopicConfig, effective_document
from gateway.http_server import SEND_TIMEOUT, HTTPError, Request, Response, Router
from gateway.producer_http import attributes_of, payload_bytes
from gateway.telemetry import Telemetry

if TYPE_CHECKING:
    from gateway.app import App

log = logging.getLogger("busgate.admin")

UI_DIR = Path(__file__).resolve().parent / "ui"
MAX_PAGE = 500
#: The longest a paced replay may keep its request open; slower ones are refused up front
#: (``busgate dead replay --rate`` paces itself in short calls instead).
MAX_PACED_SECONDS = 600.0
DEFAULT_PAGE = 50
AUTH_TIMEOUT = 5.0
#: The most a live-feed client may send in one message: its login, {"token": ...}.
LIVE_MAX_MESSAGE = 4096
#: A closing WebSocket client has this long to answer our close frame.
CLOSE_TIMEOUT = 5.0
TEST_PAYLOAD_LIMIT = 16 * 1024 * 1024
#: How much of each payload a dead-letter page carries: the dashboard shows 60 characters
#: of it, and 50 dead jobs of 1 MiB were 52 MB a refresh.  ``?payload=full`` (an export)
#: or the job (``/v1/jobs/{id}``) gives it whole.
DEAD_PAYLOAD_EXCERPT = EXCERPT_BYTES


def read_token(path: str | None) -> str | None:
    """The admin token, or None when the admin API is not configured.

    Raises ``OSError``/``ValueError`` with the file named for a missing or empty file: the
    daemon refuses to start rather than run an admin API nobody can use.
    """
    if path is None:
        return None
    token = Path(path).read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ValueError(f"{path}: the admin token must be at least 16 characters")
    if not all(" " <= char <= "~" for char in token):
        # It travels in an HTTP header, whose bytes clients encode as they please (curl as
        # UTF-8, Python and browsers as Latin-1, or not at all): outside ASCII, the right
        # token would be refused from some clients and crash others.
        raise ValueError(
            f"{path}: the admin token must be printable ASCII (letters, digits, punctuation),"
            " as `openssl rand -hex 24` writes it"
        )
    return token


def payload_fields(payload: bytes) -> dict[str, Any]:
    """A payload for JSON: as text when it is UTF-8, else base64 (said which)."""
    try:
        return {"payload": payload.decode("utf-8"), "payload_encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(payload).decode(), "payload_encoding": "base64"}


def payload_excerpt(payload: bytes, limit: int | None) -> dict[str, Any]:
    """``payload_fields`` of at most the first ``limit`` bytes (all of them if None), with
    the payload's whole size and whether it was cut.

    The encoding is the whole payload's, as the job's own page shows it; text is cut where a
    character starts, so the excerpt is text too.
    """
    size = len(payload)
    cut = size if limit is None else min(size, limit)
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        encoded = base64.b64encode(payload[:cut]).decode()
        fields = {"payload": encoded, "payload_encoding": "base64"}
    else:
        while cut < size and payload[cut] & 0xC0 == 0x80:  # a continuation byte
            cut -= 1
        fields = {"payload": payload[:cut].decode("utf-8"), "payload_encoding": "utf-8"}
    return {**fields, "payload_size": size, "payload_truncated": cut < size}


def job_document(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "queue": record.queue,
        "topic": record.topic,
        "state": record.state.name.lower(),
        **payload_fields(record.payload),
        "attributes": dict(record.attributes),
        "priority": record.priority.name.lower(),
        "attempt": record.attempt,
        "enqueued_at": record.enqueued_at,
        "run_at": record.run_at,
        "finished_at": record.finished_at,
        "trace_id": record.trace_id,
        "attempts": [
            {
                "attempt": a.attempt,
                "started_at": a.started_at,
                "duration_ms": round(a.duration * 1000, 3),
                "outcome": a.outcome.value,
                "status": a.status,
                "error": a.error,
                "body": a.body.decode("utf-8", "replace"),
                "stderr": a.stderr.decode("utf-8", "replace"),
            }
            for a in record.attempts
        ],
    }


def dead_document(job: DeadJob, excerpt: int | None = DEAD_PAYLOAD_EXCERPT) -> dict[str, Any]:
    """A dead job for a listing: its payload cut to ``excerpt`` bytes (None: whole)."""
    return {
        "id": job.id,
        **payload_excerpt(job.payload, excerpt),
        "attributes": dict(job.attributes),
        "attempt": job.attempt,
        "died_at": job.died_at,
        "status": job.status,
        "error": job.error,
    }


def dead_filter(source: Mapping[str, Any]) -> DeadFilter:
    """A filter from query parameters or a JSON object; 400 for anything unreadable."""

    def number(name: str, kind: Callable[[str], Any]) -> Any:
        value = source.get(name)
        if value is None or value == "":
            return None
        try:
            number = kind(str(value))
        except ValueError:
            raise HTTPError(400, f"{name} must be a number, not {value!r}") from None
        # NaN compares false with every time, so `since: NaN` would select every dead job
        # (and a delete by that filter delete them all); infinities select all or nothing.
        if not math.isfinite(number):
            raise HTTPError(400, f"{name} must be a finite number, not {value!r}")
        return number

    attribute = source.get("attribute")
    pair = _attribute_pair(str(attribute)) if attribute else None
    unknown = set(source) - {"status", "error", "since", "until", "attribute", "cursor", "limit"}
    if unknown:
        raise HTTPError(400, f"unknown filter field(s): {', '.join(sorted(unknown))}")
    return DeadFilter(
        status=number("status", int),
        error=str(source["error"]) if source.get("error") else None,
        since=number("since", float),
        until=number("until", float),
        attribute=pair,
    )


def _attribute_pair(text: str) -> tuple[str, str]:
    """``name:value`` split at the first ':' no backslash escapes: an attribute's name may
    hold ':' (XADD takes any), written ``\\:`` (``\\\\`` a backslash); the value, a URL
    say, is as written, ':' and all."""
    name: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == ":":
            if not name:
                break
            return "".join(name), text[index + 1 :]
        if char == "\\" and text[index + 1 : index + 2] in (":", "\\"):
            index += 1
            char = text[index]
        name.append(char)
        index += 1
    raise HTTPError(400, "attribute must read name:value")


class AdminAPI:
    def __init__(self, app: App, telemetry: Telemetry, token: str | None) -> None:
        self.app = app
        self.telemetry = telemetry
        self.token = token
        # The main file (a reload re-reads the same one): `busgate curl … -c PATH` names it.
        self.config_path = os.path.abspath(app.config.path)

    @property
    def store(self) -> Store:
        assert self.app.store is not None
        return self.app.store

    @property
    def config(self) -> Config:
        return self.app.config

    def routes(self, router: Router) -> None:
        # The token is checked on the request's head, before any body is read.
        guard = self.authorize
        topic = "/v1/queues/{queue}/topics/{topic}"
        router.add("GET", "/v1/stats", self.stats, guard=guard)
        router.add("GET", topic, self.topic, guard=guard)
        router.add("GET", "/v1/jobs/{job_id}", self.job, guard=guard)
        router.add("GET", topic + "/dead", self.dead, guard=guard)
        router.add("POST", topic + "/dead/replay", self.replay, guard=guard)
        router.add("POST", topic + "/dead/delete", self.delete, guard=guard)
        router.add("POST", topic + "/pause", self.pause, guard=guard)
        router.add("POST", topic + "/resume", self.resume, guard=guard)
        router.add(
            "POST",
            topic + "/test-delivery",
            self.test_delivery,
            max_body=TEST_PAYLOAD_LIMIT,
            guard=guard,
        )
        router.add("GET", "/v1/config", self.effective_config, guard=guard)
        router.add("GET", "/openapi.json", self.openapi)
        router.add("GET", "/", self.dashboard)
        router.add("GET", "/ui/{name}", self.static)
        router.websocket("/v1/live", self.live)

    def authorize(self, request: Request) -> None:
        if self.token is None:
            raise HTTPError(403, "the admin API is off: set admin_token_file in busgate.yaml")
        header = request.header("authorization") or ""
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise HTTPError(
                401,
                "missing or wrong admin token (Authorization: Bearer <token>)",
                [("WWW-Authenticate", 'Bearer realm="busgate"')],
            )

    def _topic_config(self, request: Request) -> TopicConfig:
        found = self._configured(request)
        if isinstance(found, HTTPError):
            raise found
        return found

    def _configured(self, request: Request) -> TopicConfig | HTTPError:
        """The topic's configuration, or the 404 that names what is unknown."""
        queue = self.config.queue(request.params["queue"])
        if queue is None:
            return HTTPError(404, f"unknown queue '{request.params['queue']}'")
        topic = queue.topic(request.params["topic"])
        if topic is None:
            return HTTPError(
                404, f"unknown topic '{request.params['topic']}' in queue '{queue.name}'"
            )
        return topic

    async def _dead_letters_of(self, request: Request) -> tuple[str, str, bool]:
        """The queue and topic whose dead jobs a request means, and whether it is configured.

        A topic removed from conf.d (or renamed, or its whole queue removed) by a reload
        leaves its jobs in the store, and an operator must still be able to see and clean up
        its dead ones.  So a name the configuration lacks is looked up in the store, and is a
        404 only when the store has never held a job of it: its depths and counters, one
        cheap read, are all zero.
        """
        found = self._configured(request)
        if not isinstance(found, HTTPError):
            return found.queue, found.name, True
        queue, topic = request.params["queue"], request.params["topic"]
        if not (NAME_PATTERN.fullmatch(queue) and NAME_PATTERN.fullmatch(topic)):
            raise found  # no configuration could have named it: the store never held it
        try:
            stats = await self.store.stats(queue, topic)
        except StoreError as exc:
            raise HTTPError(503, f"store unavailable: {exc}") from None
        if not _ever_held(stats):
            raise found
        return queue, topic, False

    @staticmethod
    def _json_body(request: Request) -> dict[str, Any]:
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HTTPError(415, "send the request as application/json")
        document = request.json() if request.body else {}
        if not isinstance(document, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return document

    # -- reading --------------------------------------------------------------------------------

    async def stats(self, request: Request) -> Response:
        return Response(200, self.telemetry.snapshot_json())

    async def topic(self, request: Request) -> Response:
        """One topic's stats and recent failures; also of a topic a reload removed while it
        still holds jobs, which the stats list ``"configured": false``."""
        found = self._configured(request)
        key = (request.params["queue"], request.params["topic"])
        entry = next(
            (
                topic
                for queue in self.telemetry.snapshot()["queues"]
                for topic in queue["topics"]
                if (topic["queue"], topic["topic"]) == key
            ),
            None,
        )
        if isinstance(found, HTTPError) and (entry is None or "configured" not in entry):
            raise found  # unknown, or removed with nothing left (or not sampled since)
        if entry is None:
            raise HTTPError(503, "no stats sampled for this topic yet; try again in a second")
        return Response.json({**entry, "recent_failures": self.telemetry.recent_failures(*key)})

    async def job(self, request: Request) -> Response:
        job_id = request.params["job_id"]
        try:
            records = await self.store.get_job(job_id)
        except StoreError as exc:
            raise HTTPError(503, f"store unavailable: {exc}") from None
        if not records:
            raise HTTPError(404, f"no job '{job_id}' (unknown, or pruned from history)")
        return Response.json({"id": job_id, "copies": [job_document(r) for r in records]})

    async def dead(self, request: Request) -> Response:
        queue, topic, configured = await self._dead_letters_of(request)
        args = {name: values[-1] for name, values in request.query.items()}
        excerpt = _payload_excerpt(args.pop("payload", None))
        where = dead_filter(args)
        limit = self._limit(args.get("limit"))
        cursor = args.get("cursor") or None
        if cursor is not None:
            _check_cursor(cursor)
        try:
            page = await self.store.list_dead(queue, topic, where, cursor, limit)
        except StoreError as exc:
            raise HTTPError(503, f"store unavailable: {exc}") from None
        return Response.json(
            {
                "jobs": [dead_document(j, excerpt) for j in page.jobs],
                "cursor": page.cursor,
                **_unconfigured(configured),
            }
        )

    @staticmethod
    def _limit(raw: str | None) -> int:
        if raw is None or raw == "":
            return DEFAULT_PAGE
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
            raise HTTPError(400, f"limit must be between 1 and {MAX_PAGE}, not {raw!r}")
        return int(raw)

    async def effective_config(self, request: Request) -> Response:
        return Response.json({"path": self.config_path, **effective_document(self.config)})

    # -- changing -------------------------------------------------------------------------------

    def _selection(self, body: dict[str, Any]) -> tuple[list[str] | None, DeadFilter | None]:
        """``{"ids": [...]}``, ``{"filter": {...}}`` or ``{"all": true}``: exactly one."""
        given = [key for key in ("ids", "filter", "all") if key in body]
        if len(given) != 1:
            raise HTTPError(
                400, 'name the dead jobs with exactly one of "ids", "filter" or "all": true'
            )
        if "ids" in body:
            ids = body["ids"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not ids:
                raise HTTPError(400, '"ids" must be a non-empty list of job ids')
            return ids, None
        if "all" in body:
            if body["all"] is not True:
                raise HTTPError(400, '"all" must be true')
            return None, DeadFilter()
        if not isinstance(body["filter"], dict):
            raise HTTPError(400, '"filter" must be an object')
        return None, dead_filter(body["filter"])

    async def replay(self, request: Request) -> Response:
        return await self._bulk(request, "replayed")

    async def delete(self, request: Request) -> Response:
        return await self._bulk(request, "deleted")

    async def _bulk(self, request: Request, done: str) -> Response:
        """Replay or delete dead jobs named by ids, a filter, or all of them."""
        queue, name, configured = await self._dead_letters_of(request)
        if done == "replayed" and not configured:
            # The store would take them, but no dispatcher reserves for a topic that is not
            # configured: they would sit ready, undelivered, out of sight of `dead list`.
            raise HTTPError(
                409,
                f"topic {queue}/{name} is not configured: replayed jobs would wait"
                " undelivered; add it back and reload first (or, with daemons sharing a"
                " Redis store, replay through one that has it)",
            )
        body = self._json_body(request)
        allowed = {"ids", "filter", "all", "dry_run", "confirm"}
        allowed |= {"rate"} if done == "replayed" else set()
        unknown = set(body) - allowed
        if unknown:
            raise HTTPError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        ids, where = self._selection(body)
        named = ids  # as given: below, `ids` may keep only the dead ones
        rate = body.get("rate")
        # JSON's true is an int to Python, and json.loads reads NaN and Infinity.
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf
        ):
            raise HTTPError(400, '"rate" must be a positive number of jobs per second')
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise HTTPError(400, '"dry_run" must be true or false')
        confirmed = _confirmation(body.get("confirm"), ids)
        store, extra = self.store, _unconfigured(configured)
        try:
            if ids is not None and not dry_run and rate is None:
                # The store acts on the dead jobs of this topic only and skips other ids, so
                # its count is the match: listing the whole dead set to count them first made
                # a replay of N dead jobs in chunks of ids (the CLI's) read N²/100 of them.
                count = matched = await self._act(done, queue, name, list(dict.fromkeys(ids)))
            else:
                token: dict[str, str] = {}
                if ids is None:
                    # Listed once, and acted on by id: listing again to act counted the
                    # failures that arrived meanwhile, which were never matched.
                    assert where is not None
                    found = await matching_dead(store, queue, name, where, within=confirmed)
                    ids = found.ids
                    if confirmed is not None and not confirmed.matches(ids):
                        error = _changed(confirmed, len(ids), queue, name)
                        answer = {"error": error, "matched": len(ids), done: 0, **extra}
                        return Response.json(answer, 409)
                    if found.newest is not None:
                        token = {"confirm": Confirmation.of(found).token()}
                else:  # those of the ids that are dead jobs of this topic
                    dead = set(await matching_dead_ids(store, queue, name, DeadFilter()))
                    ids = [job_id for job_id in dict.fromkeys(ids) if job_id in dead]
                matched = len(ids)
                if dry_run:
                    answer = {"matched": matched, done: 0, "dry_run": True, **token, **extra}
                    return Response.json(answer)
                if matched and rate is not None and matched / rate > MAX_PACED_SECONDS:
                    raise HTTPError(
                        400,
                        f"{matched} jobs at {rate:g}/s would take {matched / rate:.0f}s; one"
                        f" call may take at most {MAX_PACED_SECONDS:.0f}s: raise the rate,"
                        " replay fewer jobs per call, or use `busgate dead replay --rate`,"
                        " which paces itself",
                    )
                count = await self._act(done, queue, name, ids, rate) if matched else 0
        except StoreError as exc:
            raise HTTPError(503, f"store unavailable: {exc}") from None
        if matched == 0:
            # With the counts: a client replaying in chunks tells a chunk whose jobs are no
            # longer dead (another operator was first) from an unknown queue or topic.  Ids
            # are said to be no dead jobs, not to miss a filter the operator never gave.
            error = (
                "no dead job matches that filter"
                if named is None
                else _none_dead(named, queue, name)
            )
            return Response.json({"error": error, "matched": 0, done: 0, **extra}, 404)
        log.info("%s queue=%s topic=%s jobs=%d", done, queue, name, count)
        # As after a pause: the `busgate stats` an operator runs next shows the change, not
        # the sample taken up to a second before it.
        await self.telemetry.sample()
        return Response.json({"matched": matched, done: count, **extra})

    async def _act(
        self, done: str, queue: str, name: str, ids: list[str], rate: float | None = None
    ) -> int:
        """Replay or delete the dead jobs among ``ids``."""
        if done == "replayed":
            return await replay_ids(self.store, queue, name, ids, rate=rate)
        return await delete_ids(self.store, queue, name, ids)

    async def pause(self, request: Request) -> Response:
        return await self._set_paused(request, True)

    async def resume(self, request: Request) -> Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: Request, paused: bool) -> Response:
        topic = self._topic_config(request)
        if request.body:
            self._json_body(request)  # a cross-site form post cannot get past this
        elif (request.header("content-type") or "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
        ):
            raise HTTPError(415, "send the request as application/json")
        try:
            dispatcher = self.app.dispatcher(topic.queue, topic.name)
        except KeyError:  # a reload is restarting it with a changed configuration
            raise HTTPError(
                409, "the topic is restarting (a reload); try again", [("Retry-After", "1")]
            ) from None
        if paused:
            dispatcher.pause()
        else:
            dispatcher.resume()
        log.info("%s queue=%s topic=%s", "paused" if paused else "resumed", topic.queue, topic.name)
        # The stats every reader gets are sampled each second: sampled now, the `busgate stats`
        # an operator runs next shows the change.
        await self.telemetry.sample()
        return Response.json({"queue": topic.queue, "topic": topic.name, "paused": paused})

    async def test_delivery(self, request: Request) -> Response:
        """Send a payload to the topic's backend now, outside the queue; nothing is stored."""
        topic = self._topic_config(request)
        body = self._json_body(request)
        if "payload" in body and "payload_base64" in body:
            raise HTTPError(400, 'give "payload" or "payload_base64", not both')
        if "payload_base64" in body:
            try:
                payload = base64.b64decode(str(body["payload_base64"]), validate=True)
            except ValueError:
                raise HTTPError(400, '"payload_base64" is not base64') from None
        elif "payload" in body:
            payload = payload_bytes(body["payload"])
        else:
            raise HTTPError(400, 'the body needs "payload" (text or JSON) or "payload_base64"')
        attributes = attributes_of(body.get("attributes", {}))
        from gateway.app import build_backend  # app imports this module

        now = self.app.clock()
        job = Job(
            id="test-" + new_job_id(now),
            queue=topic.queue,
            topic=topic.name,
            payload=payload,
            attributes=attributes,
            priority=Priority.NORMAL,
            attempt=1,
            enqueued_at=now,
            run_at=now,
            trace_id=new_trace_id(),
        )
        async with running(build_backend(topic)) as backend:
            delivery = await backend.deliver(job)
        # It reached the backend as a job would, with an id and a trace: the line that lets
        # the backend's own logs be matched to it.
        log.info(
            "test delivery job=%s queue=%s topic=%s attempt=%d status=%s duration_ms=%.1f"
            " trace=%s%s%s",
            job.id,
            job.queue,
            job.topic,
            job.attempt,
            "-" if delivery.status is None else delivery.status,
            delivery.duration * 1000,
            job.trace_id,
            "" if delivery.failure is None else f" failure={delivery.failure.value}",
            f" message={logs.quoted(delivery.message)}" if delivery.message else "",
        )
        return Response.json(
            {
                "job_id": job.id,
                "status": delivery.status,
                "duration_ms": round(delivery.duration * 1000, 3),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in delivery.headers
                ],
                "body": delivery.body.decode("utf-8", "replace"),
                "stderr": delivery.stderr.decode("utf-8", "replace"),
                "failure": None if delivery.failure is None else delivery.failure.value,
                "message": delivery.message or None,
            }
        )

    # -- documents and the dashboard ------------------------------------------------------------

    async def openapi(self, request: Request) -> Response:
        from gateway.openapi import document

        return Response.json(document())

    async def dashboard(self, request: Request) -> Response:
        return self._file("index.html")

    async def static(self, request: Request) -> Response:
        return self._file(request.params["name"])

    @staticmethod
    def _file(name: str) -> Response:
        try:
            path = (UI_DIR / name).resolve()
            found = path.parent == UI_DIR and path.is_file()
        except (ValueError, OSError):  # a NUL byte, a name too long
            found = False
        if not found:
            raise HTTPError(404, f"no such file: {name[:100]}")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        return Response(
            200,
            path.read_bytes(),
            (
                (
                    # 'self' covers the page's own ws:/wss: origin too (CSP Level 3): no
                    # other host is reachable from the page, a WebSocket included.
                    "Content-Security-Policy",
                    "default-src 'self'; connect-src 'self';"
                    " img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
                ),
                ("X-Frame-Options", "DENY"),
            ),
            content_type,
        )

    # -- live -----------------------------------------------------------------------------------

    async def live(self, stream: trio.abc.Stream, request: Request) -> None:
        async with trio.open_nursery() as nursery:
            socket = None
            with trio.move_on_after(AUTH_TIMEOUT):
                # The client sends one message, its login: a megabyte (the library's
                # default) before it has logged in would be a megabyte for anyone.
                handshake = await trio_websocket.wrap_server_stream(
                    nursery, stream, max_message_size=LIVE_MAX_MESSAGE
                )
                socket = await handshake.accept()
            if socket is None:  # the handshake never came whole
                nursery.cancel_scope.cancel()
                return
            try:
                if not await self._live_login(socket):
                    return
                nursery.start_soon(_discard_incoming, socket, nursery.cancel_scope)
                token = self.token
                subscriber = self.telemetry.subscribe()
                try:
                    async for message in subscriber.messages:
                        if self.token != token:  # rotated by a reload: log in again
                            await _close(socket, "the admin token changed")
                            return
                        # A client that stops reading is let go, as on the HTTP side.
                        with trio.move_on_after(SEND_TIMEOUT) as sending:
                            await socket.send_message(message.decode())
                        if sending.cancelled_caught:
                            return
                    await _close(socket, "too slow: events were dropped")
                finally:
                    subscriber.close()
            except trio_websocket.ConnectionClosed:
                pass
            finally:
                nursery.cancel_scope.cancel()

    async def _live_login(self, socket: trio_websocket.WebSocketConnection) -> bool:
        if self.token is None:
            await _close(socket, "the admin API is off")
            return False
        with trio.move_on_after(AUTH_TIMEOUT):
            message = await socket.get_message()
            try:
                given = json.loads(message).get("token", "")
            except (ValueError, AttributeError, RecursionError):  # deeply nested: not a login
                given = ""
            if isinstance(given, str) and hmac.compare_digest(given.encode(), self.token.encode()):
                return True
        await _close(socket, 'send {"token": "<admin token>"} first')
        return False


def _ever_held(stats: TopicStats) -> bool:
    """Whether the store has held a job of this topic (its queue's unmatched count aside)."""
    return any(
        (
            stats.ready,
            stats.delayed,
            stats.leased,
            stats.dead,
            stats.done,
            stats.pushed_total,
            stats.done_total,
            stats.retried_total,
            stats.dead_total,
            stats.expired_total,
            stats.replayed_total,
        )
    )


def _payload_excerpt(mode: str | None) -> int | None:
    """How much of each payload a dead-letter page carries, from its ``payload`` option."""
    if mode is None or mode == "" or mode == "excerpt":
        return DEAD_PAYLOAD_EXCERPT
    if mode == "full":
        return None
    raise HTTPError(400, f"payload must be excerpt (the default) or full, not {mode!r}")


def _none_dead(ids: list[str], queue: str, topic: str) -> str:
    given = len(set(ids))
    named = f"job {ids[0]} is not" if given == 1 else f"none of the {given} jobs is"
    return f"{named} a dead job of {queue}/{topic} (replayed or deleted already, or unknown)"


def _confirmation(token: Any, ids: list[str] | None) -> Confirmation | None:
    """The set a dry run matched, from its ``confirm`` token (None without one)."""
    if token is None:
        return None
    if ids is not None:
        raise HTTPError(400, '"confirm" goes with the "filter" or "all" its dry run was given')
    if not isinstance(token, str):
        raise HTTPError(400, '"confirm" must be the token a dry run answered')
    try:
        return Confirmation.parse(token)
    except ValueError as exc:
        raise HTTPError(400, f"confirm: {exc}") from None


def _changed(confirmed: Confirmation, now: int, queue: str, topic: str) -> str:
    # New failures are not in `now`: the listing starts at the newest confirmed job.
    return (
        f"the dead jobs of {queue}/{topic} matching that filter are no longer the"
        f" {confirmed.count} the dry run counted ({now} now, new failures aside: replayed or"
        " deleted meanwhile?); nothing was done: run the dry run again"
    )


def _unconfigured(configured: bool) -> dict[str, bool]:
    """What an answer adds for a topic the configuration lacks (removed by a reload):
    ``"configured": false``, as the stats mark it.  A configured topic's answers stay as they
    were."""
    return {} if configured else {"configured": False}


def _check_cursor(cursor: str) -> None:
    """400 for a cursor no listing handed out, before the store sees it."""
    try:
        died_at, _ = parse_dead_cursor(cursor)
    except ValueError as exc:
        raise HTTPError(400, f"cursor: {exc}") from None
    if not math.isfinite(died_at):  # NaN: Redis refuses it, SQLite matches nothing
        raise HTTPError(400, f"cursor: invalid cursor {cursor!r}")


async def _discard_incoming(
    socket: trio_websocket.WebSocketConnection, session: trio.CancelScope
) -> None:
    """Read (and drop) what a logged-in client sends; end its session when it closes.

    The feed only sends, but unread messages would fill trio-websocket's queue (one message)
    and stop its reader: the client's close frame would then go unanswered, and the feed on
    until a send failed.
    """
    try:
        while True:
            await socket.get_message()
    except trio_websocket.ConnectionClosed:
        session.cancel()


async def _close(socket: trio_websocket.WebSocketConnection, reason: str) -> None:
    """Close with code 1008, waiting CLOSE_TIMEOUT at most for the client's close frame (a
    client that never answers would otherwise hold its connection for ever); the server
    then drops the connection."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        await socket.aclose(code=1008, reason=reason)
