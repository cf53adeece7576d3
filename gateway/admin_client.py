"""A small synchronous client for the admin API and the producer HTTP API.

Standard library only (``http.client``): the operator CLI runs one request at a time and
needs no event loop.  Where to connect and which token to send come from the same
``busgate.yaml`` the daemon reads (``listen.http``, ``admin_token_file``), or from
``--url``, ``--token-file`` and ``$BUSGATE_ADMIN_TOKEN``.

Every failure is a `ClientError` whose text is what the operator should read:
`SetupError` (nothing to connect to, no token: a usage or configuration problem),
`ConnectError` (nothing answers) and `APIError` (the server said no, with its status and its
``{"error": …}`` message).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from gateway.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    Listen,
    QueueConfig,
    drop_in_files,
    load_main,
    load_queue,
    queue_name,
)

TOKEN_ENV = "BUSGATE_ADMIN_TOKEN"
PASSWORD_ENV = "BUSGATE_QUEUE_PASSWORD"
DEFAULT_TIMEOUT = 30.0
#: Calls that work through every matching dead job on the server (a filter's count, a
#: delete by filter) take as long as the dead list is long.
BULK_TIMEOUT = 600.0
#: The largest page the server hands out (``gateway.admin.MAX_PAGE``).
MAX_PAGE = 500
# Path parameters reach the daemon undecoded, so only characters valid in a path segment
# may appear; queue, topic and job-id names are made of these and pass unchanged.
_PATH_SAFE = "-._~:@+=!$&'()*,;"


class ClientError(Exception):
    """Something the operator must read; ``str()`` says what, without a traceback."""


class SetupError(ClientError):
    """The CLI cannot tell where the daemon is or which token to send."""


class ConnectError(ClientError):
    """Nothing answered at the URL (refused, unreachable, timed out, not HTTP)."""


class APIError(ClientError):
    """The server answered with an error: its status and its ``{"error": …}`` message."""

    def __init__(
        self, status: int, message: str, document: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        #: The server's JSON answer, when it sent one (a replay's 404 carries its counts).
        self.document: Mapping[str, Any] = document or {}


class Unauthorized(APIError):
    """401: the admin token (or a queue's password) is wrong or missing."""


class BadRequest(APIError):
    """400 or 415: the request itself was wrong (a filter, a limit, an option)."""


class NotFound(APIError):
    """404: no such queue, topic, job, or no dead job matching a filter."""


# -- where and who ------------------------------------------------------------------------------


def url_of_listen(listen: Listen, config_path: str) -> str:
    """The URL to reach a ``listen.http`` address from this host."""
    if listen.port == 0:
        raise SetupError(
            f"{config_path}: listen.http is port 0 (any free port), so the CLI cannot know"
            " where the daemon listens; give --url http://host:port"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{listen.port}"


def normalize_url(text: str) -> str:
    """``--url``: ``http(s)://host:port[/prefix]``, or ``host:port`` meaning ``http://``."""
    url = text.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SetupError(f"--url {text!r}: expected http://host:port or https://host:port")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise SetupError(f"--url {text!r}: the port is not a number in 0..65535") from None
    return url


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except OSError as exc:
        raise SetupError(
            f"cannot read the admin token file {path}: {exc.strerror or exc}"
            f" (run as a user who may read it, or set {TOKEN_ENV})"
        ) from None
    except UnicodeDecodeError:
        raise SetupError(f"the admin token file {path} is not UTF-8 text") from None
    if not token:
        raise SetupError(f"the admin token file {path} is empty")
    return token


@dataclass
class Settings:
    """What the command line says, completed from the configuration file only when needed.

    ``--url`` beats the config's ``listen.http``; ``--token-file`` beats ``$BUSGATE_ADMIN_TOKEN``
    beats the config's ``admin_token_file``.  The main file is read (and validated whole) the
    first time something is missing; the drop-ins only when a queue's settings are asked for
    (``queue_config``), so an operator needs no queue secrets to run ``busgate stats``.
    `gateway.config.ConfigError` escapes.
    """

    config_path: str | None  # None: not given, DEFAULT_CONFIG is tried when needed
    url: str | None = None
    token_file: str | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    timeout: float = DEFAULT_TIMEOUT
    _config: Config | None = field(default=None, init=False, repr=False)

    @property
    def config(self) -> Config:
        """The main file's settings (its ``queues`` empty)."""
        if self._config is None:
            self._config = load_main(self.config_path or DEFAULT_CONFIG, self.environ)
        return self._config

    def queue_config(self, name: str) -> QueueConfig | None:
        """A queue's settings, from its own drop-in (read on each call: it is a rare one).

        Only that file must be complete: another queue's ``${SECRET}`` need not be in the
        operator's environment.  A drop-in whose queue name cannot be read at all (invalid
        YAML, no ``queue``) may be this queue's: its error is raised if no other file is.
        """
        unreadable: ConfigError | None = None
        for path in drop_in_files(self.config):
            if os.path.isdir(path):
                continue  # the daemon refuses such an include; not this command's to say
            try:
                found = queue_name(path, self.environ)
            except ConfigError as exc:
                unreadable = unreadable or exc
                continue
            if found == name:
                return load_queue(path, self.environ)
        if unreadable is not None:
            raise unreadable
        return None

    @property
    def config_given(self) -> bool:
        return self.config_path is not None

    def base_url(self) -> str:
        if self.url is not None:
            return normalize_url(self.url)
        return url_of_listen(self.config.listen_http, self.config.path)

    def admin_token(self) -> tuple[str, str]:
        """The token and where it came from (said when the server refuses it)."""
        if self.token_file is not None:
            return read_token_file(self.token_file), self.token_file
        if token := self.environ.get(TOKEN_ENV, "").strip():
            return token, f"${TOKEN_ENV}"
        path = self.config.admin_token_file
        if path is None:
            raise SetupError(
                f"no admin token: {self.config.path} sets no admin_token_file (the admin API"
                f" is off there); give --token-file or set {TOKEN_ENV}"
            )
        return read_token_file(path), path

    def admin_client(self) -> AdminClient:
        token, source = self.admin_token()
        return AdminClient(self.base_url(), token, token_source=source, timeout=self.timeout)

    def producer_client(self) -> AdminClient:
        return AdminClient(self.base_url(), None, timeout=self.timeout)


# -- the client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which dead jobs a replay or delete means: ids, a filter, or all of them."""

    ids: tuple[str, ...] = ()
    filter: Mapping[str, Any] | None = None
    all: bool = False

    def __post_init__(self) -> None:
        if sum((bool(self.ids), self.filter is not None, self.all)) != 1:
            raise ValueError("a selection is exactly one of ids, a filter, or all")

    def body(self) -> dict[str, Any]:
        if self.ids:
            return {"ids": list(self.ids)}
        if self.filter is not None:
            return {"filter": dict(self.filter)}
        return {"all": True}


def _segment(name: str) -> str:
    return quote(name, safe=_PATH_SAFE)


def _topic_path(queue: str, topic: str) -> str:
    return f"/v1/queues/{_segment(queue)}/topics/{_segment(topic)}"


class AdminClient:
    """One HTTP request per call, on a fresh connection; answers are the server's JSON."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        token_source: str = "",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.token_source = token_source
        self.timeout = timeout
        parts = urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._prefix = parts.path

    # -- reading --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "/v1/stats")

    def job(self, job_id: str) -> dict[str, Any]:
        return self._admin("GET", f"/v1/jobs/{_segment(job_id)}")

    def dead_page(
        self,
        queue: str,
        topic: str,
        where: Mapping[str, Any],
        *,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        query = {name: str(value) for name, value in where.items()}
        if cursor:
            query["cursor"] = cursor
        if limit is not None:
            query["limit"] = str(limit)
        return self._admin("GET", _topic_path(queue, topic) + "/dead", query=query)

    def dead_pages(
        self,
        queue: str,
        topic: str,
        where: Mapping[str, Any],
        *,
        cursor: str | None = None,
        limit: int = MAX_PAGE,
    ) -> Iterator[dict[str, Any]]:
        """Every page from ``cursor`` on, following the server's cursors to the end."""
        while True:
            page = self.dead_page(queue, topic, where, cursor=cursor, limit=limit)
            yield page
            cursor = page.get("cursor")
            if not cursor:
                return

    # -- changing -------------------------------------------------------------------------------

    def replay(
        self,
        queue: str,
        topic: str,
        selection: Selection,
        *,
        dry_run: bool = False,
        rate: float | None = None,
        confirm: str | None = None,
    ) -> dict[str, Any]:
        body = selection.body()
        if dry_run:
            body["dry_run"] = True
        if confirm is not None:
            body["confirm"] = confirm
        if rate is not None:
            body["rate"] = rate
        return self._admin(
            "POST",
            _topic_path(queue, topic) + "/dead/replay",
            body=body,
            timeout=self._bulk(selection, rate is not None),
        )

    def delete(
        self,
        queue: str,
        topic: str,
        selection: Selection,
        *,
        dry_run: bool = False,
        confirm: str | None = None,
    ) -> dict[str, Any]:
        """With ``confirm`` (the token a dry run of a filter answered): the jobs it counted,
        or none (409) when they changed since."""
        body = selection.body()
        if dry_run:
            body["dry_run"] = True
        if confirm is not None:
            body["confirm"] = confirm
        return self._admin(
            "POST",
            _topic_path(queue, topic) + "/dead/delete",
            body=body,
            timeout=self._bulk(selection, False),
        )

    def pause(self, queue: str, topic: str) -> dict[str, Any]:
        return self._admin("POST", _topic_path(queue, topic) + "/pause", body={})

    def resume(self, queue: str, topic: str) -> dict[str, Any]:
        return self._admin("POST", _topic_path(queue, topic) + "/resume", body={})

    def push(
        self,
        queue: str,
        topic: str | None,
        payload: bytes | str,
        *,
        password: str | None,
        job_id: str | None = None,
        delay_ms: int | None = None,
        priority: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Push one job through the producer API.

        Bytes go as the raw body (``application/octet-stream``) with the options in the query
        string, attributes as ``attr.NAME=value``; a string goes in a JSON body, sent as its
        UTF-8 bytes.
        """
        path = f"/v1/queues/{_segment(queue)}"
        if topic is not None:
            path += f"/{_segment(topic)}"
        path += "/jobs"
        options: dict[str, Any] = {}
        if job_id is not None:
            options["id"] = job_id
        if delay_ms is not None:
            options["delay_ms"] = delay_ms
        if priority is not None:
            options["priority"] = priority
        headers = {}
        if password is not None:
            pair = f"{queue}:{password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        if isinstance(payload, bytes):
            query = {name: str(value) for name, value in options.items()}
            query.update({f"attr.{name}": value for name, value in (attributes or {}).items()})
            return self._call(
                "POST",
                path,
                query=query,
                data=payload,
                content_type="application/octet-stream",
                headers=headers,
                what="queue password",
            )
        document = {"payload": payload, **options}
        if attributes:
            document["attributes"] = dict(attributes)
        return self._call(
            "POST",
            path,
            data=json.dumps(document).encode(),
            content_type="application/json",
            headers=headers,
            what="queue password",
        )

    # -- the wire -------------------------------------------------------------------------------

    def _bulk(self, selection: Selection, paced: bool) -> float:
        return self.timeout if selection.ids and not paced else max(self.timeout, BULK_TIMEOUT)

    def _admin(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        headers = {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return self._call(
            method,
            path,
            query=query,
            data=None if body is None else json.dumps(body).encode(),
            content_type=None if body is None else "application/json",
            headers=headers,
            what="admin token",
            timeout=timeout,
        )

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        what: str,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        target = self._prefix + path + (f"?{urlencode(query)}" if query else "")
        sent = {"Accept": "application/json", **(headers or {})}
        if content_type is not None:
            sent["Content-Type"] = content_type
        limit = self.timeout if timeout is None else timeout
        connection: http.client.HTTPConnection = (
            http.client.HTTPSConnection(self._host, self._port, timeout=limit)
            if self._https
            else http.client.HTTPConnection(self._host, self._port, timeout=limit)
        )
        try:
            connection.request(method, target, body=data, headers=sent)
            response = connection.getresponse()
            raw = response.read()
        except ConnectionRefusedError:
            raise ConnectError(f"is busgate running? nothing listens on {self.base_url}") from None
        except TimeoutError:
            raise ConnectError(f"no answer from {self.base_url} within {limit:g}s") from None
        except OSError as exc:
            raise ConnectError(f"cannot reach {self.base_url}: {exc.strerror or exc}") from None
        except http.client.HTTPException as exc:
            raise ConnectError(f"{self.base_url} does not answer like busgate: {exc!r}") from None
        finally:
            connection.close()
        return self._answer(response.status, response.getheader("content-type") or "", raw, what)

    def _answer(self, status: int, content_type: str, raw: bytes, what: str) -> dict[str, Any]:
        document: Any = None
        if content_type.split(";")[0].strip().lower() == "application/json":
            try:
                document = json.loads(raw)
            except ValueError:
                document = None
        if 200 <= status < 300:
            if not isinstance(document, dict):
                raise APIError(
                    status,
                    f"{self.base_url} answered {status} without a JSON object: is it busgate?",
                )
            return document
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            message = document["error"]
        else:
            text = raw[:200].decode("utf-8", "replace").strip()
            message = f"{self.base_url} answered {status}" + (f": {text}" if text else "")
        answer = document if isinstance(document, dict) else None
        if status == 401:
            if what == "admin token":
                source = f" (from {self.token_source})" if self.token_source else ""
                raise Unauthorized(status, f"wrong or missing admin token{source}", answer)
            message += f" (give --password or set {PASSWORD_ENV})"
            raise Unauthorized(status, message, answer)
        if status in (400, 415):
            raise BadRequest(status, message, answer)
        if status == 404:
            raise NotFound(status, message, answer)
        raise APIError(status, message, answer)


def chunked(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
