"""Configuration: the main file plus one YAML drop-in per queue, validated into frozen records.

Every error names the file, the line and the key (``conf.d/orders.yaml:7: topics.email.timeout:
'30 seconds' is not a duration``).  To know lines, the YAML is composed into nodes and walked
here rather than loaded into plain dicts.  ``${VAR}`` and ``${VAR:-default}`` in values come
from the environment (``$$`` is a literal dollar).  Only safe YAML is read.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import yaml

from adapters.storage.fanout import FieldCondition, Filter
from fastcgi.address import parse_address
from gateway.units import (
    Rate,
    format_duration,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

DEFAULT_STORE = "sqlite:///var/lib/busgate/busgate.db"
REDACTED = "********"
U = TypeVar("U")
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    def __init__(self, path: str, line: int | None, key: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        where = path + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# -- the records -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 600.0


@dataclass(frozen=True, slots=True)
class TopicConfig:
    queue: str
    name: str
    backend: str
    kind: Literal["fastcgi", "http"]
    script: str | None = None
    uri: str = "/"
    document_root: str | None = None
    host: str = "localhost"
    content_type: str = "application/json"
    concurrency: int = 4
    timeout: float = 30.0
    lease: float | None = None  # None: min(timeout, 60s) + 15s
    rate_limit: Rate | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dead_on: frozenset[int] = frozenset({400, 404, 410, 422})
    filter: Filter = field(default_factory=Filter)
    status_path: str | None = None
    verify_tls: bool = True
    ca_file: str | None = None
    dead_max_count: int = 10000
    dead_max_age: float = 7 * 86400.0
    completed_max_count: int = 1000
    completed_max_age: float = 3600.0
    paused: bool = False


@dataclass(frozen=True, slots=True)
class QueueConfig:
    name: str
    password: str | None
    max_payload: int
    topics: tuple[TopicConfig, ...]
    source: str

    def topic(self, name: str) -> TopicConfig | None:
        return next((t for t in self.topics if t.name == name), None)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str
    kind: Literal["sqlite", "redis", "redis-cluster"]
    path: str | None = None
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False

    @property
    def redacted_url(self) -> str:
        if self.password is None:
            return self.url
        return self.url.replace(f":{self.password}@", f":{REDACTED}@", 1)


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProducerLimits:
    max_connections: int = 10000
    max_pipeline: int = 10000
    idle_timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    store: StoreConfig
    listen_resp: Listen
    listen_http: Listen
    admin_token_file: str | None
    include: str
    shutdown_timeout: float
    producer: ProducerLimits
    queues: Mapping[str, QueueConfig]

    def queue(self, name: str) -> QueueConfig | None:
        return self.queues.get(name)


# -- YAML with lines -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    """A YAML value with where it came from."""

    value: Any  # a scalar, dict[str, _Node] or list[_Node]
    line: int
    key: str  # dotted path, "" at the top


class _Reader:
    def __init__(self, path: Path, environ: Mapping[str, str]) -> None:
        self.path = path
        self.file = str(path)
        self.environ = environ
        self._constructor = yaml.constructor.SafeConstructor()
        self._resolver = yaml.resolver.Resolver()

    def error(self, node: _Node | None, message: str, key: str | None = None) -> ConfigError:
        return ConfigError(
            self.file,
            None if node is None else node.line,
            key or (node.key if node else None) or None,
            message,
        )

    def read(self) -> _Node:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(self.file, None, None, f"cannot read: {exc}") from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            problem = exc.problem or exc.context or "invalid YAML"
            raise ConfigError(self.file, line, None, f"invalid YAML: {problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(self.file, None, None, f"invalid YAML: {exc}") from None
        if root is None:
            return _Node({}, 1, "")
        return self._convert(root, "")

    def _convert(self, node: yaml.Node, key: str) -> _Node:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, _Node] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ConfigError(
                        self.file,
                        key_node.start_mark.line + 1,
                        key or None,
                        "keys must be plain strings",
                    )
                name = key_node.value
                path = f"{key}.{name}" if key else name
                if name in out:
                    raise ConfigError(
                        self.file,
                        key_node.start_mark.line + 1,
                        path,
                        f"duplicate key (first on line {out[name].line})",
                    )
                out[name] = self._convert(value_node, path)
            return _Node(out, line, key)
        if isinstance(node, yaml.SequenceNode):
            return _Node(
                [self._convert(item, f"{key}[{i}]") for i, item in enumerate(node.value)],
                line,
                key,
            )
        assert isinstance(node, yaml.ScalarNode)
        raw = node.value
        if "$" in raw:
            raw = self._substitute(raw, line, key)
            if node.style is None:  # unquoted: "${N}" may stand for a number
                tag = self._resolver.resolve(  # type: ignore[no-untyped-call]
                    yaml.ScalarNode, raw, (True, False)
                )
                node = yaml.ScalarNode(tag, raw, node.start_mark, node.end_mark, node.style)
            else:
                node = yaml.ScalarNode(node.tag, raw, node.start_mark, node.end_mark, node.style)
        try:
            value = self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise ConfigError(self.file, line, key, f"invalid value: {exc}") from None
        return _Node(value, line, key)

    def _substitute(self, text: str, line: int, key: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            value = self.environ.get(name)
            if value is None:
                if default is None:
                    raise ConfigError(
                        self.file, line, key, f"environment variable {name} is not set"
                    )
                return default
            return value

        return _ENV.sub(replace, text)

    # -- typed access -------------------------------------------------------------------------

    def mapping(self, node: _Node) -> _Section:
        if not isinstance(node.value, dict):
            raise self.error(node, f"must be a mapping, not {_kind(node.value)}")
        return _Section(self, node)

    def string(self, node: _Node) -> str:
        if isinstance(node.value, str):
            return node.value
        if isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return str(node.value)
        raise self.error(node, f"must be a string, not {_kind(node.value)}")

    def integer(self, node: _Node, low: int, high: int) -> int:
        value = node.value
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(node, f"must be an integer, not {_kind(value)}")
        if not low <= value <= high:
            raise self.error(node, f"{value} is out of range {low}..{high}")
        return value

    def boolean(self, node: _Node) -> bool:
        if not isinstance(node.value, bool):
            raise self.error(node, f"must be true or false, not {_kind(node.value)}")
        return node.value

    def duration(self, node: _Node) -> float:
        return self._unit(node, parse_duration)

    def size(self, node: _Node) -> int:
        return self._unit(node, parse_size)

    def rate(self, node: _Node) -> Rate:
        return self._unit(node, parse_rate)

    def _unit(self, node: _Node, parse: Callable[[Any], U]) -> U:
        if isinstance(node.value, bool) or node.value is None:
            raise self.error(node, f"must be a value, not {_kind(node.value)}")
        try:
            return parse(node.value)
        except ValueError as exc:
            raise self.error(node, str(exc)) from None

    def name(self, node: _Node, what: str) -> str:
        text = self.string(node)
        if not _NAME.fullmatch(text):
            raise self.error(
                node,
                f"{text!r} is not a valid {what} name (letters, digits, _ . : -; no / or braces)",
            )
        return text


class _Section:
    """A mapping being validated: keys taken are checked off; the rest are unknown keys."""

    def __init__(self, reader: _Reader, node: _Node) -> None:
        self.reader = reader
        self.node = node
        self.items: dict[str, _Node] = node.value
        self._taken: set[str] = set()

    def get(self, key: str) -> _Node | None:
        self._taken.add(key)
        node = self.items.get(key)
        return None if node is None or node.value is None else node

    def required(self, key: str) -> _Node:
        node = self.get(key)
        if node is None:
            path = f"{self.node.key}.{key}" if self.node.key else key
            raise ConfigError(self.reader.file, self.node.line, path, "is required")
        return node

    def finish(self) -> None:
        for key, node in self.items.items():
            if key not in self._taken:
                close = difflib.get_close_matches(key, sorted(self._taken), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                known = ", ".join(sorted(self._taken))
                raise ConfigError(
                    self.reader.file, node.line, node.key, f"unknown key{hint}; known keys: {known}"
                )


def _kind(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int | float):
        return "a number"
    return f"{type(value).__name__} {value!r}"


# -- loading ---------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read the main file and its drop-ins; raise ``ConfigError`` on the first problem."""
    main_path = Path(path)
    env = os.environ if environ is None else environ
    reader = _Reader(main_path, env)
    root = reader.mapping(reader.read())
    base = main_path.resolve().parent

    store_node = root.get("store")
    store = _store(reader, store_node, base)
    listen = root.get("listen")
    listen_resp, listen_http = Listen("127.0.0.1", 12018), Listen("127.0.0.1", 12019)
    if listen is not None:
        section = reader.mapping(listen)
        if (node := section.get("resp")) is not None:
            listen_resp = _listen(reader, node)
        if (node := section.get("http")) is not None:
            listen_http = _listen(reader, node)
        section.finish()
    token_node = root.get("admin_token_file")
    admin_token_file = None
    if token_node is not None:
        admin_token_file = str(base / reader.string(token_node))
    include_node = root.get("include")
    include = "conf.d/*.yaml" if include_node is None else reader.string(include_node)
    timeout_node = root.get("shutdown_timeout")
    shutdown_timeout = 30.0 if timeout_node is None else reader.duration(timeout_node)
    producer = ProducerLimits()
    if (node := root.get("producer")) is not None:
        producer = _producer(reader, node)
    root.finish()

    queues: dict[str, QueueConfig] = {}
    for file in sorted(glob.glob(str(base / include))):
        queue = _queue_file(Path(file), env)
        if queue.name in queues:
            raise ConfigError(
                file,
                None,
                "queue",
                f"queue '{queue.name}' is already defined in {queues[queue.name].source}",
            )
        queues[queue.name] = queue

    return Config(
        path=str(main_path),
        store=store,
        listen_resp=listen_resp,
        listen_http=listen_http,
        admin_token_file=admin_token_file,
        include=include,
        shutdown_timeout=shutdown_timeout,
        producer=producer,
        queues=MappingProxyType(queues),
    )


def _listen(reader: _Reader, node: _Node) -> Listen:
    text = reader.string(node)
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if match is None:
        raise reader.error(node, f"{text!r} is not host:port (or [v6-address]:port)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise reader.error(node, f"port {port} is out of range 0..65535")
    return Listen(host, port)


def _producer(reader: _Reader, node: _Node) -> ProducerLimits:
    section = reader.mapping(node)
    defaults = ProducerLimits()
    max_connections = defaults.max_connections
    max_pipeline = defaults.max_pipeline
    idle_timeout = defaults.idle_timeout
    if (item := section.get("max_connections")) is not None:
        max_connections = reader.integer(item, 1, 1_000_000)
    if (item := section.get("max_pipeline")) is not None:
        max_pipeline = reader.integer(item, 1, 1_000_000)
    if (item := section.get("idle_timeout")) is not None:
        idle_timeout = reader.duration(item)
    section.finish()
    return ProducerLimits(max_connections, max_pipeline, idle_timeout)


def _store(reader: _Reader, node: _Node | None, base: Path) -> StoreConfig:
    url = DEFAULT_STORE if node is None else reader.string(node)

    def fail(message: str) -> ConfigError:
        return ConfigError(
            reader.file, None if node is None else node.line, "store", f"{url!r}: {message}"
        )

    if url.startswith("sqlite:"):
        rest = url[len("sqlite:") :]
        if rest.startswith("///"):
            path = rest[2:]
        elif rest.startswith("//"):
            raise fail("use sqlite:///absolute/path.db or sqlite:relative/path.db")
        elif rest:
            path = str(base / rest)
        else:
            raise fail("the SQLite file path is missing")
        return StoreConfig(url=url, kind="sqlite", path=path)

    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        raise fail(
            "expected sqlite:…, redis://host:port/db, rediss://… or"
            " redis+cluster://host:port,host:port"
        )
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # redis://secret@host: a password alone, as redis-cli reads it
            username, password = None, unquote(user)
    nodes = []
    for host_port in hosts.split(","):
        host, colon, port = host_port.rpartition(":")
        if not colon or not port.isdigit() or not host:
            raise fail(f"{host_port!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    cluster = parts.scheme.endswith("+cluster")
    if not cluster and len(nodes) != 1:
        raise fail("several hosts need redis+cluster://")
    db = 0
    path = parts.path.strip("/")
    if path:
        if cluster or not path.isdigit():
            raise fail("the database number must be an integer (and 0 on a cluster)")
        db = int(path)
    return StoreConfig(
        url=url,
        kind="redis-cluster" if cluster else "redis",
        nodes=tuple(nodes),
        username=username,
        password=password,
        db=db,
        tls=parts.scheme.startswith("rediss"),
    )


def _queue_file(path: Path, environ: Mapping[str, str]) -> QueueConfig:
    reader = _Reader(path, environ)
    root = reader.mapping(reader.read())
    name = reader.name(root.required("queue"), "queue")
    password_node = root.get("password")
    password = None if password_node is None else reader.string(password_node)
    size_node = root.get("max_payload")
    max_payload = 1024 * 1024 if size_node is None else reader.size(size_node)
    if size_node is not None and not 0 < max_payload <= 512 * 1024 * 1024:
        raise reader.error(size_node, "must be between 1B and 512MiB")
    topics_node = root.required("topics")
    topics_section = reader.mapping(topics_node)
    if not topics_section.items:
        raise reader.error(topics_node, "a queue needs at least one topic")
    topics = []
    for topic_name, topic_node in topics_section.items.items():
        topics_section.get(topic_name)
        checked = reader.name(_Node(topic_name, topic_node.line, topic_node.key), "topic")
        topics.append(_topic(reader, name, checked, topic_node))
    root.finish()
    return QueueConfig(name, password, max_payload, tuple(topics), str(path))


def _topic(reader: _Reader, queue: str, name: str, node: _Node) -> TopicConfig:
    section = reader.mapping(node)
    backend_node = section.required("backend")
    backend = reader.string(backend_node)
    scheme = urlsplit(backend).scheme
    kind: Literal["fastcgi", "http"]
    if scheme in ("fastcgi", "fastcgi+unix"):
        kind = "fastcgi"
        try:
            parse_address(backend)
        except ValueError as exc:
            raise reader.error(backend_node, str(exc)) from None
    elif scheme in ("http", "https"):
        kind = "http"
        if not urlsplit(backend).hostname:
            raise reader.error(backend_node, f"{backend!r}: expected http(s)://host[:port]/path")
    else:
        raise reader.error(
            backend_node,
            f"{backend!r}: expected fastcgi://host:port, fastcgi+unix:///path, http:// or https://",
        )
    values: dict[str, Any] = {}

    def fastcgi_only(key: str) -> _Node | None:
        item = section.get(key)
        if item is not None and kind != "fastcgi":
            raise reader.error(item, f"only applies to FastCGI backends, not {scheme}://")
        return item

    def http_only(key: str) -> _Node | None:
        item = section.get(key)
        if item is not None and kind != "http":
            raise reader.error(item, f"only applies to HTTP backends, not {scheme}://")
        return item

    script_node = fastcgi_only("script")
    if kind == "fastcgi":
        if script_node is None:
            raise ConfigError(
                reader.file,
                node.line,
                f"{node.key}.script",
                "is required for a FastCGI backend (the SCRIPT_FILENAME)",
            )
        script = reader.string(script_node)
        if not script.startswith("/"):
            raise reader.error(script_node, f"{script!r} must be an absolute path")
        values["script"] = script
    if (item := fastcgi_only("uri")) is not None:
        uri = reader.string(item)
        if not uri.startswith("/"):
            raise reader.error(item, f"{uri!r} must start with /")
        values["uri"] = uri
    if (item := fastcgi_only("document_root")) is not None:
        values["document_root"] = reader.string(item)
    if (item := fastcgi_only("host")) is not None:
        values["host"] = reader.string(item)
    if (item := fastcgi_only("status_path")) is not None:
        values["status_path"] = reader.string(item)
    if (item := http_only("verify_tls")) is not None:
        values["verify_tls"] = reader.boolean(item)
    if (item := http_only("ca_file")) is not None:
        values["ca_file"] = reader.string(item)
    if (item := section.get("content_type")) is not None:
        content_type = reader.string(item)
        if content_type != "form" and "/" not in content_type:
            raise reader.error(item, f"{content_type!r} is not a media type (or the word form)")
        values["content_type"] = content_type
    if (item := section.get("concurrency")) is not None:
        values["concurrency"] = reader.integer(item, 1, 1024)
    if (item := section.get("timeout")) is not None:
        timeout = reader.duration(item)
        if timeout <= 0:
            raise reader.error(item, "must be positive")
        values["timeout"] = timeout
    if (item := section.get("lease")) is not None:
        lease = reader.duration(item)
        if lease < 1:
            raise reader.error(item, "must be at least 1s")
        values["lease"] = lease
    if (item := section.get("rate_limit")) is not None:
        values["rate_limit"] = reader.rate(item)
    if (item := section.get("retry")) is not None:
        values["retry"] = _retry(reader, item)
    if (item := section.get("dead_on")) is not None:
        if not isinstance(item.value, list):
            raise reader.error(item, "must be a list of HTTP statuses")
        values["dead_on"] = frozenset(reader.integer(s, 100, 599) for s in item.value)
    if (item := section.get("filter")) is not None:
        values["filter"] = _filter(reader, item)
    if (item := section.get("paused")) is not None:
        values["paused"] = reader.boolean(item)
    for key, count_field, age_field in (
        ("dead", "dead_max_count", "dead_max_age"),
        ("completed", "completed_max_count", "completed_max_age"),
    ):
        if (item := section.get(key)) is not None:
            keep = reader.mapping(item)
            if (count := keep.get("max_count")) is not None:
                values[count_field] = reader.integer(count, 0, 100_000_000)
            if (age := keep.get("max_age")) is not None:
                values[age_field] = reader.duration(age)
            keep.finish()
    section.finish()
    return TopicConfig(queue=queue, name=name, backend=backend, kind=kind, **values)


def _retry(reader: _Reader, node: _Node) -> RetryPolicy:
    section = reader.mapping(node)
    defaults = RetryPolicy()
    max_attempts, backoff, max_backoff = (
        defaults.max_attempts,
        defaults.backoff,
        defaults.max_backoff,
    )
    if (item := section.get("max_attempts")) is not None:
        max_attempts = reader.integer(item, 1, 1000)
    if (item := section.get("backoff")) is not None:
        backoff = reader.duration(item)
    if (item := section.get("max_backoff")) is not None:
        max_backoff = reader.duration(item)
        if max_backoff < backoff:
            raise reader.error(item, "must not be shorter than backoff")
    section.finish()
    return RetryPolicy(max_attempts, backoff, max_backoff)


def _filter(reader: _Reader, node: _Node) -> Filter:
    section = reader.mapping(node)
    conditions = []
    for field_name, item in section.items.items():
        section.get(field_name)
        value = item.value
        if isinstance(value, dict):
            spec = reader.mapping(item)
            present = spec.required("present")
            conditions.append(FieldCondition(field_name, present=reader.boolean(present)))
            spec.finish()
        elif isinstance(value, list):
            if not value or any(isinstance(v.value, dict | list) for v in value):
                raise reader.error(item, "an any-of list needs one or more plain values")
            conditions.append(FieldCondition(field_name, tuple(v.value for v in value)))
        else:
            conditions.append(FieldCondition(field_name, (value,)))
    return Filter(tuple(conditions))


# -- printing --------------------------------------------------------------------------------


def render_effective(config: Config) -> str:
    """The configuration with every default filled in and secrets redacted, as YAML."""
    document: dict[str, Any] = {
        "store": config.store.redacted_url,
        "listen": {"resp": str(config.listen_resp), "http": str(config.listen_http)},
        "admin_token_file": config.admin_token_file,
        "include": config.include,
        "shutdown_timeout": format_duration(config.shutdown_timeout),
        "producer": {
            "max_connections": config.producer.max_connections,
            "max_pipeline": config.producer.max_pipeline,
            "idle_timeout": format_duration(config.producer.idle_timeout),
        },
        "queues": [_render_queue(q) for q in config.queues.values()],
    }
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def _render_queue(queue: QueueConfig) -> dict[str, Any]:
    return {
        "queue": queue.name,
        "source": queue.source,
        "password": None if queue.password is None else REDACTED,
        "max_payload": format_size(queue.max_payload),
        "topics": {t.name: _render_topic(t) for t in queue.topics},
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
        )
    else:
        out.update(verify_tls=topic.verify_tls, ca_file=topic.ca_file)
    out.update(
        content_type=topic.content_type,
        concurrency=topic.concurrency,
        timeout=format_duration(topic.timeout),
        lease=None if topic.lease is None else format_duration(topic.lease),
        rate_limit=None if topic.rate_limit is None else str(topic.rate_limit),
        retry={
            "max_attempts": topic.retry.max_attempts,
            "backoff": format_duration(topic.retry.backoff),
            "max_backoff": format_duration(topic.retry.max_backoff),
        },
        dead_on=sorted(topic.dead_on),
        filter={
            c.field: ({"present": c.present} if c.present is not None else list(c.any_of))
            for c in topic.filter.conditions
        },
        paused=topic.paused,
        dead={"max_count": topic.dead_max_count, "max_age": format_duration(topic.dead_max_age)},
        completed={
            "max_count": topic.completed_max_count,
            "max_age": format_duration(topic.completed_max_age),
        },
    )
    return out
