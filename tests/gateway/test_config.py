"""Configuration loading: the happy path, and an error naming file, line and key for each
way a file can be wrong."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from adapters.storage.fanout import FieldCondition
from gateway.config import ConfigError, load_config, render_effective
from gateway.units import Rate, format_duration, format_size, parse_duration, parse_rate, parse_size

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, main: str, **queues: str) -> Path:
    (tmp_path / "conf.d").mkdir(exist_ok=True)
    path = tmp_path / "busgate.yaml"
    path.write_text(textwrap.dedent(main))
    for name, text in queues.items():
        (tmp_path / "conf.d" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return path


QUEUE = """\
    queue: orders
    password: ${ORDERS_PASSWORD}
    max_payload: 512KiB
    topics:
      email:
        backend: fastcgi://127.0.0.1:9000
        script: /srv/app/public/index.php
        uri: /jobs/order-email
        concurrency: 8
        timeout: 250ms
        rate_limit: 5000/m
        retry: {max_attempts: 7, backoff: 2s, max_backoff: 10m}
        dead_on: [400, 409]
        filter: {state: opened, country: [fr, de], coupon: {present: true}}
      search:
        backend: https://search.internal/hooks/order
        content_type: application/x-ndjson
    """


def test_full_config(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        store: sqlite:data/busgate.db
        listen: {resp: "0.0.0.0:6390", http: "[::1]:8080"}
        admin_token_file: admin.token
        shutdown_timeout: 1m
        producer: {max_connections: 50, idle_timeout: 10s}
        """,
        orders=QUEUE,
    )
    config = load_config(path, {"ORDERS_PASSWORD": "s3cret"})
    assert config.store.kind == "sqlite"
    assert config.store.path == str(tmp_path / "data" / "busgate.db")
    assert (config.listen_resp.host, config.listen_resp.port) == ("0.0.0.0", 6390)
    assert (config.listen_http.host, config.listen_http.port) == ("::1", 8080)
    assert config.admin_token_file == str(tmp_path / "admin.token")
    assert config.shutdown_timeout == 60
    assert config.producer.max_connections == 50 and config.producer.idle_timeout == 10
    queue = config.queues["orders"]
    assert (queue.password, queue.max_payload) == ("s3cret", 512 * 1024)
    email = queue.topic("email")
    assert email is not None
    assert (email.kind, email.script, email.uri) == (
        "fastcgi",
        "/srv/app/public/index.php",
        "/jobs/order-email",
    )
    assert (email.concurrency, email.timeout) == (8, 0.25)
    assert email.rate_limit == Rate(5000, 60)
    assert (email.retry.max_attempts, email.retry.backoff, email.retry.max_backoff) == (7, 2, 600)
    assert email.dead_on == frozenset({400, 409})
    assert email.filter.conditions == (
        FieldCondition("state", ("opened",)),
        FieldCondition("country", ("fr", "de")),
        FieldCondition("coupon", present=True),
    )
    search = queue.topic("search")
    assert search is not None and search.kind == "http" and search.script is None
    assert search.content_type == "application/x-ndjson"
    # Reloading the same files gives an equal config (reload diffs rely on it).
    assert load_config(path, {"ORDERS_PASSWORD": "s3cret"}) == config


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "{}\n"), {})
    assert config.store.path == "/var/lib/busgate/busgate.db"
    assert str(config.listen_resp) == "127.0.0.1:12018"
    assert str(config.listen_http) == "127.0.0.1:12019"
    assert config.shutdown_timeout == 30 and config.queues == {}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6379/2", ("redis", (("localhost", 6379),), None, None, 2, False)),
        (
            "rediss://app:p%40ss@r.example:6380/0",
            ("redis", (("r.example", 6380),), "app", "p@ss", 0, True),
        ),
        ("redis://secret@h:1", ("redis", (("h", 1),), None, "secret", 0, False)),
        (
            "redis+cluster://a:7000,b:7001",
            ("redis-cluster", (("a", 7000), ("b", 7001)), None, None, 0, False),
        ),
    ],
)
def test_redis_store_urls(tmp_path: Path, url: str, expected: tuple[object, ...]) -> None:
    store = load_config(write(tmp_path, f"store: {url}\n"), {}).store
    assert (store.kind, store.nodes, store.username, store.password, store.db, store.tls) == (
        expected
    )


def test_env_substitution_forms(tmp_path: Path) -> None:
    queue = """\
        queue: q
        password: "$${literal}-${MISSING:-fallback}"
        topics:
          t:
            backend: fastcgi://127.0.0.1:9000
            script: /x.php
            concurrency: ${CONC}
        """
    config = load_config(write(tmp_path, "{}\n", q=queue), {"CONC": "3"})
    assert config.queues["q"].password == "${literal}-fallback"
    assert config.queues["q"].topics[0].concurrency == 3


def error_of(
    tmp_path: Path, main: str = "{}\n", env: dict[str, str] | None = None, **queues: str
) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, main, **queues), env or {})
    return caught.value


def topic_queue(topic_body: str) -> str:
    return "queue: q\ntopics:\n  t:\n" + textwrap.indent(textwrap.dedent(topic_body), "    ")


@pytest.mark.parametrize(
    ("topic_body", "line", "key", "message"),
    [
        (
            "backend: fastcgi://h:1\nscript: /x.php\ntimout: 3s\n",
            6,
            "topics.t.timout",
            "did you mean 'timeout'",
        ),
        (
            "backend: fastcgi://h:1\nscript: /x.php\ntimeout: 30 seconds\n",
            6,
            "topics.t.timeout",
            "not a duration",
        ),
        (
            "backend: fastcgi://h:1\nscript: /x.php\nconcurrency: many\n",
            6,
            "topics.t.concurrency",
            "must be an integer",
        ),
        (
            "backend: fastcgi://h:1\nscript: /x.php\nconcurrency: 0\n",
            6,
            "topics.t.concurrency",
            "out of range 1..1024",
        ),
        ("backend: fastcgi://h:1\n", 4, "topics.t.script", "is required for a FastCGI"),
        ("backend: http://h/x\nscript: /x.php\n", 5, "topics.t.script", "only applies to FastCGI"),
        ("backend: gopher://h\n", 4, "topics.t.backend", "expected fastcgi://"),
        ("backend: fastcgi://h\nscript: /x.php\n", 4, "topics.t.backend", "fastcgi://host:port"),
        ("backend: fastcgi://h:1\nscript: x.php\n", 5, "topics.t.script", "absolute path"),
        (
            "backend: fastcgi://h:1\nscript: /x.php\nrate_limit: fast\n",
            6,
            "topics.t.rate_limit",
            "not a rate",
        ),
        (
            "backend: fastcgi://h:1\nscript: /x.php\nretry: {max_attempts: 0}\n",
            6,
            "topics.t.retry.max_attempts",
            "out of range",
        ),
        (
            "backend: fastcgi://h:1\nscript: /x.php\ndead_on: [200, 700]\n",
            6,
            "topics.t.dead_on[1]",
            "out of range 100..599",
        ),
        (
            "backend: fastcgi://h:1\nscript: /x.php\nfilter: {a: {present: maybe}}\n",
            6,
            "topics.t.filter.a.present",
            "true or false",
        ),
    ],
)
def test_topic_errors_name_file_line_and_key(
    tmp_path: Path, topic_body: str, line: int, key: str, message: str
) -> None:
    error = error_of(tmp_path, q=topic_queue(topic_body))
    assert error.path == str(tmp_path / "conf.d" / "q.yaml")
    assert (error.line, error.key) == (line, key)
    assert message in error.message
    assert str(error).startswith(f"{error.path}:{line}: {key}: ")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    error = error_of(tmp_path, q="queue: q\ntopics:\n  t: {backend: [unclosed\n")
    assert error.path.endswith("q.yaml") and error.line == 4
    assert "invalid YAML" in error.message


def test_duplicate_key(tmp_path: Path) -> None:
    error = error_of(tmp_path, q="queue: q\nqueue: r\ntopics: {}\n")
    assert (error.line, error.key) == (2, "queue")
    assert "duplicate key (first on line 1)" in error.message


def test_missing_environment_variable(tmp_path: Path) -> None:
    error = error_of(tmp_path, q="queue: q\npassword: ${NOPE}\ntopics: {}\n")
    assert (error.line, error.key) == (2, "password")
    assert "environment variable NOPE is not set" in error.message


def test_queue_defined_twice_names_both_files(tmp_path: Path) -> None:
    body = topic_queue("backend: fastcgi://h:1\nscript: /x.php\n")
    error = error_of(tmp_path, a=body, b=body)
    assert error.path.endswith("b.yaml")
    assert "already defined in" in error.message and "a.yaml" in error.message


@pytest.mark.parametrize(
    ("queue", "line", "key", "message"),
    [
        ("topics: {}\n", 1, "queue", "is required"),
        ("queue: q\ntopics: {}\n", 2, "topics", "at least one topic"),
        ("queue: a/b\ntopics: {}\n", 1, "queue", "not a valid queue name"),
        ("queue: q\nmax_payload: 2GiB\ntopics: {}\n", 2, "max_payload", "between 1B and 512MiB"),
        ("- a list\n", 1, None, "must be a mapping"),
    ],
)
def test_queue_errors(tmp_path: Path, queue: str, line: int, key: str | None, message: str) -> None:
    error = error_of(tmp_path, q=queue)
    assert (error.line, error.key) == (line, key)
    assert message in error.message


@pytest.mark.parametrize(
    ("main", "line", "key", "message"),
    [
        ("store: mysql://x\n", 1, "store", "expected sqlite:"),
        ("store: redis://a:1,b:2\n", 1, "store", "several hosts need redis+cluster"),
        ("listen: {resp: 12018}\n", 1, "listen.resp", "is not host:port"),
        ("shutdown_timeout: soon\n", 1, "shutdown_timeout", "not a duration"),
        ("lisen: {}\n", 1, "lisen", "did you mean 'listen'"),
    ],
)
def test_main_file_errors(tmp_path: Path, main: str, line: int, key: str, message: str) -> None:
    error = error_of(tmp_path, main=main)
    assert error.path == str(tmp_path / "busgate.yaml")
    assert (error.line, error.key) == (line, key)
    assert message in error.message


def test_render_effective_redacts_secrets_and_is_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "store: redis://app:hunter2@h:1/0\n", orders=QUEUE)
    text = render_effective(load_config(path, {"ORDERS_PASSWORD": "s3cret"}))
    assert "s3cret" not in text and "hunter2" not in text
    document = yaml.safe_load(text)
    assert document["store"] == "redis://app:********@h:1/0"
    (queue,) = document["queues"]
    assert queue["password"] == "********"
    assert queue["topics"]["email"]["timeout"] == "250ms"
    assert queue["topics"]["search"]["retry"] == {
        "max_attempts": 5,
        "backoff": "1s",
        "max_backoff": "10m",
    }


def test_the_shipped_examples_are_valid() -> None:
    config = load_config(REPO / "busgate.example.yaml", {"ORDERS_PASSWORD": "x"})
    assert set(config.queues) == {"orders", "audit"}
    assert config.queues["audit"].topics[0].content_type == "form"


def test_units() -> None:
    assert parse_duration("250ms") == 0.25 and parse_duration("7d") == 7 * 86400
    assert parse_duration(5) == 5.0
    assert parse_size("1MiB") == 1024 * 1024 and parse_size("10KB") == 10_000
    assert parse_rate("200/s").per_second == 200
    assert parse_rate("5000/m").per_second == pytest.approx(83.333, rel=1e-3)
    assert (format_duration(0.25), format_duration(600), format_duration(90)) == (
        "250ms",
        "10m",
        "90s",
    )
    assert format_size(512 * 1024) == "512KiB"
    for bad, parse in (("fast", parse_duration), ("-1", parse_size), ("0/s", parse_rate)):
        with pytest.raises(ValueError):
            parse(bad)
