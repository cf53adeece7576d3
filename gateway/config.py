"""Configuration: the main file plus one YAML drop-in per queue, validated into frozen records.

Every error names the file, the line and the dotted key::

    conf.d/orders.yaml:12: topics.email.timeout: '30 seconds' is not a duration; write …

To know lines, the YAML is composed into nodes (safe tags only) and walked here instead of
being loaded into dicts and lists.  Scalars are kept as the text that was written and read by
the key that wants them: ``0123`` stays ``"0123"`` as a password, and ``1:30`` is not a
duration, although YAML 1.1 would read them as numbers.

``${VAR}`` and ``${VAR:-default}`` in values come from the environment (as in a shell, the
default also replaces an empty value); ``$$`` is a literal ``$``.  ``<<`` merge keys work.

The records validate themselves when built (`InvalidField` names the attribute); the loader
maps a record's complaint back to the YAML node that supplied the value, so a rule is written
once and still reported with its file and line.
"""

from __future__ import annotations

import difflib
import glob
import math
import os
import posixpath
import re
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit

import yaml

from adapters.storage.fanout import FieldCondition, Filter, JSONScalar
from adapters.storage.redis_client import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REPLICA_TIMEOUT,
    tls_context,
)
from fastcgi.address import parse_address
from gateway.units import (
    Rate,
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

#: Where ``busgate run`` and the operator commands look for the main file by default.
DEFAULT_CONFIG = "/etc/busgate/busgate.yaml"
DEFAULT_STORE = "sqlite:///var/lib/busgate/busgate.db"
DEFAULT_LISTEN_RESP = "127.0.0.1:12018"
DEFAULT_LISTEN_HTTP = "127.0.0.1:12019"
DEFAULT_INCLUDE = "conf.d/*.yaml"
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_MAX_PAYLOAD = 1024 * 1024
MAX_PAYLOAD_LIMIT = 512 * 1024 * 1024  # Redis's own bulk-string ceiling
REDACTED = "********"
#: ``content_type: form`` sends the payload urlencoded as ``payload=…`` (PHP's ``$_POST``).
FORM = "form"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
FASTCGI_ONLY = "only applies to FastCGI backends (fastcgi://, fastcgi+unix://)"
HTTPS_ONLY = "only applies to https:// backends"

KindName = Literal["fastcgi", "http"]
StoreKind = Literal["sqlite", "redis", "redis-cluster"]
_T = TypeVar("_T")


class ConfigError(Exception):
    """A configuration file is wrong: where (file, line, dotted key) and what."""

    def __init__(self, path: str, line: int | None, key: str | None, message: str) -> None:
        super().__init__(path, line, key, message)
        self.path = path
        self.line = line
        self.key = key
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return ": ".join(part for part in (where, self.key, self.message) if part)


class InvalidField(ValueError):
    """A record was built with a value its rules refuse; ``field`` names the attribute."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


# -- rules shared by the records ---------------------------------------------------------------

_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|\"[^\"\x00-\x1f\x7f]*\"))*"
)
_VISIBLE = re.compile(r"[^\x00-\x20\x7f]+")  # no spaces or control characters (header safe)


def _check_name(value: object, field: str, what: str) -> None:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidField(
            field,
            f"{value!r} is not a valid {what} name: 1 to 100 letters, digits, '_', '.', ':'"
            " or '-' ('/' separates queue/topic, braces are Redis hash tags)",
        )


def _check_integer(value: object, field: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(field, f"must be an integer, not {value!r}")
    if not low <= value <= high:
        raise InvalidField(field, f"must be between {low} and {high}, not {value}")


def _check_seconds(value: object, field: str, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidField(field, f"must be a duration in seconds, not {value!r}")
    if value < 0 or (positive and value == 0):
        raise InvalidField(field, "must be longer than 0s" if positive else "must not be negative")


def _check_boolean(value: object, field: str) -> None:
    if not isinstance(value, bool):
        raise InvalidField(field, f"must be true or false, not {value!r}")


def _check_absolute(value: object, field: str) -> None:
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidField(field, f"{value!r} must be an absolute path")
    if "\x00" in value:
        raise InvalidField(field, f"{value!r} must not hold a NUL byte (\\0)")


def _check_visible(value: object, field: str, *, absolute: bool = False) -> None:
    if not isinstance(value, str) or not _VISIBLE.fullmatch(value):
        raise InvalidField(field, f"{value!r} must be non-empty, without spaces or control codes")
    if absolute and not value.startswith("/"):
        raise InvalidField(field, f"{value!r} must start with /")


def _check_status(value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise InvalidField(field, f"{value!r} is not an HTTP status (100..599)")


def _check_dead_status(value: object) -> None:
    _check_status(value, "dead_on")
    if isinstance(value, int) and 200 <= value < 300:
        # The policy completes a job on any 2xx before it looks at dead_on: listed, it
        # would read as a rule busgate never applies.
        raise InvalidField(
            "dead_on", f"{value} is a success: a 2xx answer always completes the job"
        )


def backend_kind(url: str) -> KindName:
    """``fastcgi`` or ``http`` for a backend URL; ``ValueError`` says what is wrong with it."""
    # Refused for its form, a URL may still carry a password (user:password@): not shown.
    shown = _redact_userinfo(url) if isinstance(url, str) else url
    if not isinstance(url, str) or not _VISIBLE.fullmatch(url):
        raise ValueError(f"{shown!r}: a backend URL has no spaces or control characters")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("fastcgi", "fastcgi+unix", "http", "https") and "@" in urlsplit(url).netloc:
        # Refused before anything else can repeat the URL, password and all, in a message.
        raise ValueError(
            "a backend URL cannot carry credentials (user:password@); they would not be sent"
        )
    if scheme in ("fastcgi", "fastcgi+unix"):
        parse_address(url)
        return "fastcgi"
    if scheme in ("http", "https"):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        if port == 0:  # urlsplit takes it; the adapter would have gone to the default port
            raise ValueError(f"{url!r}: port 0 is no port to connect to")
        if not parts.hostname:
            raise ValueError(f"{url!r}: expected {scheme}://host[:port]/path")
        if not url.isascii():
            raise ValueError(
                f"{url!r}: an HTTP URL is ASCII: percent-encode the path (é is %C3%A9), and"
                " write a host name in its xn-- form"
            )
        return "http"
    raise ValueError(
        f"{shown!r}: expected fastcgi://host:port, fastcgi+unix:///path/to.sock,"
        " http://host[:port]/path or https://host[:port]/path"
    )


# -- the records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts per job, and the exponential backoff between them (capped)."""

    max_attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 600.0

    def __post_init__(self) -> None:
        _check_integer(self.max_attempts, "max_attempts", 1, 10_000)
        _check_seconds(self.backoff, "backoff")
        _check_seconds(self.max_backoff, "max_backoff")
        if self.max_backoff < self.backoff:
            raise InvalidField(
                "max_backoff",
                f"max_backoff ({format_duration(self.max_backoff)}) is shorter than backoff"
                f" ({format_duration(self.backoff)})",
            )


#: A topic with no ``lease`` holds a reserved job for its timeout, at most this long, plus
#: LEASE_MARGIN; deliveries longer than that extend the lease while they run.
MAX_DEFAULT_LEASE = 60.0
LEASE_MARGIN = 15.0


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """One subscription of a queue: where its jobs go and how they are delivered."""

    queue: str
    name: str
    backend: str  # the URL as written (after ${VAR} substitution)
    kind: KindName  # from the backend's scheme
    script: str | None = None  # FastCGI: SCRIPT_FILENAME (required); absent for HTTP
    uri: str = "/"  # FastCGI: REQUEST_URI, so a front controller routes the job
    document_root: str | None = None  # FastCGI: default the script's directory
    content_type: str = "application/json"  # any media type, or "form"
    concurrency: int = 4  # also the cap on open connections to the backend
    timeout: float = 30.0
    #: One connection attempt (TCP, and TLS for https), within what is left of ``timeout``:
    #: a connect not made by then is a connect failure, spending no attempt.
    connect_timeout: float = 5.0
    lease: float | None = None  # how long a reserved job is held; None: see effective_lease
    rate_limit: Rate | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dead_on: frozenset[int] = frozenset({400, 404, 410, 422})
    filter: Filter = field(default_factory=Filter)
    status_path: str | None = None  # FastCGI: php-fpm's pm.status_path, for health
    dead_max_count: int = 10_000
    dead_max_age: float = 7 * 86400.0
    completed_max_count: int = 1000
    completed_max_age: float = 3600.0
    circuit_failures: int = 5  # consecutive backend failures that open the circuit
    circuit_cooldown: float = 10.0  # seconds open before one probe delivery is let through
    paused: bool = False
    host: str = "localhost"  # FastCGI: HTTP_HOST / SERVER_NAME the application sees
    #: FastCGI: reuse a connection for the next job.  False opens one per job, for scripts
    #: that answer early (fastcgi_finish_request()) and go on working: the child keeps
    #: the connection, so the next job sent on it would wait for that work.
    keep_alive: bool = True
    verify_tls: bool = True  # https: check the server's certificate
    ca_file: str | None = None  # https: trust these CAs instead of the system's

    @property
    def effective_lease(self) -> float:
        """How long a reserved job is held: ``lease``, or by default ``min(timeout, 60s) + 15s``."""
        if self.lease is not None:
            return self.lease
        return min(self.timeout, MAX_DEFAULT_LEASE) + LEASE_MARGIN

    def __post_init__(self) -> None:
        _check_name(self.queue, "queue", "queue")
        _check_name(self.name, "name", "topic")
        try:
            kind = backend_kind(self.backend)
        except ValueError as exc:
            raise InvalidField("backend", str(exc)) from None
        if self.kind != kind:
            raise InvalidField("kind", f"is {self.kind!r}, but {self.backend!r} is {kind}")
        if kind == "fastcgi":
            if self.script is None:
                raise InvalidField(
                    "script", "is required for a FastCGI backend (it is the SCRIPT_FILENAME)"
                )
            _check_absolute(self.script, "script")
            if self.document_root is None:
                object.__setattr__(self, "document_root", posixpath.dirname(self.script))
            _check_absolute(self.document_root, "document_root")
            _check_visible(self.uri, "uri", absolute=True)
            _check_visible(self.host, "host")
            if self.status_path is not None:
                _check_visible(self.status_path, "status_path", absolute=True)
        else:
            fastcgi_only = {
                "script": self.script is not None,
                "uri": self.uri != "/",
                "document_root": self.document_root is not None,
                "status_path": self.status_path is not None,
                "host": self.host != "localhost",
                "keep_alive": not self.keep_alive,
            }
            for name, set_ in fastcgi_only.items():
                if set_:
                    raise InvalidField(name, FASTCGI_ONLY)
        _check_boolean(self.keep_alive, "keep_alive")
        _check_boolean(self.verify_tls, "verify_tls")
        if self.ca_file is not None:
            _check_absolute(self.ca_file, "ca_file")
        if not self.backend.lower().startswith("https:"):
            if not self.verify_tls:
                raise InvalidField("verify_tls", HTTPS_ONLY)
            if self.ca_file is not None:
                raise InvalidField("ca_file", HTTPS_ONLY)
        if self.content_type != FORM and not (
            isinstance(self.content_type, str) and _MEDIA_TYPE.fullmatch(self.content_type)
        ):
            raise InvalidField(
                "content_type",
                f"{self.content_type!r} is not a media type (like application/json) or 'form'",
            )
        _check_integer(self.concurrency, "concurrency", 1, 1024)
        _check_seconds(self.timeout, "timeout", positive=True)
        _check_seconds(self.connect_timeout, "connect_timeout", positive=True)
        if self.lease is not None:
            _check_seconds(self.lease, "lease")
            if self.lease < 1:
                raise InvalidField("lease", "must be at least 1s")
        if self.rate_limit is not None and not isinstance(self.rate_limit, Rate):
            raise InvalidField("rate_limit", f"must be a Rate, not {self.rate_limit!r}")
        if not isinstance(self.retry, RetryPolicy):
            raise InvalidField("retry", f"must be a RetryPolicy, not {self.retry!r}")
        if not isinstance(self.dead_on, frozenset):
            raise InvalidField("dead_on", f"must be a frozenset, not {self.dead_on!r}")
        for status in sorted(self.dead_on):
            _check_dead_status(status)
        if not isinstance(self.filter, Filter):
            raise InvalidField("filter", f"must be a Filter, not {self.filter!r}")
        _check_integer(self.dead_max_count, "dead_max_count", 0, 1_000_000_000)
        _check_seconds(self.dead_max_age, "dead_max_age")
        _check_integer(self.completed_max_count, "completed_max_count", 0, 1_000_000_000)
        _check_seconds(self.completed_max_age, "completed_max_age")
        _check_integer(self.circuit_failures, "circuit_failures", 1, 10_000)
        _check_seconds(self.circuit_cooldown, "circuit_cooldown", positive=True)
        _check_boolean(self.paused, "paused")


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """A queue: what producers push to, its password, and its topics (fan-out)."""

    name: str
    password: str | None
    max_payload: int
    topics: tuple[TopicConfig, ...]
    source: str  # the file it came from

    def __post_init__(self) -> None:
        _check_name(self.name, "name", "queue")
        if self.password is not None and (not isinstance(self.password, str) or not self.password):
            raise InvalidField(
                "password", "is empty; leave the key out for a queue without a password"
            )
        if isinstance(self.max_payload, bool) or not isinstance(self.max_payload, int):
            raise InvalidField("max_payload", f"must be a size in bytes, not {self.max_payload!r}")
        if not 0 < self.max_payload <= MAX_PAYLOAD_LIMIT:
            raise InvalidField(
                "max_payload",
                f"must be between 1B and {format_size(MAX_PAYLOAD_LIMIT)},"
                f" not {format_size(max(self.max_payload, 0))}",
            )
        if not isinstance(self.topics, tuple) or not self.topics:
            raise InvalidField("topics", "a queue needs at least one topic")
        seen: set[str] = set()
        for topic in self.topics:
            if not isinstance(topic, TopicConfig) or topic.queue != self.name:
                raise InvalidField("topics", f"{topic!r} is not a topic of queue {self.name!r}")
            if topic.name in seen:
                raise InvalidField("topics", f"topic {topic.name!r} is defined twice")
            seen.add(topic.name)

    def topic(self, name: str) -> TopicConfig | None:
        return next((t for t in self.topics if t.name == name), None)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where jobs live: an SQLite file, one Redis server, or a Redis Cluster."""

    url: str  # as written; may hold the password, print `redacted_url` instead
    kind: StoreKind
    path: str | None = None  # sqlite: absolute file path
    nodes: tuple[tuple[str, int], ...] = ()  # redis: (host, port), one unless a cluster
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False
    # redis: one call's deadline (connecting included), and one connection attempt's
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # redis: how many replicas must confirm a push (WAIT), and how long it waits for them
    replicas: int = 0
    replica_timeout: float = DEFAULT_REPLICA_TIMEOUT
    # rediss: trust this CA file's CAs instead of the system's; show this client certificate
    # (its key in key_file, or in cert_file too) to a Redis with tls-auth-clients
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        files = {name: getattr(self, name) for name in _STORE_FILE_OPTIONS}
        given = {name: path for name, path in files.items() if path is not None}
        for name, path in given.items():
            _check_absolute(path, name)
        if self.kind == "sqlite":
            _check_absolute(self.path, "path")
            timeouts = (self.command_timeout, self.connect_timeout)
            if (
                self.nodes
                or self.username
                or self.password
                or self.db
                or self.tls
                or timeouts != (DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT)
            ):
                raise InvalidField(
                    "kind", "an SQLite store has no hosts, credentials, db or timeouts"
                )
            if self.replicas or self.replica_timeout != DEFAULT_REPLICA_TIMEOUT:
                raise InvalidField("replicas", "an SQLite store has no replicas")
            if given:
                raise InvalidField(next(iter(given)), "an SQLite store has no TLS")
            return
        if self.kind not in ("redis", "redis-cluster"):
            raise InvalidField("kind", f"{self.kind!r} is not sqlite, redis or redis-cluster")
        if self.path is not None:
            raise InvalidField("path", "only an SQLite store has a file")
        if not self.nodes:
            raise InvalidField("nodes", "a Redis store needs host:port")
        for host, port in self.nodes:
            if not host or not isinstance(port, int) or not 0 < port < 65536:
                raise InvalidField("nodes", f"{host}:{port} is not a host and port")
        if self.kind == "redis" and len(self.nodes) != 1:
            raise InvalidField("nodes", "several hosts need redis+cluster://")
        _check_integer(self.db, "db", 0, 1_000_000)
        if self.kind == "redis-cluster" and self.db != 0:
            raise InvalidField("db", "a Redis Cluster has only database 0")
        _check_seconds(self.command_timeout, "command_timeout", positive=True)
        _check_seconds(self.connect_timeout, "connect_timeout", positive=True)
        _check_integer(self.replicas, "replicas", 0, MAX_REPLICAS)
        _check_seconds(self.replica_timeout, "replica_timeout", positive=True)
        if given and not self.tls:
            raise InvalidField(
                next(iter(given)), "is for TLS (rediss://); a redis:// connection is plain"
            )
        if self.key_file is not None and self.cert_file is None:
            raise InvalidField("key_file", "needs cert_file, the certificate the key is for")
        if self.replicas and self.replica_timeout >= self.command_timeout:
            # The WAIT is part of the push's call: past the call's timeout its connection is
            # given up, and the push answered uncertain anyway, without saying why.
            raise InvalidField(
                "replica_timeout",
                f"must be shorter than timeout ({format_duration(self.command_timeout)}),"
                " which bounds the whole push, its WAIT for replicas included",
            )

    @property
    def redacted_url(self) -> str:
        """The URL with its password replaced by ``********``; an SQLite URL as it is (a path
        holds no password, and `team@prod/` in one is no user)."""
        return self.url if self.kind == "sqlite" else _redact_url(self.url)


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int  # 0: any free port (tests)

    def __post_init__(self) -> None:
        _check_visible(self.host, "host")
        _check_integer(self.port, "port", 0, 65535)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProducerLimits:
    max_connections: int = 10_000
    max_pipeline: int = 10_000
    idle_timeout: float = 300.0

    def __post_init__(self) -> None:
        _check_integer(self.max_connections, "max_connections", 1, 1_000_000)
        _check_integer(self.max_pipeline, "max_pipeline", 1, 1_000_000)
        _check_seconds(self.idle_timeout, "idle_timeout", positive=True)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration.  Equal configurations compare equal (reload diffs on it)."""

    path: str
    store: StoreConfig
    listen_resp: Listen
    listen_http: Listen
    admin_token_file: str | None
    include: str
    shutdown_timeout: float
    producer: ProducerLimits
    queues: Mapping[str, QueueConfig]  # read-only, in load order

    def __post_init__(self) -> None:
        _check_seconds(self.shutdown_timeout, "shutdown_timeout")
        if self.admin_token_file is not None:
            _check_absolute(self.admin_token_file, "admin_token_file")
        resp, http = self.listen_resp, self.listen_http
        if (resp.host, resp.port) == (http.host, http.port) and resp.port != 0:
            raise InvalidField("listen_http", f"listen.resp and listen.http are both {http}")
        queues = MappingProxyType(dict(self.queues))
        for name, queue in queues.items():
            if queue.name != name:
                raise InvalidField("queues", f"queue {queue.name!r} is filed under {name!r}")
        object.__setattr__(self, "queues", queues)

    def queue(self, name: str) -> QueueConfig | None:
        return self.queues.get(name)


# -- YAML with lines ---------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_NULL_TAG = _TAG + "null"
_MAP_TAG = _TAG + "map"
_SEQ_TAG = _TAG + "seq"
_MERGE_TAG = _TAG + "merge"
#: Aliases can make a small file expand exponentially ("billion laughs"); no config is this big.
_MAX_VALUES = 100_000
_REFERENCE = re.compile(r"\$\$|\$\{([^}]*)(\})?")
_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_INTEGER = re.compile(r"[-+]?[0-9]+(?:_[0-9]+)*")
#: No setting needs a longer integer; int() refuses 4,300 digits with its own message.
_MAX_DIGITS = 18
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off"})


@dataclass(slots=True)
class _Node:
    """A YAML value with the line of its key (of itself in a list) and its dotted key."""

    line: int
    key: str
    kind: Literal["null", "scalar", "mapping", "sequence"]
    text: str = ""  # scalars, after ${VAR} substitution
    plain: bool = False  # unquoted and not from the environment: YAML would type it
    entries: dict[str, _Node] = field(default_factory=dict)
    items: list[_Node] = field(default_factory=list)

    def describe(self) -> str:
        if self.kind == "scalar":
            return repr(self.text)
        return {"null": "empty", "mapping": "a mapping", "sequence": "a list"}[self.kind]


def _abridged(text: str, length: int = 40) -> str:
    """``text``, cut to ``length`` characters and an ellipsis if longer (a number of 5,000
    digits in an error message)."""
    return text if len(text) <= length else f"{text[:length]}…"


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


class _Reader:
    """One file: YAML composed into `_Node`s, and typed reads that fail with file and line."""

    def __init__(self, path: str, environ: Mapping[str, str]) -> None:
        self.path = path
        self.environ = environ
        self._values = 0
        self._open: set[int] = set()  # collection nodes being converted (alias cycles)

    def error(self, node: _Node, message: str) -> ConfigError:
        return ConfigError(self.path, node.line, node.key or None, message)

    def read(self) -> _Node:
        try:
            with open(self.path, encoding="utf-8-sig") as file:
                text = file.read()
        except UnicodeDecodeError as exc:
            line = exc.object[: exc.start].count(b"\n") + 1
            raise ConfigError(self.path, line, None, "is not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(
                self.path, None, None, f"cannot read: {exc.strerror or exc}"
            ) from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            message = f"invalid YAML: {exc.problem or exc.context}"
            if exc.context and exc.problem and exc.context_mark is not None:
                message += f" ({exc.context} on line {exc.context_mark.line + 1})"
            at = None if mark is None else mark.line + 1
            raise ConfigError(self.path, at, None, message) from None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            raise ConfigError(self.path, line, None, f"invalid YAML: {exc.reason}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(self.path, None, None, f"invalid YAML: {exc}") from None
        except RecursionError:
            raise ConfigError(self.path, None, None, "invalid YAML: nested too deeply") from None
        if root is None:  # an empty file (or only comments)
            return _Node(1, "", "mapping")
        try:
            return self._convert(root, "", root.start_mark.line + 1)
        except RecursionError:
            raise ConfigError(self.path, None, None, "nested too deeply") from None

    def _convert(self, node: yaml.Node, key: str, line: int) -> _Node:
        self._values += 1
        if self._values > _MAX_VALUES:
            raise ConfigError(self.path, line, key or None, "too many values (runaway aliases?)")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, key, line)
        if id(node) in self._open:
            raise ConfigError(self.path, line, key or None, "an alias refers to its own parent")
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                self._check_tag(node, _SEQ_TAG, key, line)
                items = [
                    self._convert(item, f"{key}[{index}]", item.start_mark.line + 1)
                    for index, item in enumerate(node.value)
                ]
                return _Node(line, key, "sequence", items=items)
            assert isinstance(node, yaml.MappingNode)
            self._check_tag(node, _MAP_TAG, key, line)
            return _Node(line, key, "mapping", entries=self._entries(node, key))
        finally:
            self._open.discard(id(node))

    def _entries(self, node: yaml.MappingNode, key: str) -> dict[str, _Node]:
        entries: dict[str, _Node] = {}
        merges: list[tuple[yaml.Node, int]] = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                merges.extend((source, line) for source in sources)
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                raise ConfigError(self.path, line, key or None, "a key must be a plain word")
            name = key_node.value
            path = _join(key, name)
            if name in entries:
                raise ConfigError(
                    self.path,
                    line,
                    path,
                    f"duplicate key; first given on line {entries[name].line}",
                )
            entries[name] = self._convert(value_node, path, line)
        # Keys written here win over merged ones; of the merged, the first source wins.
        for source, line in merges:
            merged = self._convert(source, key, line)
            if merged.kind != "mapping":
                raise ConfigError(self.path, line, key or None, "'<<' merges mappings only")
            for name, value in merged.entries.items():
                entries.setdefault(name, value)
        return entries

    def _check_tag(self, node: yaml.Node, expected: str, key: str, line: int) -> None:
        if node.tag != expected:
            raise ConfigError(self.path, line, key or None, f"unsupported YAML tag {node.tag}")

    def _scalar(self, node: yaml.ScalarNode, key: str, line: int) -> _Node:
        if node.tag not in _SCALAR_TAGS:
            raise ConfigError(self.path, line, key or None, f"unsupported YAML tag {node.tag}")
        if node.tag == _NULL_TAG:
            return _Node(line, key, "null")
        text: str = node.value
        from_environment = False
        if "$" in text:
            text, from_environment = self._substitute(text, line, key)
        plain = node.style is None and not from_environment
        return _Node(line, key, "scalar", text=text, plain=plain)

    def _substitute(self, text: str, line: int, key: str) -> tuple[str, bool]:
        used = False

        def replace(match: re.Match[str]) -> str:
            nonlocal used
            if match.group(0) == "$$":
                return "$"
            reference = _VARIABLE.fullmatch(match.group(1)) if match.group(2) else None
            if reference is None:
                raise ConfigError(
                    self.path,
                    line,
                    key or None,
                    f"{match.group(0)!r} is not a variable reference; write ${{NAME}} or"
                    " ${NAME:-default} (and $$ for a literal $)",
                )
            used = True
            name, default = reference.group(1), reference.group(2)
            value = self.environ.get(name)
            if value:
                return value
            if default is not None:
                return default
            if value is None:
                raise ConfigError(
                    self.path,
                    line,
                    key or None,
                    f"environment variable {name} is not set"
                    f" (write ${{{name}:-default}} to give a default)",
                )
            return value

        return _REFERENCE.sub(replace, text), used

    # -- typed reads --------------------------------------------------------------------------

    def mapping(self, node: _Node, known: tuple[str, ...] | None) -> _Section:
        """``known``: the keys allowed here (None: any); unknown keys fail before anything."""
        if node.kind != "mapping":
            raise self.error(node, f"must be a mapping, not {node.describe()}")
        if known is not None:
            for name, item in node.entries.items():
                if name not in known:
                    close = difflib.get_close_matches(name, known, n=1)
                    hint = f"did you mean '{close[0]}'?" if close else f"use {', '.join(known)}"
                    raise self.error(item, f"unknown key; {hint}")
        return _Section(self, node)

    def sequence(self, node: _Node) -> list[_Node]:
        if node.kind != "sequence":
            raise self.error(node, f"must be a list, not {node.describe()}")
        return node.items

    def text(self, node: _Node) -> str:
        if node.kind != "scalar":
            raise self.error(node, f"must be a string, not {node.describe()}")
        return node.text

    def integer(self, node: _Node) -> int:
        if node.kind != "scalar" or not _INTEGER.fullmatch(node.text.strip()):
            raise self.error(node, f"must be an integer, not {node.describe()}")
        digits = node.text.strip().replace("_", "")
        if len(digits.lstrip("+-")) > _MAX_DIGITS:
            raise self.error(node, f"{_abridged(node.text)} is out of range")
        return int(digits)

    def boolean(self, node: _Node) -> bool:
        word = node.text.strip().lower() if node.kind == "scalar" else ""
        if word not in _TRUE | _FALSE:
            raise self.error(node, f"must be true or false, not {node.describe()}")
        return word in _TRUE

    def duration(self, node: _Node) -> float:
        return self._unit(node, parse_duration)

    def size(self, node: _Node) -> int:
        return self._unit(node, parse_size)

    def rate(self, node: _Node) -> Rate:
        return self._unit(node, parse_rate)

    def _unit(self, node: _Node, parse: Callable[[str], _T]) -> _T:
        try:
            return parse(self.text(node))
        except ValueError as exc:
            raise self.error(node, str(exc)) from None
        except OverflowError:  # 400 digits of seconds
            raise self.error(node, f"{_abridged(node.text)} is out of range") from None

    def json_scalar(self, node: _Node) -> JSONScalar:
        """A filter value, read as JSON would: only true/false are booleans, ``01`` is text."""
        if node.kind == "null":
            return None
        if node.kind != "scalar":
            raise self.error(node, f"must be a plain value, not {node.describe()}")
        if not node.plain:
            return node.text
        if node.text.lower() in ("true", "false"):
            return node.text.lower() == "true"
        number = _JSON_NUMBER.fullmatch(node.text)
        if number is None:
            return node.text
        if number.group(1) is None and number.group(2) is None:
            # Compared with the payload's numbers as Python's json reads them: integers
            # exactly (int64 ids, snowflakes), up to the digits it accepts (4,300).
            limit = sys.get_int_max_str_digits()
            if limit and len(node.text.lstrip("-")) > limit:
                raise self.error(
                    node,
                    f"{_abridged(node.text)} is out of range: a payload's JSON numbers have"
                    f" at most {limit} digits",
                )
            return int(node.text)
        value = float(node.text)
        if not math.isfinite(value):
            raise self.error(node, f"{node.text} is out of range")
        return value


class _Section:
    """A mapping whose keys are known to be allowed."""

    def __init__(self, reader: _Reader, node: _Node) -> None:
        self.reader = reader
        self.node = node

    def get(self, name: str) -> _Node | None:
        """The value of ``name``; None when absent or empty (the default applies)."""
        item = self.node.entries.get(name)
        return None if item is None or item.kind == "null" else item

    def required(self, name: str, why: str = "") -> _Node:
        item = self.node.entries.get(name)
        if item is not None and item.kind == "null":
            raise self.reader.error(item, "must have a value" + why)
        if item is None:
            path = _join(self.node.key, name)
            raise ConfigError(self.reader.path, self.node.line, path, "is required" + why)
        return item


Given = dict[str, tuple[object, _Node]]


def _build(
    reader: _Reader,
    record: Callable[..., _T],
    where: _Node,
    given: Given,
    fixed: Mapping[str, object] | None = None,
    keys: Mapping[str, str] | None = None,
    partners: Mapping[str, str] | None = None,
) -> _T:
    """Build ``record`` from values read off nodes, and report its complaint at its node.

    A complaint about a value the file did not give lands on its partner in a rule between
    two values (``partners``) if that one was given, else on the enclosing mapping under the
    YAML key of that attribute (``keys`` maps attribute names that differ).
    """
    try:
        return record(**(fixed or {}), **{name: value for name, (value, _) in given.items()})
    except InvalidField as exc:
        blamed = exc.field
        if blamed not in given and (partners or {}).get(blamed) in given:
            blamed = (partners or {})[blamed]
        if blamed in given:
            raise reader.error(given[blamed][1], exc.message) from None
        key = _join(where.key, (keys or {}).get(exc.field, exc.field))
        raise ConfigError(reader.path, where.line, key, exc.message) from None


# -- the main file -----------------------------------------------------------------------------

_MAIN_KEYS = ("store", "listen", "admin_token_file", "include", "shutdown_timeout", "producer")


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read the main file and every drop-in it includes; raise `ConfigError` on any mistake."""
    env = os.environ if environ is None else environ
    config, include_line = _load_main(path, env)
    return replace(config, queues=_load_queues(config, include_line, env))


def load_main(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read the main file alone (``queues`` left empty): what the operator commands need.

    They talk to the admin API (``listen.http``, ``admin_token_file``), so a queue secret
    such as ``${ORDERS_PASSWORD}`` in a drop-in need not be in the operator's environment.
    """
    return _load_main(path, os.environ if environ is None else environ)[0]


def _load_main(path: str | os.PathLike[str], env: Mapping[str, str]) -> tuple[Config, int | None]:
    """The main file's configuration, and the line of its ``include`` (None: the default)."""
    main_path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(main_path))
    reader = _Reader(main_path, env)
    root_node = reader.read()
    root = reader.mapping(root_node, _MAIN_KEYS)
    given: Given = {}
    fixed: dict[str, object] = {
        "path": main_path,
        "store": parse_store(DEFAULT_STORE, directory),
        "listen_resp": parse_listen(DEFAULT_LISTEN_RESP),
        "listen_http": parse_listen(DEFAULT_LISTEN_HTTP),
        "admin_token_file": None,
        "include": DEFAULT_INCLUDE,
        "shutdown_timeout": DEFAULT_SHUTDOWN_TIMEOUT,
        "producer": ProducerLimits(),
    }
    if (item := root.get("store")) is not None:
        try:
            given["store"] = (parse_store(reader.text(item), directory), item)
        except ValueError as exc:
            raise reader.error(item, str(exc)) from None
    if (item := root.get("listen")) is not None:
        listen = reader.mapping(item, ("resp", "http"))
        for name in ("resp", "http"):
            if (address := listen.get(name)) is not None:
                given[f"listen_{name}"] = (_listen(reader, address), address)
    if (item := root.get("admin_token_file")) is not None:
        token_file = _path(reader, item, directory)
        given["admin_token_file"] = (token_file, item)
    if (item := root.get("include")) is not None:
        given["include"] = (reader.text(item), item)
    if (item := root.get("shutdown_timeout")) is not None:
        given["shutdown_timeout"] = (reader.duration(item), item)
    if (item := root.get("producer")) is not None:
        given["producer"] = (_producer(reader, item), item)
    for name in given:
        fixed.pop(name, None)
    keys = {"listen_resp": "listen.resp", "listen_http": "listen.http"}
    partners = {"listen_http": "listen_resp"}
    # The main file is checked whole before any drop-in is read.
    config = _build(reader, Config, root_node, given, {**fixed, "queues": {}}, keys, partners)
    return config, given["include"][1].line if "include" in given else None


def _load_queues(
    main: Config, include_line: int | None, environ: Mapping[str, str]
) -> dict[str, QueueConfig]:
    queues: dict[str, QueueConfig] = {}
    first_lines: dict[str, int] = {}
    for file in drop_in_files(main):
        if os.path.isdir(file):
            raise ConfigError(
                main.path,
                include_line,
                "include",
                f"{main.include!r} matches the directory {file}: make it match queue files"
                f" only (the default is {DEFAULT_INCLUDE})",
            )
        queue, queue_node = _load_queue(file, environ)
        if queue.name in queues:
            raise ConfigError(
                file,
                queue_node.line,
                "queue",
                f"queue {queue.name!r} is already defined in"
                f" {queues[queue.name].source}:{first_lines[queue.name]}",
            )
        queues[queue.name] = queue
        first_lines[queue.name] = queue_node.line
    return queues


def drop_in_files(main: Config) -> list[str]:
    """The files the main file's ``include`` matches, in the order they are read (a
    directory among them is an error the daemon reports: ``_load_queues``).

    A directory the pattern lists but may not (``conf.d/`` mode 0700, another owner) is a
    `ConfigError` naming it: glob would skip it as if it were empty, and a reload would
    remove every queue.  A missing one matches nothing, as documented.
    """
    # The main file's directory is a path, not a pattern: "etc[1]/" must not match "etc1/".
    pattern = os.path.join(glob.escape(os.path.dirname(main.path)), main.include)
    _check_listable(pattern)
    main_file = os.path.abspath(main.path)
    return sorted(
        name for name in glob.glob(pattern, recursive=True) if os.path.abspath(name) != main_file
    )


def _check_listable(pattern: str) -> None:
    """Raise `ConfigError` for a directory glob must list to match ``pattern`` but cannot:
    one holding a wildcard component (``*.yaml``), checked from the top.  A literal name is
    looked up, not listed: its directory needs no read permission."""
    directory, name = os.path.split(pattern)
    if glob.has_magic(directory):
        _check_listable(directory)
    if not glob.has_magic(name):
        return
    for listed in (
        glob.glob(directory, recursive=True) if glob.has_magic(directory) else [directory]
    ):
        try:
            os.scandir(listed or ".").close()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise ConfigError(
                listed, None, None, f"cannot list the directory: {exc.strerror or exc}"
            ) from None


def load_queue(path: str, environ: Mapping[str, str]) -> QueueConfig:
    """One drop-in's queue, read as the daemon reads it."""
    return _load_queue(path, environ)[0]


def queue_name(path: str, environ: Mapping[str, str]) -> str:
    """The ``queue`` a drop-in names, whatever variables the rest of it lacks (another
    queue's ``${SECRET}`` need not be in an operator's environment to push to this one)."""
    reader = _Reader(path, _EmptyWhenUnset(environ))
    root = reader.mapping(reader.read(), None)
    return reader.text(root.required("queue"))


class _EmptyWhenUnset(Mapping[str, str]):
    """The environment with every variable it lacks set to "", which the config reads as it
    reads an empty one (``${NAME:-default}`` gives the default)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def __getitem__(self, name: str) -> str:
        return self._environ.get(name, "")

    def __iter__(self) -> Iterator[str]:
        return iter(self._environ)

    def __len__(self) -> int:
        return len(self._environ)


def _path(reader: _Reader, node: _Node, directory: str) -> str:
    """A file named relative to the config file's directory; empty is a mistake, not it."""
    text = reader.text(node)
    if not text.strip():
        raise reader.error(node, "is empty; leave the key out instead")
    return os.path.normpath(os.path.join(directory, text))


def _listen(reader: _Reader, node: _Node) -> Listen:
    if node.kind == "sequence":  # [::1]:12018 unquoted starts a YAML list
        raise reader.error(node, 'must be host:port; quote IPv6 addresses: "[::1]:12018"')
    try:
        return parse_listen(reader.text(node))
    except ValueError as exc:
        raise reader.error(node, str(exc)) from None


_LISTEN = re.compile(
    r"\[(?P<v6>[0-9A-Za-z:.%_-]+)\]:(?P<port6>[0-9]+)|(?P<host>[^\s:\[\]]+):(?P<port>[0-9]+)"
)


def parse_listen(text: str) -> Listen:
    """``host:port`` or ``[v6-address]:port``."""
    match = _LISTEN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not host:port (or [ipv6-address]:port)")
    port = int(match.group("port6") or match.group("port"))
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 0..65535")
    return Listen(match.group("v6") or match.group("host"), port)


def _producer(reader: _Reader, node: _Node) -> ProducerLimits:
    section = reader.mapping(node, ("max_connections", "max_pipeline", "idle_timeout"))
    given: Given = {}
    for name in ("max_connections", "max_pipeline"):
        if (item := section.get(name)) is not None:
            given[name] = (reader.integer(item), item)
    if (item := section.get("idle_timeout")) is not None:
        given["idle_timeout"] = (reader.duration(item), item)
    return _build(reader, ProducerLimits, node, given)


_STORE_FORMS = (
    "expected sqlite:///absolute/path.db, sqlite:relative/path.db,"
    " redis://[user:password@]host:port/db[?timeout=10s&connect_timeout=5s], rediss://… (TLS)"
    " or redis+cluster://host:port,host:port"
)
#: A Redis store URL's options (``?timeout=30s&connect_timeout=2s``) and the StoreConfig field
#: each sets.  ``timeout`` is the name Lettuce gives the command timeout, with units as here;
#: redis-py's names are read too (bare seconds are durations), so its URLs can be pasted.
#: ``replicas`` is a count (WAIT's numreplicas), the others are durations.
_STORE_OPTIONS = {
    "timeout": "command_timeout",
    "connect_timeout": "connect_timeout",
    "socket_timeout": "command_timeout",
    "socket_connect_timeout": "connect_timeout",
    "replicas": "replicas",
    "replica_timeout": "replica_timeout",
}
#: A ``rediss://`` URL's files (``?ca_file=ca.pem``), each the StoreConfig field of its name;
#: relative to the main file's directory, as every path in it is.
_STORE_FILE_OPTIONS = ("ca_file", "cert_file", "key_file")
_FILE_OPTION_FORMS = (
    "rediss:// takes ca_file (the CAs to trust instead of the system's), and cert_file with"
    " key_file (a client certificate, for Redis's tls-auth-clients)"
)
#: More replicas than any deployment runs per master: a larger number is a typo, and a push
#: would wait for replicas that do not exist.
MAX_REPLICAS = 100
_TIMEOUT_OPTION_FORMS = (
    "the options are timeout and connect_timeout, durations such as 30s or 500ms"
)
_REPLICA_OPTION_FORMS = (
    f"replicas is how many replicas must confirm a push, 0 to {MAX_REPLICAS};"
    " replica_timeout how long a push waits for them, a duration such as 1s"
)
#: Which family of options an unknown one is explained by: that of the name suggested.
_STORE_OPTION_FORMS = {
    "command_timeout": _TIMEOUT_OPTION_FORMS,
    "connect_timeout": _TIMEOUT_OPTION_FORMS,
    "replicas": _REPLICA_OPTION_FORMS,
    "replica_timeout": _REPLICA_OPTION_FORMS,
}
_ALL_STORE_OPTION_FORMS = (
    "the options are timeout and connect_timeout, durations such as 30s or 500ms,"
    f" replicas, how many replicas must confirm a push (0 to {MAX_REPLICAS}), with"
    " replica_timeout, how long a push waits for them, and for rediss:// ca_file, cert_file"
    " and key_file"
)


def parse_store(url: str, directory: str) -> StoreConfig:
    """A store URL; a relative SQLite path is taken from ``directory``."""
    shown = _redact_url(url)
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "sqlite":
        if rest.startswith("//"):
            if not rest.startswith("///"):
                raise ValueError(f"{shown!r}: {_STORE_FORMS} (an SQLite URL has no host)")
            rest = rest[2:]
        if not rest or rest == ":memory:":
            raise ValueError(f"{shown!r}: the SQLite file path is missing")
        # A '?' would otherwise become part of the file name, an option silently ignored.
        if "?" in rest:
            query = rest.partition("?")[2]
            names = [unquote(item.partition("=")[0]) for item in query.split("&") if item]
            what = f" ({', '.join(map(repr, names))})" if names else ""
            raise ValueError(f"{shown!r}: an SQLite store takes no options after '?'{what}")
        path = os.path.normpath(os.path.join(directory, rest))
        return StoreConfig(url=url, kind="sqlite", path=path)
    if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster") or not rest.startswith(
        "//"
    ):
        raise ValueError(f"{shown!r}: {_STORE_FORMS}")
    userinfo, at, location = rest[2:].rpartition("@")  # a password may hold '@', '/' or '?'
    if "#" in location:
        raise ValueError(f"{shown!r}: a fragment ('#…') is not supported")
    location, _, query = location.partition("?")
    query, files = _file_options(shown, query, directory)
    options = _store_options(shown, query)
    values = {field: value for field, (_, value) in options.items()}
    hosts, _, database = location.partition("/")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if colon:
            username, password = unquote(user) or None, unquote(secret) or None
        else:  # redis://secret@host: a password alone, as redis-cli reads it
            password = unquote(user) or None
    nodes = tuple(_host_port(shown, host) for host in hosts.split(","))
    cluster = scheme.endswith("+cluster")
    if not cluster and len(nodes) > 1:
        raise ValueError(f"{shown!r}: several hosts need redis+cluster://")
    if database and not (database.isascii() and database.isdigit()):
        raise ValueError(f"{shown!r}: the database must be a number, not {database!r}")
    db = int(database or "0")
    if cluster and db:
        raise ValueError(f"{shown!r}: a Redis Cluster has only database 0")
    try:
        store = StoreConfig(
            url=url,
            kind="redis-cluster" if cluster else "redis",
            nodes=nodes,
            username=username,
            password=password,
            db=db,
            tls=scheme.startswith("rediss"),
            command_timeout=values.get("command_timeout", DEFAULT_COMMAND_TIMEOUT),
            connect_timeout=values.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            replicas=int(values.get("replicas", 0)),
            replica_timeout=values.get("replica_timeout", _default_replica_timeout(values)),
            **files,
        )
    except InvalidField as exc:
        if exc.field in options:
            raise ValueError(
                f"{shown!r}: option {options[exc.field][0]!r}: {exc.message}"
            ) from None
        if exc.field in files:
            raise ValueError(f"{shown!r}: option {exc.field!r}: {exc.message}") from None
        raise ValueError(f"{shown!r}: {exc.message}") from None
    if files:  # read now, as the daemon will: a missing file is a mistake in this line
        try:
            store_tls_context(store)
        except ValueError as exc:
            raise ValueError(f"{shown!r}: {exc}") from None
    return store


def store_tls_context(store: StoreConfig) -> ssl.SSLContext | None:
    """What a ``rediss://`` store's connections check and show (None: a plain store).

    Raises ``ValueError`` naming the option and the file that cannot be used: ssl's own
    errors name neither.
    """
    if not store.tls:
        return None
    for name in _STORE_FILE_OPTIONS:
        path = getattr(store, name)
        if path is None:
            continue
        try:  # which file is missing or unreadable: load_cert_chain does not say
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"option {name!r}: {_with_path(path, exc)}") from None
    try:
        ssl.create_default_context(cafile=store.ca_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ValueError(f"option 'ca_file': {_with_path(str(store.ca_file), exc)}") from None
    try:
        return tls_context(store.ca_file, store.cert_file, store.key_file)
    except (OSError, ValueError) as exc:
        names = "'cert_file' and 'key_file'" if store.key_file else "'cert_file'"
        raise ValueError(f"options {names}: {exc}") from None


def _with_path(path: str, error: Exception) -> str:
    """``error``'s text with the file it is about, unless it names it already (an OSError
    from open() does, ssl's errors do not)."""
    text = str(error)
    return text if path in text else f"{text}: {path!r}"


def _file_options(shown: str, query: str, directory: str) -> tuple[str, dict[str, str]]:
    """A Redis URL's options without its files (``ca_file=…``), and those as absolute paths,
    relative ones taken from ``directory``."""
    rest: list[str] = []
    files: dict[str, str] = {}
    for item in query.split("&"):
        written, _, value = item.partition("=")
        name = unquote(written)
        if name not in _STORE_FILE_OPTIONS:
            rest.append(item)
            continue
        if name in files:
            raise ValueError(f"{shown!r}: option {name!r} is given twice")
        path = unquote(value)
        if not path.strip():
            raise ValueError(f"{shown!r}: option {name!r} needs a file, as in {name}=ca.pem")
        files[name] = os.path.normpath(os.path.join(directory, path))
    return "&".join(rest), files


def _default_replica_timeout(values: Mapping[str, float]) -> float:
    """How long a push waits for replicas, unless the URL says: at most half the call's
    ``timeout``, so that a short one (``?timeout=500ms``) needs no replica_timeout too."""
    if "replicas" not in values:
        return DEFAULT_REPLICA_TIMEOUT
    return min(DEFAULT_REPLICA_TIMEOUT, values.get("command_timeout", DEFAULT_COMMAND_TIMEOUT) / 2)


def _store_options(shown: str, query: str) -> dict[str, tuple[str, float]]:
    """A Redis URL's ``name=value&…``: for each StoreConfig field, (name written, value):
    seconds for a duration, the number for ``replicas``."""
    options: dict[str, tuple[str, float]] = {}
    for item in query.split("&"):
        if not item:  # "redis://h?" or "a=1&&b=2"
            continue
        written, equals, value = item.partition("=")
        name = unquote(written)
        field = _STORE_OPTIONS.get(name)
        if field is None:
            close = difflib.get_close_matches(name, [*_STORE_OPTIONS, *_STORE_FILE_OPTIONS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            forms = _option_forms(close[0]) if close else None
            raise ValueError(
                f"{shown!r}: unknown option {name!r}{hint} ({forms or _ALL_STORE_OPTION_FORMS})"
            )
        if field in options:
            first = options[field][0]
            if first == name:
                raise ValueError(f"{shown!r}: option {name!r} is given twice")
            raise ValueError(
                f"{shown!r}: options {first!r} and {name!r} are the same setting: give one"
            )
        if field == "replicas":
            options[field] = (name, _replica_count(shown, name, unquote(value) if equals else None))
            continue
        if not equals:
            raise ValueError(f"{shown!r}: option {name!r} needs a value, as in {name}=30s")
        try:
            seconds = parse_duration(unquote(value))
        except ValueError as exc:
            raise ValueError(f"{shown!r}: option {name!r}: {exc}") from None
        except OverflowError:  # 400 digits of seconds
            raise ValueError(
                f"{shown!r}: option {name!r}: {_abridged(value)!r} is out of range"
            ) from None
        options[field] = (name, seconds)
    return options


def _option_forms(name: str) -> str:
    """The family of options ``name`` belongs to, explained."""
    if name in _STORE_FILE_OPTIONS:
        return _FILE_OPTION_FORMS
    return _STORE_OPTION_FORMS[_STORE_OPTIONS[name]]


def _replica_count(shown: str, name: str, value: str | None) -> int:
    """``replicas=N``: a whole number (StoreConfig checks its range)."""
    if value is None:
        raise ValueError(f"{shown!r}: option {name!r} needs a value, as in {name}=1")
    if not (value.isascii() and value.isdigit()):
        raise ValueError(
            f"{shown!r}: option {name!r}: {value[:40]!r} is not a number of replicas"
            f" (0 to {MAX_REPLICAS})"
        )
    if len(value.lstrip("0")) > 9:  # int() of thousands of digits is slow: out of range anyway
        raise ValueError(
            f"{shown!r}: option {name!r}: must be between 0 and {MAX_REPLICAS},"
            f" not {_abridged(value)}"
        )
    return int(value)


def _host_port(shown: str, text: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([^\]]+)\](?::([0-9]+))?|([^:\[\]]+)(?::([0-9]+))?", text)
    if match is None:
        raise ValueError(f"{shown!r}: {text!r} is not host:port (IPv6 in brackets)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or 6379)
    if not 0 < port < 65536:
        raise ValueError(f"{shown!r}: port {port} is out of range 1..65535")
    return host, port


def _redact_url(url: str) -> str:
    """``scheme://user:********@host…``: the password of a URL hidden (as written or not),
    and the value of any option but the store's own (redis-py reads ``?password=…``)."""
    return _redact_options(_redact_userinfo(url))


def _redact_options(url: str) -> str:
    # The options follow the last '@' (a password may hold '?'); an '@' in an option hides
    # everything before it as userinfo, which errs on the safe side.
    start = url.rfind("@") + 1
    head, question, query = url[start:].partition("?")
    if not question:
        return url
    items = []
    for item in query.split("&"):
        name, equals, _ = item.partition("=")
        known = unquote(name) in _STORE_OPTIONS or unquote(name) in _STORE_FILE_OPTIONS
        items.append(item if known or not equals else f"{name}={REDACTED}")
    return f"{url[:start]}{head}?{'&'.join(items)}"


def _redact_userinfo(url: str) -> str:
    """``url`` with the password before its last ``@`` hidden, whatever the scheme: the URL
    of a store or a backend, and one refused for a mistyped scheme (``reddis://``) or a stray
    space, which is when it is shown."""
    scheme, separator, rest = url.partition("://")
    if not separator:  # mistyped ("redis:/user:pw@host"): whatever precedes the @ may be secret
        scheme, rest = "", url
    userinfo, at, location = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    hidden = f"{user}:{REDACTED}" if colon else REDACTED
    return f"{scheme}{separator}{hidden}@{location}"


# -- queue drop-ins ----------------------------------------------------------------------------

_QUEUE_KEYS = ("queue", "password", "max_payload", "topics")
_TOPIC_KEYS = (
    "backend",
    "script",
    "uri",
    "document_root",
    "host",
    "status_path",
    "keep_alive",
    "content_type",
    "concurrency",
    "timeout",
    "connect_timeout",
    "lease",
    "rate_limit",
    "retry",
    "dead_on",
    "filter",
    "dead",
    "completed",
    "circuit",
    "paused",
    "verify_tls",
    "ca_file",
)
_FASTCGI_KEYS = ("script", "uri", "document_root", "host", "status_path", "keep_alive")
_HTTPS_KEYS = ("verify_tls", "ca_file")
_TOPIC_FIELD_KEYS = {
    "dead_max_count": "dead.max_count",
    "dead_max_age": "dead.max_age",
    "completed_max_count": "completed.max_count",
    "completed_max_age": "completed.max_age",
    "circuit_failures": "circuit.failures",
    "circuit_cooldown": "circuit.cooldown",
}


def _load_queue(path: str, environ: Mapping[str, str]) -> tuple[QueueConfig, _Node]:
    reader = _Reader(path, environ)
    root_node = reader.read()
    root = reader.mapping(root_node, _QUEUE_KEYS)
    queue_node = root.required("queue")
    name = reader.text(queue_node)
    given: Given = {"name": (name, queue_node)}
    if "password" in root.node.entries:  # given, even empty: an empty one opens nothing
        secret = root.required("password", "; leave the key out for a queue without a password")
        given["password"] = (reader.text(secret), secret)
    if (item := root.get("max_payload")) is not None:
        given["max_payload"] = (reader.size(item), item)
    topics_node = root.required("topics", " (a queue needs at least one topic)")
    topic_nodes = reader.mapping(topics_node, None).node.entries
    directory = os.path.dirname(os.path.abspath(path))
    topics = tuple(
        _topic(reader, (name, queue_node), topic_name, node, directory)
        for topic_name, node in topic_nodes.items()
    )
    given["topics"] = (topics, topics_node)
    fixed: dict[str, object] = {
        "source": path,
        "password": None,
        "max_payload": DEFAULT_MAX_PAYLOAD,
    }
    for field_name in given:
        fixed.pop(field_name, None)
    return _build(reader, QueueConfig, root_node, given, fixed), queue_node


def _topic(
    reader: _Reader, queue: tuple[str, _Node], name: str, node: _Node, directory: str
) -> TopicConfig:
    section = reader.mapping(node, _TOPIC_KEYS)
    backend_node = section.required("backend")
    backend = reader.text(backend_node)
    try:
        kind = backend_kind(backend)
    except ValueError as exc:
        raise reader.error(backend_node, str(exc)) from None
    scheme = backend.partition("://")[0].lower()
    for key in _FASTCGI_KEYS:
        if kind != "fastcgi" and (item := section.get(key)) is not None:
            raise reader.error(item, f"{FASTCGI_ONLY}, not {scheme}://")
    for key in _HTTPS_KEYS:
        if scheme != "https" and (item := section.get(key)) is not None:
            raise reader.error(item, f"{HTTPS_ONLY}, not {scheme}://")

    given: Given = {
        "queue": queue,
        "name": (name, node),
        "backend": (backend, backend_node),
        "kind": (kind, backend_node),
    }
    reads: dict[str, Callable[[_Node], object]] = {
        "script": reader.text,
        "uri": reader.text,
        "document_root": reader.text,
        "host": reader.text,
        "status_path": reader.text,
        "keep_alive": reader.boolean,
        "content_type": reader.text,
        "concurrency": reader.integer,
        "timeout": reader.duration,
        "connect_timeout": reader.duration,
        "lease": reader.duration,
        "rate_limit": reader.rate,
        "retry": lambda item: _retry(reader, item),
        "dead_on": lambda item: _statuses(reader, item),
        "filter": lambda item: _filter(reader, item),
        "paused": reader.boolean,
        "verify_tls": reader.boolean,
        "ca_file": lambda item: _path(reader, item, directory),
    }
    for key, read in reads.items():
        if (item := section.get(key)) is not None:
            given[key] = (read(item), item)
    for key in ("dead", "completed"):
        if (item := section.get(key)) is not None:
            keep = reader.mapping(item, ("max_count", "max_age"))
            if (count := keep.get("max_count")) is not None:
                given[f"{key}_max_count"] = (reader.integer(count), count)
            if (age := keep.get("max_age")) is not None:
                given[f"{key}_max_age"] = (reader.duration(age), age)
    if (item := section.get("circuit")) is not None:
        circuit = reader.mapping(item, ("failures", "cooldown"))
        if (failures := circuit.get("failures")) is not None:
            given["circuit_failures"] = (reader.integer(failures), failures)
        if (cooldown := circuit.get("cooldown")) is not None:
            given["circuit_cooldown"] = (reader.duration(cooldown), cooldown)
    return _build(reader, TopicConfig, node, given, keys=_TOPIC_FIELD_KEYS)


def _retry(reader: _Reader, node: _Node) -> RetryPolicy:
    section = reader.mapping(node, ("max_attempts", "backoff", "max_backoff"))
    given: Given = {}
    if (item := section.get("max_attempts")) is not None:
        given["max_attempts"] = (reader.integer(item), item)
    for name in ("backoff", "max_backoff"):
        if (item := section.get(name)) is not None:
            given[name] = (reader.duration(item), item)
    return _build(reader, RetryPolicy, node, given, partners={"max_backoff": "backoff"})


def _statuses(reader: _Reader, node: _Node) -> frozenset[int]:
    statuses = set()
    for item in reader.sequence(node):
        status = reader.integer(item)
        try:
            _check_dead_status(status)
        except InvalidField as exc:
            raise reader.error(item, exc.message) from None
        statuses.add(status)
    return frozenset(statuses)


def _filter(reader: _Reader, node: _Node) -> Filter:
    """``{state: opened, country: [fr, de], coupon: {present: true}}``: all must hold."""
    conditions = []
    for name, item in reader.mapping(node, None).node.entries.items():
        if item.kind == "mapping":
            spec = reader.mapping(item, ("present",))
            present = reader.boolean(spec.required("present"))
            conditions.append(FieldCondition(name, present=present))
        elif item.kind == "sequence":
            if not item.items:
                raise reader.error(item, "an any-of list needs at least one value")
            values = tuple(reader.json_scalar(value) for value in item.items)
            conditions.append(FieldCondition(name, values))
        else:
            conditions.append(FieldCondition(name, (reader.json_scalar(item),)))
    return Filter(tuple(conditions))


# -- printing ----------------------------------------------------------------------------------


class _Quoted(str):
    """A string printed in quotes, so that ``"01"`` or ``"true"`` is not read as a number."""

    __slots__ = ()


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_quoted(dumper: yaml.SafeDumper, data: _Quoted) -> yaml.ScalarNode:
    return dumper.represent_scalar(_TAG + "str", str(data), style='"')


_Dumper.add_representer(_Quoted, _represent_quoted)


def render_effective(config: Config) -> str:
    """The configuration with every default filled in and secrets redacted, as YAML.

    Strings are written as a file would need them (``$${`` for a literal ``${``), so a
    printed queue reads back as the same queue.
    """
    body = yaml.dump(
        _escape_references(effective_document(config)),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=None,  # short lists and mappings of plain values on one line
        allow_unicode=True,
        width=100,
    )
    notes = "".join(f"# {note}\n" for note in php_fpm_notes(config))
    return f"# busgate: effective configuration of {config.path}\n{body}{notes}"


#: A ``$`` that a config file must double: one before ``{`` or another ``$`` (see _REFERENCE).
_NEEDS_ESCAPE = re.compile(r"\$(?=[${])")


def _escape_references(value: Any) -> Any:
    if isinstance(value, str):
        escaped = _NEEDS_ESCAPE.sub("$$", value)
        return _Quoted(escaped) if isinstance(value, _Quoted) else escaped
    if isinstance(value, dict):
        # Keys are read as written, ``$`` and all: only values are substituted.
        return {key: _escape_references(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_references(item) for item in value]
    return value


#: A whole value that reads like a shell variable: only ``${VAR}`` is substituted.
_BARE_VARIABLE = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")


def config_warnings(config: Config) -> list[str]:
    """What is valid but likely a mistake: check-config prints it, the daemon logs it."""
    warnings = [
        # Not shown, even so: it may be the password after all.
        f"{queue.source}: password: reads like a variable ($NAME), but only ${{NAME}} is"
        " taken from the environment: this one is the password as written"
        for queue in config.queues.values()
        if queue.password is not None and _BARE_VARIABLE.fullmatch(queue.password)
    ]
    if not config.queues:
        directory = os.path.dirname(os.path.abspath(config.path))
        warnings.append(
            f"include {config.include!r} (from {directory}) matches no queue file: there is no"
            " queue, so every push is refused until a reload adds one"
        )
    return warnings


def php_fpm_notes(config: Config) -> list[str]:
    """What each php-fpm pool the topics deliver to must be able to serve.

    Every open FastCGI connection holds a php-fpm child, and a topic keeps up to
    ``concurrency`` open: connections past the pool's ``pm.max_children`` wait in its
    listen queue, and their jobs time out.
    """
    topics: dict[str, list[TopicConfig]] = {}
    for queue in config.queues.values():
        for topic in queue.topics:
            if topic.kind == "fastcgi":
                topics.setdefault(str(parse_address(topic.backend)), []).append(topic)
    notes = []
    for address, sharing in topics.items():
        total = sum(topic.concurrency for topic in sharing)
        names = ", ".join(f"{t.queue}/{t.name} ({t.concurrency})" for t in sharing)
        notes.append(
            f"{address}: {names} keep up to {total} connections open, each holding a php-fpm"
            f" child: pm.max_children there must be >= {total}, plus what nginx uses"
        )
    return notes


def effective_document(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, secrets redacted (admin API, YAML)."""
    store = config.store
    document: dict[str, Any] = {
        "store": f"sqlite://{store.path}" if store.kind == "sqlite" else _shown_store_url(store),
        "listen": {"resp": str(config.listen_resp), "http": str(config.listen_http)},
        "admin_token_file": config.admin_token_file,
        "include": config.include,
        "shutdown_timeout": format_duration(config.shutdown_timeout),
        "producer": {
            "max_connections": config.producer.max_connections,
            "max_pipeline": config.producer.max_pipeline,
            "idle_timeout": format_duration(config.producer.idle_timeout),
        },
        "queues": [_render_queue(queue) for queue in config.queues.values()],
    }
    return document


def _shown_store_url(store: StoreConfig) -> str:
    """The redacted store URL with its files (``ca_file=…``) as the daemon reads them: the
    absolute path of one written relative to the main file."""
    url = store.redacted_url
    start = url.rfind("@") + 1  # the options follow the last '@', as in _redact_options
    head, question, query = url[start:].partition("?")
    if not question:
        return url
    items = []
    for item in query.split("&"):
        name = unquote(item.partition("=")[0])
        path = getattr(store, name) if name in _STORE_FILE_OPTIONS else None
        items.append(item if path is None else f"{name}={quote(path)}")
    return f"{url[:start]}{head}?{'&'.join(items)}"


def _render_queue(queue: QueueConfig) -> dict[str, Any]:
    return {
        "source": queue.source,
        "queue": queue.name,
        "password": None if queue.password is None else REDACTED,
        "max_payload": format_size(queue.max_payload),
        "topics": {topic.name: _render_topic(topic) for topic in queue.topics},
    }


def _render_topic(topic: TopicConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": topic.backend}
    if topic.kind == "fastcgi":
        out.update(
            script=topic.script,
            uri=topic.uri,
            document_root=topic.document_root,
            host=topic.host,
            status_path=topic.status_path,
            keep_alive=topic.keep_alive,
        )
    if topic.backend.lower().startswith("https:"):
        out.update(verify_tls=topic.verify_tls, ca_file=topic.ca_file)
    out.update(
        content_type=topic.content_type,
        concurrency=topic.concurrency,
        timeout=format_duration(topic.timeout),
        connect_timeout=format_duration(topic.connect_timeout),
        lease=format_duration(topic.effective_lease),
        rate_limit=None if topic.rate_limit is None else format_rate(topic.rate_limit),
        retry={
            "max_attempts": topic.retry.max_attempts,
            "backoff": format_duration(topic.retry.backoff),
            "max_backoff": format_duration(topic.retry.max_backoff),
        },
        dead_on=sorted(topic.dead_on),
        filter={c.field: _render_condition(c) for c in topic.filter.conditions},
        dead={"max_count": topic.dead_max_count, "max_age": format_duration(topic.dead_max_age)},
        completed={
            "max_count": topic.completed_max_count,
            "max_age": format_duration(topic.completed_max_age),
        },
        circuit={
            "failures": topic.circuit_failures,
            "cooldown": format_duration(topic.circuit_cooldown),
        },
        paused=topic.paused,
    )
    return out


def _render_condition(condition: FieldCondition) -> object:
    if condition.present is not None:
        return {"present": condition.present}
    values = [_Quoted(v) if isinstance(v, str) else v for v in condition.any_of]
    return values[0] if len(values) == 1 else values
