"""Configuration loading: the happy path, the printed effective configuration, and an error
naming file, line and key for each way a file can be wrong."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.storage.fanout import FieldCondition, Filter
from gateway.config import (
    Config,
    ConfigError,
    InvalidField,
    QueueConfig,
    RetryPolicy,
    TopicConfig,
    load_config,
    php_fpm_notes,
    render_effective,
)
from gateway.units import (
    Rate,
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

REPO = Path(__file__).resolve().parents[2]

ORDERS = """\
    queue: orders
    password: ${ORDERS_PASSWORD}
    max_payload: 512KiB
    topics:
      email:
        backend: fastcgi://127.0.0.1:9000
        script: /srv/app/public/index.php
        uri: /jobs/order-email
        status_path: /fpm-status
        concurrency: 8
        timeout: 250ms
        lease: 90s
        rate_limit: 5000/m
        retry: {max_attempts: 7, backoff: 2s, max_backoff: 10m}
        dead_on: [400, 409]
        filter: {state: opened, country: [fr, de], coupon: {present: true}}
        dead: {max_count: 50, max_age: 2d}
        completed: {max_count: 0}
        paused: true
      search-index:
        backend: https://search.internal:8443/hooks/order
        content_type: application/x-ndjson; charset=utf-8
        verify_tls: false
    """


def write(tmp_path: Path, main: str = "{}\n", **queues: str) -> Path:
    """busgate.yaml and conf.d/<name>.yaml for each keyword (dedented)."""
    (tmp_path / "conf.d").mkdir(exist_ok=True)
    path = tmp_path / "busgate.yaml"
    path.write_text(textwrap.dedent(main))
    for name, text in queues.items():
        (tmp_path / "conf.d" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return path


def topic_queue(topic_body: str) -> str:
    """A drop-in whose topic ``t`` has ``topic_body``: its first line is line 4 of the file."""
    return "queue: q\ntopics:\n  t:\n" + textwrap.indent(textwrap.dedent(topic_body), "    ")


def error_of(
    tmp_path: Path, main: str = "{}\n", env: dict[str, str] | None = None, **queues: str
) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, main, **queues), env or {})
    return caught.value


def assert_error(error: ConfigError, path: Path, line: int, key: str | None, text: str) -> None:
    assert (error.path, error.line, error.key) == (str(path), line, key), str(error)
    assert text in error.message, str(error)
    where = f"{path}:{line}: " + (f"{key}: " if key else "")
    assert str(error) == where + error.message


# -- the happy path ----------------------------------------------------------------------------


def test_full_config(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        store: sqlite:data/busgate.db
        listen: {resp: "0.0.0.0:6390", http: "[::1]:8080"}
        admin_token_file: secrets/admin.token
        shutdown_timeout: 1m
        producer: {max_connections: 50, max_pipeline: 1_000, idle_timeout: 10s}
        """,
        orders=ORDERS,
    )
    config = load_config(path, {"ORDERS_PASSWORD": "s3cret"})
    assert config.path == str(path)
    assert config.store.kind == "sqlite"
    assert config.store.path == str(tmp_path / "data" / "busgate.db")
    assert (config.listen_resp.host, config.listen_resp.port) == ("0.0.0.0", 6390)
    assert (config.listen_http.host, config.listen_http.port) == ("::1", 8080)
    assert str(config.listen_http) == "[::1]:8080"
    assert config.admin_token_file == str(tmp_path / "secrets" / "admin.token")
    assert config.include == "conf.d/*.yaml"
    assert config.shutdown_timeout == 60
    assert (config.producer.max_connections, config.producer.max_pipeline) == (50, 1000)
    assert config.producer.idle_timeout == 10

    queue = config.queue("orders")
    assert queue is not None and config.queue("nope") is None
    assert (queue.name, queue.password, queue.max_payload) == ("orders", "s3cret", 512 * 1024)
    assert queue.source == str(tmp_path / "conf.d" / "orders.yaml")
    assert [t.name for t in queue.topics] == ["email", "search-index"]
    email = queue.topic("email")
    assert email is not None
    assert (email.queue, email.kind, email.backend) == (
        "orders",
        "fastcgi",
        "fastcgi://127.0.0.1:9000",
    )
    assert (email.script, email.uri, email.document_root) == (
        "/srv/app/public/index.php",
        "/jobs/order-email",
        "/srv/app/public",
    )
    assert (email.status_path, email.content_type) == ("/fpm-status", "application/json")
    assert (email.concurrency, email.timeout, email.lease) == (8, 0.25, 90)
    assert email.rate_limit == Rate(5000, 60)
    assert email.retry == RetryPolicy(max_attempts=7, backoff=2, max_backoff=600)
    assert email.dead_on == frozenset({400, 409})
    assert email.filter == Filter(
        (
            FieldCondition("state", ("opened",)),
            FieldCondition("country", ("fr", "de")),
            FieldCondition("coupon", present=True),
        )
    )
    assert (email.dead_max_count, email.dead_max_age) == (50, 2 * 86400)
    assert (email.completed_max_count, email.completed_max_age) == (0, 3600)
    assert email.paused is True

    search = queue.topic("search-index")
    assert search is not None
    assert (search.kind, search.script, search.document_root) == ("http", None, None)
    assert search.content_type == "application/x-ndjson; charset=utf-8"
    assert search.verify_tls is False
    assert (search.concurrency, search.timeout, search.lease, search.rate_limit) == (
        4,
        30,
        None,
        None,
    )
    assert search.retry == RetryPolicy()
    assert search.dead_on == frozenset({400, 404, 410, 422})
    assert search.filter.accepts_all and not search.paused

    # Loading the same files again gives an equal configuration (reload diffs rely on it);
    # one changed value makes it different.
    assert load_config(path, {"ORDERS_PASSWORD": "s3cret"}) == config
    assert load_config(path, {"ORDERS_PASSWORD": "other"}) != config


def test_defaults(tmp_path: Path) -> None:
    path = tmp_path / "busgate.yaml"
    path.write_text("# nothing but a comment\n")
    config = load_config(path, {})
    assert (config.store.kind, config.store.path) == ("sqlite", "/var/lib/busgate/busgate.db")
    assert str(config.listen_resp) == "127.0.0.1:12018"
    assert str(config.listen_http) == "127.0.0.1:12019"
    assert config.admin_token_file is None
    assert (config.include, config.shutdown_timeout) == ("conf.d/*.yaml", 30)
    assert config.producer.max_connections == 10000 and config.producer.idle_timeout == 300
    assert dict(config.queues) == {}  # no conf.d at all is fine


def test_records_are_immutable(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, orders=ORDERS), {"ORDERS_PASSWORD": "x"})
    with pytest.raises(TypeError):
        config.queues["other"] = config.queues["orders"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.shutdown_timeout = 1  # type: ignore[misc]


def test_drop_ins_load_in_sorted_order_and_the_main_file_is_not_one(tmp_path: Path) -> None:
    body = "topics:\n  t: {backend: 'http://h/x'}\n"
    (tmp_path / "b.yaml").write_text("queue: b\n" + body)
    (tmp_path / "a.yaml").write_text("queue: a\n" + body)
    (tmp_path / "c.yml").write_text("not: included\n")
    main = tmp_path / "busgate.yaml"
    main.write_text("include: '*.yaml'\n")
    assert list(load_config(main, {}).queues) == ["a", "b"]


def test_an_include_matching_a_directory_names_the_include(tmp_path: Path) -> None:
    (tmp_path / "conf.d" / "old.yaml").mkdir(parents=True)
    error = error_of(tmp_path, "store: sqlite:x.db\ninclude: conf.d/*.yaml\n")
    assert_error(error, tmp_path / "busgate.yaml", 2, "include", "matches the directory")
    assert str(tmp_path / "conf.d" / "old.yaml") in error.message
    # The default include, not written in the file: file and key, no line to give.
    error = error_of(tmp_path)
    assert (error.path, error.line, error.key) == (str(tmp_path / "busgate.yaml"), None, "include")


def test_relative_main_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "store: sqlite:busgate.db\n", q=topic_queue("backend: http://h/x\n"))
    monkeypatch.chdir(tmp_path)
    config = load_config("busgate.yaml", {})
    assert config.store.path == str(tmp_path / "busgate.db")
    assert config.queues["q"].source == "conf.d/q.yaml"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6379/2", ("redis", (("localhost", 6379),), None, None, 2, False)),
        ("redis://localhost", ("redis", (("localhost", 6379),), None, None, 0, False)),
        (
            "rediss://app:p%40ss@r.example:6380/0",
            ("redis", (("r.example", 6380),), "app", "p@ss", 0, True),
        ),
        ("redis://secret@h:1", ("redis", (("h", 1),), None, "secret", 0, False)),
        ("redis://:pw@[::1]:7000", ("redis", (("::1", 7000),), None, "pw", 0, False)),
        (
            "redis+cluster://a:7000,b:7001",
            ("redis-cluster", (("a", 7000), ("b", 7001)), None, None, 0, False),
        ),
        (
            "rediss+cluster://u:pw@a:7000",
            ("redis-cluster", (("a", 7000),), "u", "pw", 0, True),
        ),
    ],
)
def test_redis_store_urls(tmp_path: Path, url: str, expected: tuple[object, ...]) -> None:
    store = load_config(write(tmp_path, f"store: '{url}'\n"), {}).store
    assert store.url == url and store.path is None
    assert (store.kind, store.nodes, store.username, store.password, store.db, store.tls) == (
        expected
    )


def test_sqlite_store_urls(tmp_path: Path) -> None:
    for url, path in [
        ("sqlite:///srv/jobs.db", "/srv/jobs.db"),
        ("sqlite:/srv/jobs.db", "/srv/jobs.db"),
        ("sqlite:jobs.db", str(tmp_path / "jobs.db")),
        ("sqlite:../jobs.db", str(tmp_path.parent / "jobs.db")),
    ]:
        assert load_config(write(tmp_path, f"store: {url}\n"), {}).store.path == path


def test_an_sqlite_url_is_shown_as_written(tmp_path: Path) -> None:
    # A path holds no password: `team@prod/` was shown as `********@prod/` in the startup line.
    store = load_config(write(tmp_path, "store: sqlite:///srv/team@prod/jobs.db\n"), {}).store
    assert store.redacted_url == "sqlite:///srv/team@prod/jobs.db"


def test_environment_substitution(tmp_path: Path) -> None:
    queue = """\
        queue: q
        password: "$${literal}-${EMPTY:-fallback}-${MISSING:-}-${SET}"
        topics:
          t:
            backend: fastcgi://${FPM_HOST:-127.0.0.1}:${FPM_PORT}
            script: /x.php
            concurrency: ${CONCURRENCY}
            timeout: ${TIMEOUT:-5s}
            filter:
              id: "${CONCURRENCY}"
              plain: ${CONCURRENCY}  # unquoted ${…} needs block style: '{' ends a flow scalar
              n: 3
        """
    env = {"EMPTY": "", "SET": "yes", "FPM_PORT": "9001", "CONCURRENCY": "3"}
    config = load_config(write(tmp_path, q=queue), env)
    assert config.queues["q"].password == "${literal}-fallback--yes"
    topic = config.queues["q"].topics[0]
    assert topic.backend == "fastcgi://127.0.0.1:9001"
    assert (topic.concurrency, topic.timeout) == (3, 5)
    # What the environment supplies is text, even in a filter; a number written there is one.
    assert topic.filter.conditions == (
        FieldCondition("id", ("3",)),
        FieldCondition("plain", ("3",)),
        FieldCondition("n", (3,)),
    )


def test_environment_defaults_to_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUSGATE_TEST_PASSWORD", "from-os")
    path = write(
        tmp_path,
        q="queue: q\npassword: ${BUSGATE_TEST_PASSWORD}\ntopics: {t: {backend: 'http://h'}}\n",
    )
    assert load_config(path).queues["q"].password == "from-os"


def test_yaml_1_1_surprises_are_avoided(tmp_path: Path) -> None:
    queue = """\
        queue: 0123
        password: 0123
        topics:
          t:
            backend: http://h/x
            filter: {country: [no, fr], zip: 01234, flag: true, big: 1e3, none: ~, at: 2024-01-01}
        """
    queue_config = load_config(write(tmp_path, q=queue), {}).queues["0123"]
    assert queue_config.password == "0123"
    assert queue_config.topics[0].filter.conditions == (
        FieldCondition("country", ("no", "fr")),
        FieldCondition("zip", ("01234",)),
        FieldCondition("flag", (True,)),
        FieldCondition("big", (1000.0,)),
        FieldCondition("none", (None,)),
        FieldCondition("at", ("2024-01-01",)),
    )


def test_merge_keys_share_topic_settings(tmp_path: Path) -> None:
    queue = """\
        queue: q
        topics:
          a: &php
            backend: fastcgi+unix:///run/php/fpm.sock
            script: /srv/app/index.php
            timeout: 1m
          b:
            <<: *php
            uri: /jobs/b
            timeout: 5s
        """
    topics = load_config(write(tmp_path, q=queue), {}).queues["q"].topics
    assert [(t.name, t.script, t.uri, t.timeout) for t in topics] == [
        ("a", "/srv/app/index.php", "/", 60),
        ("b", "/srv/app/index.php", "/jobs/b", 5),
    ]


# -- errors: file, line and key ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_body", "line", "key", "text"),
    [
        # unknown keys, with a suggestion
        ("backend: http://h\ntimout: 3s\n", 5, "topics.t.timout", "did you mean 'timeout'?"),
        (
            "backend: http://h\nretry:\n  max_attempt: 3\n",
            6,
            "topics.t.retry.max_attempt",
            "did you mean 'max_attempts'?",
        ),
        (
            "backend: http://h\nfilter: {a: {presnt: true}}\n",
            5,
            "topics.t.filter.a.presnt",
            "did you mean 'present'?",
        ),
        # wrong types
        ("backend: http://h\nconcurrency: many\n", 5, "topics.t.concurrency", "must be an integer"),
        ("backend: http://h\nretry: 5\n", 5, "topics.t.retry", "must be a mapping, not '5'"),
        ("backend: http://h\ndead_on: 404\n", 5, "topics.t.dead_on", "must be a list"),
        ("backend: http://h\npaused: maybe\n", 5, "topics.t.paused", "must be true or false"),
        ("backend: [http://h]\n", 4, "topics.t.backend", "must be a string, not a list"),
        ("backend: http://h\nfilter: [a]\n", 5, "topics.t.filter", "must be a mapping"),
        ("backend: http://h\nfilter: {a: [[x]]}\n", 5, "topics.t.filter.a[0]", "plain value"),
        ("backend: http://h\nfilter: {a: []}\n", 5, "topics.t.filter.a", "at least one value"),
        # bad units and values
        ("backend: http://h\ntimeout: 30 seconds\n", 5, "topics.t.timeout", "not a duration"),
        ("backend: http://h\ntimeout: 0s\n", 5, "topics.t.timeout", "longer than 0s"),
        ("backend: http://h\nlease: 500ms\n", 5, "topics.t.lease", "at least 1s"),
        ("backend: http://h\nrate_limit: fast\n", 5, "topics.t.rate_limit", "not a rate"),
        ("backend: http://h\nconcurrency: 0\n", 5, "topics.t.concurrency", "between 1 and 1024"),
        (
            "backend: http://h\nretry: {max_attempts: 0}\n",
            5,
            "topics.t.retry.max_attempts",
            "between 1 and 10000",
        ),
        (
            "backend: http://h\nretry: {backoff: 1h}\n",
            5,
            "topics.t.retry.backoff",
            "max_backoff (10m) is shorter than backoff (1h)",
        ),
        (
            "backend: http://h\ndead_on:\n  - 500\n  - 700\n",
            7,
            "topics.t.dead_on[1]",
            "700 is not an HTTP status",
        ),
        (
            "backend: http://h\ndead_on: [404, 204]\n",
            5,
            "topics.t.dead_on[1]",
            "204 is a success: a 2xx answer always completes the job",
        ),
        (
            "backend: http://h\ndead: {max_count: -1}\n",
            5,
            "topics.t.dead.max_count",
            "between 0 and",
        ),
        (
            "backend: http://h\ncontent_type: json\n",
            5,
            "topics.t.content_type",
            "not a media type",
        ),
        (
            'backend: http://h\ncontent_type: "text/plain\\r\\nX-Injected: 1"\n',
            5,
            "topics.t.content_type",
            "not a media type",
        ),
        # the backend and what depends on its kind
        ("uri: /x\n", 3, "topics.t.backend", "is required"),
        ("backend:\n", 4, "topics.t.backend", "must have a value"),
        ("backend: fastcgi://h:1\n", 3, "topics.t.script", "is required for a FastCGI backend"),
        ("backend: http://h/x\nscript: /x.php\n", 5, "topics.t.script", "only applies to FastCGI"),
        ("backend: http://h/x\nuri: /x\n", 5, "topics.t.uri", "only applies to FastCGI"),
        ("backend: http://h/x\nkeep_alive: no\n", 5, "topics.t.keep_alive", "only applies"),
        (
            "backend: fastcgi://h:1\nscript: /x.php\nkeep_alive: sometimes\n",
            6,
            "topics.t.keep_alive",
            "true or false",
        ),
        ("backend: http://h/x\nverify_tls: false\n", 5, "topics.t.verify_tls", "https://"),
        ("backend: gopher://h\n", 4, "topics.t.backend", "expected fastcgi://host:port"),
        ("backend: fastcgi://h\nscript: /x.php\n", 4, "topics.t.backend", "fastcgi://host:port"),
        (
            "backend: fastcgi+unix://run/php.sock\nscript: /x.php\n",
            4,
            "topics.t.backend",
            "must be absolute",
        ),
        ("backend: http:///path\n", 4, "topics.t.backend", "expected http://host"),
        ("backend: http://h:99999/\n", 4, "topics.t.backend", "out of range"),
        ("backend: http://h:0/\n", 4, "topics.t.backend", "port 0 is no port"),
        ("backend: https://u:pw@h/\n", 4, "topics.t.backend", "cannot carry credentials"),
        ("backend: http://h/café\n", 4, "topics.t.backend", "percent-encode the path"),
        ("backend: http://exämple.org/\n", 4, "topics.t.backend", "xn-- form"),
        ("backend: fastcgi://h:1\nscript: x.php\n", 5, "topics.t.script", "absolute path"),
        (
            "backend: fastcgi://h:1\nscript: /x.php\nuri: jobs\n",
            6,
            "topics.t.uri",
            "must start with /",
        ),
        # YAML tags that would build objects are refused, not ignored
        (
            "backend: !!python/object/apply:os.system [true]\n",
            4,
            "topics.t.backend",
            "unsupported YAML tag",
        ),
    ],
)
def test_topic_errors(tmp_path: Path, topic_body: str, line: int, key: str, text: str) -> None:
    error = error_of(tmp_path, q=topic_queue(topic_body))
    assert_error(error, tmp_path / "conf.d" / "q.yaml", line, key, text)


@pytest.mark.parametrize(
    ("queue", "line", "key", "text"),
    [
        ("topics: {t: {backend: 'http://h'}}\n", 1, "queue", "is required"),
        ("# a comment\n\nqueue: q\n", 3, "topics", "is required"),
        ("queue: q\ntopics: {}\n", 2, "topics", "at least one topic"),
        ("queue: q\ntopics: [a, b]\n", 2, "topics", "must be a mapping, not a list"),
        ("queue: q\ntopics:\n  t:\n", 3, "topics.t", "must be a mapping, not empty"),
        ("queue: a/b\ntopics: {t: {backend: 'http://h'}}\n", 1, "queue", "not a valid queue name"),
        (
            "queue: q\ntopics:\n  '{t}': {backend: 'http://h'}\n",
            3,
            "topics.{t}",
            "not a valid topic name",
        ),
        (
            "queue: q\nmax_payload: 2GiB\ntopics: {t: {backend: 'http://h'}}\n",
            2,
            "max_payload",
            "between 1B and 512MiB",
        ),
        (
            "queue: q\nmax_payload: 1 megabyte\ntopics: {t: {backend: 'http://h'}}\n",
            2,
            "max_payload",
            "not a size",
        ),
        (
            "queue: q\npassword: ''\ntopics: {t: {backend: 'http://h'}}\n",
            2,
            "password",
            "is empty",
        ),
        ("queu: q\n", 1, "queu", "did you mean 'queue'?"),
        ("queue: q\nqueue: r\n", 2, "queue", "duplicate key; first given on line 1"),
        ("queue: q\ntopics:\n  t: {backend: 'http://h'}\n  t: {}\n", 4, "topics.t", "duplicate"),
        ("- a list\n", 1, None, "must be a mapping, not a list"),
        ("a: &a [*a]\n", 1, "a[0]", "refers to its own parent"),
    ],
)
def test_queue_errors(tmp_path: Path, queue: str, line: int, key: str | None, text: str) -> None:
    error = error_of(tmp_path, q=queue)
    assert_error(error, tmp_path / "conf.d" / "q.yaml", line, key, text)


@pytest.mark.parametrize(
    ("main", "line", "key", "text"),
    [
        ("store: mysql://x\n", 1, "store", "expected sqlite:///absolute/path.db"),
        ("store: sqlite://host/x.db\n", 1, "store", "an SQLite URL has no host"),
        ('store: "sqlite:///x\\0.db"\n', 1, "store", "must not hold a NUL byte"),
        ("store: 'redis://a:1,b:2'\n", 1, "store", "several hosts need redis+cluster://"),
        ("store: redis://h:1/x\n", 1, "store", "the database must be a number"),
        ("store: redis+cluster://h:1/3\n", 1, "store", "only database 0"),
        ("store: redis://h:1?timeot=3\n", 1, "store", "timeot"),
        ("store: redis://h:0\n", 1, "store", "out of range"),
        ("listen: {resp: 12018}\n", 1, "listen.resp", "is not host:port"),
        ("listen:\n  http: [::1]:1\n", 2, None, "invalid YAML"),
        ("listen: {http: [1]}\n", 1, "listen.http", 'quote IPv6 addresses: "[::1]:12018"'),
        ("listen: {resp: 'h:70000'}\n", 1, "listen.resp", "out of range"),
        (
            "listen:\n  resp: 127.0.0.1:12019\n",
            2,
            "listen.resp",
            "listen.resp and listen.http are both 127.0.0.1:12019",
        ),
        ("listen: {resp: 'h:1', htp: 'h:2'}\n", 1, "listen.htp", "did you mean 'http'?"),
        ("shutdown_timeout: soon\n", 1, "shutdown_timeout", "not a duration"),
        ("producer:\n  idle_timeout: 0\n", 2, "producer.idle_timeout", "longer than 0s"),
        ("producer:\n  max_pipeline: x\n", 2, "producer.max_pipeline", "must be an integer"),
        ("lisen: {}\n", 1, "lisen", "did you mean 'listen'?"),
        ("include: [a]\n", 1, "include", "must be a string"),
        ("store: ${STORE_URL}\n", 1, "store", "environment variable STORE_URL is not set"),
    ],
)
def test_main_file_errors(tmp_path: Path, main: str, line: int, key: str | None, text: str) -> None:
    error = error_of(tmp_path, main=main)
    assert_error(error, tmp_path / "busgate.yaml", line, key, text)


def test_listen_conflict_without_resp_key_points_at_http(tmp_path: Path) -> None:
    # resp keeps its default; the clash is reported on the key that was written.
    error = error_of(tmp_path, main="listen:\n  http: 127.0.0.1:12018\n")
    assert_error(error, tmp_path / "busgate.yaml", 2, "listen.http", "are both 127.0.0.1:12018")


def test_the_main_file_is_checked_before_the_drop_ins(tmp_path: Path) -> None:
    main = "listen: {resp: '127.0.0.1:1', http: '127.0.0.1:1'}\n"
    error = error_of(tmp_path, main=main, q="not a mapping\n")
    assert_error(error, tmp_path / "busgate.yaml", 1, "listen.http", "are both 127.0.0.1:1")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    error = error_of(tmp_path, q="queue: q\ntopics:\n  t: {backend: [unclosed\n")
    assert_error(error, tmp_path / "conf.d" / "q.yaml", 4, None, "invalid YAML")
    error = error_of(tmp_path, q="queue: q\n  bad indentation: 1\n")
    assert_error(error, tmp_path / "conf.d" / "q.yaml", 2, None, "invalid YAML")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("${NOPE}", "environment variable NOPE is not set"),
        ("x-${1BAD}", "'${1BAD}' is not a variable reference"),
        ("${UNCLOSED", "'${UNCLOSED' is not a variable reference"),
    ],
)
def test_environment_errors(tmp_path: Path, value: str, text: str) -> None:
    error = error_of(tmp_path, q=f"queue: q\npassword: {value}\ntopics: {{}}\n")
    assert_error(error, tmp_path / "conf.d" / "q.yaml", 2, "password", text)


def test_queue_defined_twice_names_both_files(tmp_path: Path) -> None:
    body = "# first\nqueue: orders\ntopics: {t: {backend: 'http://h'}}\n"
    error = error_of(tmp_path, a=body, b="\n" + body)
    first = tmp_path / "conf.d" / "a.yaml"
    assert_error(error, tmp_path / "conf.d" / "b.yaml", 3, "queue", f"already defined in {first}:2")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.yaml", {})
    assert (
        str(caught.value) == f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    )
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "bin.yaml").write_bytes(b"queue: q\npassword: \xff\n")
    error = error_of(tmp_path)
    assert_error(error, tmp_path / "conf.d" / "bin.yaml", 2, None, "is not UTF-8 text")


def test_alias_bombs_are_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    error = error_of(tmp_path, q="\n".join(lines) + "\n")
    assert error.path == str(tmp_path / "conf.d" / "q.yaml")
    assert "too many values" in error.message


# -- the records validate themselves -----------------------------------------------------------


def test_records_validate_when_built() -> None:
    topic = TopicConfig("q", "t", "fastcgi://h:9000", "fastcgi", script="/srv/app/index.php")
    assert topic.document_root == "/srv/app"
    with pytest.raises(InvalidField) as caught:
        TopicConfig("q", "t", "http://h/x", "http", script="/x.php")
    assert caught.value.field == "script"
    with pytest.raises(InvalidField, match="kind"):
        TopicConfig("q", "t", "http://h/x", "fastcgi", script="/x.php")
    with pytest.raises(
        InvalidField, match=r"^max_backoff: max_backoff \(1s\) is shorter than backoff"
    ):
        RetryPolicy(backoff=2, max_backoff=1)
    with pytest.raises(InvalidField, match="topics: a queue needs at least one topic"):
        QueueConfig("q", None, 1024, (), "x.yaml")
    with pytest.raises(InvalidField, match="is not a topic of queue"):
        QueueConfig("other", None, 1024, (topic,), "x.yaml")


def test_config_error_text_omits_missing_parts() -> None:
    assert str(ConfigError("a.yaml", 3, "topics.t", "bad")) == "a.yaml:3: topics.t: bad"
    assert str(ConfigError("a.yaml", 3, None, "bad")) == "a.yaml:3: bad"
    assert str(ConfigError("a.yaml", None, None, "bad")) == "a.yaml: bad"


# -- the printed effective configuration -------------------------------------------------------


def test_render_effective_fills_defaults_and_redacts_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, "store: 'redis://app:hunter%232@h:1/0'\n", orders=ORDERS)
    config = load_config(path, {"ORDERS_PASSWORD": "s3cret"})
    text = render_effective(config)
    assert "s3cret" not in text and "hunter" not in text
    document = yaml.safe_load(text)
    assert document["store"] == "redis://app:********@h:1/0"
    assert document["listen"] == {"resp": "127.0.0.1:12018", "http": "127.0.0.1:12019"}
    assert document["shutdown_timeout"] == "30s"
    assert document["producer"] == {
        "max_connections": 10000,
        "max_pipeline": 10000,
        "idle_timeout": "5m",
    }
    (queue,) = document["queues"]
    assert queue["source"] == str(tmp_path / "conf.d" / "orders.yaml")
    assert (queue["queue"], queue["password"], queue["max_payload"]) == (
        "orders",
        "********",
        "512KiB",
    )
    email = queue["topics"]["email"]
    assert email["document_root"] == "/srv/app/public"
    assert (email["timeout"], email["lease"], email["rate_limit"]) == ("250ms", "90s", "5000/m")
    assert email["filter"] == {
        "state": "opened",
        "country": ["fr", "de"],
        "coupon": {"present": True},
    }
    assert email["dead"] == {"max_count": 50, "max_age": "2d"}
    search = queue["topics"]["search-index"]
    assert "script" not in search
    assert search["verify_tls"] is False
    assert search["retry"] == {"max_attempts": 5, "backoff": "1s", "max_backoff": "10m"}
    assert search["dead_on"] == [400, 404, 410, 422]
    assert search["completed"] == {"max_count": 1000, "max_age": "1h"}
    # The lease the dispatcher uses, not the absent key: 30s timeout + 15s.
    assert (search["lease"], search["rate_limit"], search["filter"]) == ("45s", None, {})
    assert search["paused"] is False


def test_the_default_lease_follows_the_timeout_up_to_a_minute() -> None:
    def topic(**given: Any) -> TopicConfig:
        return TopicConfig("q", "t", "http://h/x", "http", **given)

    assert topic(timeout=2.0).effective_lease == 17.0
    assert topic(timeout=3600.0).effective_lease == 75.0  # longer deliveries extend it
    assert topic(timeout=3600.0, lease=600.0).effective_lease == 600.0


def test_the_php_fpm_pools_needs_are_summed_over_the_topics_sharing_them(tmp_path: Path) -> None:
    queue = """\
        queue: {name}
        topics:
          a: {{backend: "fastcgi://127.0.0.1:9000", script: /srv/a.php, concurrency: 6}}
          b: {{backend: "fastcgi+unix:///run/php/fpm.sock", script: /srv/b.php}}
          c: {{backend: "http://127.0.0.1:9000/", concurrency: 50}}
        """
    config = load_config(
        write(tmp_path, one=queue.format(name="one"), two=queue.format(name="two")), {}
    )
    notes = php_fpm_notes(config)
    assert notes == [
        "fastcgi://127.0.0.1:9000: one/a (6), two/a (6) keep up to 12 connections open, each"
        " holding a php-fpm child: pm.max_children there must be >= 12, plus what nginx uses",
        "fastcgi+unix:///run/php/fpm.sock: one/b (4), two/b (4) keep up to 8 connections open,"
        " each holding a php-fpm child: pm.max_children there must be >= 8, plus what nginx"
        " uses",
    ]
    rendered = render_effective(config)
    assert rendered.endswith("".join(f"# {note}\n" for note in notes))
    yaml.safe_load(rendered)  # still YAML


def test_render_effective_hides_every_form_of_store_password(tmp_path: Path) -> None:
    for url in ("redis://justapassword@h:1", "redis://:p%40ss@h:1", "rediss+cluster://u:x/y@a:1"):
        text = render_effective(load_config(write(tmp_path, f"store: '{url}'\n"), {}))
        assert "justapassword" not in text and "p%40ss" not in text and "x/y" not in text
        assert "********" in text


def test_rendered_topics_read_back_the_same(tmp_path: Path) -> None:
    """Each rendered queue is a valid drop-in (its source line and redacted password aside)."""
    queue = """\
        queue: q
        topics:
          t:
            backend: http://h/x
            filter: {zip: "01234", flag: "true", n: 1e3, both: [1, "1"], none: null}
          php:
            backend: fastcgi://127.0.0.1:9000
            script: /srv/$$app/index.php
            uri: /jobs/$${id}?price=$$5&t=${T}
            filter: {literal: "$${HOME}", two: $$$$}
        """
    config = load_config(write(tmp_path, q=queue), {"T": "a$${b}"})
    php = config.queues["q"].topics[1]
    assert (php.script, php.uri) == ("/srv/$app/index.php", "/jobs/${id}?price=$5&t=a$${b}")
    (rendered,) = yaml.safe_load(render_effective(config))["queues"]
    del rendered["source"], rendered["password"]
    again = tmp_path / "again"
    again.mkdir()
    reloaded = load_config(write(again, q=yaml.safe_dump(rendered, sort_keys=False)), {})
    # The lease left to its default is printed as what it comes to, and reads back as such.
    assert reloaded.queues["q"].topics == tuple(
        dataclasses.replace(topic, lease=topic.effective_lease)
        for topic in config.queues["q"].topics
    )


# -- the shipped examples ----------------------------------------------------------------------


def test_the_shipped_examples_are_valid() -> None:
    config = load_config(REPO / "busgate.example.yaml", {"ORDERS_PASSWORD": "x"})
    assert isinstance(config, Config)
    assert set(config.queues) == {"orders", "audit"}
    orders = config.queues["orders"]
    assert orders.password == "x"
    email, search = orders.topics
    assert (email.name, email.kind, email.uri) == ("email", "fastcgi", "/jobs/order-email")
    assert email.filter.conditions == (FieldCondition("state", ("opened",)),)
    assert (search.name, search.kind) == ("search-index", "http")
    (log,) = config.queues["audit"].topics
    assert (log.kind, log.content_type) == ("fastcgi", "form")
    assert log.backend.startswith("fastcgi+unix:///")
    yaml.safe_load(render_effective(config))


def test_the_shipped_examples_need_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(REPO / "busgate.example.yaml", {})
    assert caught.value.path == str(REPO / "conf.d" / "orders.yaml")
    assert caught.value.key == "password"
    assert "ORDERS_PASSWORD is not set" in caught.value.message


# -- units -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30),
        ("10m", 600),
        ("1h", 3600),
        ("7d", 604800),
        ("45", 45),
        ("1.5s", 1.5),
        (" 2 m ", 120),
        ("0.3s", 0.3),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512KiB", 524288),
        ("1MiB", 1048576),
        ("1GiB", 1 << 30),
        ("100B", 100),
        ("10KB", 10_000),
        ("2048", 2048),
        ("1.5KiB", 1536),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_numbers_and_rates() -> None:
    assert parse_duration(5) == 5.0 and parse_size(7) == 7
    assert parse_rate("200/s") == Rate(200, 1) and parse_rate("200/s").per_second == 200
    assert parse_rate("5000/m").per_second == pytest.approx(83.333, rel=1e-4)
    assert parse_rate("100/h") == Rate(100, 3600)


@pytest.mark.parametrize(
    ("parse", "bad", "forms"),
    [
        (parse_duration, "30 seconds", "250ms, 30s, 10m, 1h, 7d"),
        (parse_duration, "-1s", "250ms"),
        (parse_duration, float("inf"), "250ms"),
        (parse_size, "1 megabyte", "512KiB or 1MiB"),
        (parse_size, "1mib", "512KiB"),
        (parse_size, "0.5B", "whole number of bytes"),
        (parse_size, -1, "512KiB"),
        (parse_rate, "200", "200/s, 5000/m, 100/h"),
        (parse_rate, "0/s", "must be positive"),
        (parse_rate, "5/d", "200/s"),
    ],
)
def test_unit_errors_show_the_text_and_the_forms(parse: object, bad: object, forms: str) -> None:
    assert callable(parse)
    with pytest.raises(ValueError) as caught:
        parse(bad)
    assert repr(bad) in str(caught.value) and forms in str(caught.value)


def test_formats_are_short_and_read_back() -> None:
    assert [format_duration(s) for s in (0, 0.25, 1.5, 90, 600, 5400, 86400 * 7)] == [
        "0s",
        "250ms",
        "1500ms",
        "90s",
        "10m",
        "90m",
        "7d",
    ]
    for seconds in (0.3, 0.0001, 1.23456789, 1234567.0, 3601.5, 1e-7):
        assert parse_duration(format_duration(seconds)) == seconds
    assert [format_size(n) for n in (0, 100, 512 * 1024, 1 << 20, 10_000, 1025)] == [
        "0B",
        "100B",
        "512KiB",
        "1MiB",
        "10KB",
        "1025B",
    ]
    for size in (1, 1536, 3 << 30, 123_456_789):
        assert parse_size(format_size(size)) == size
    assert [format_rate(r) for r in (Rate(200, 1), Rate(5000, 60), Rate(1.5, 3600))] == [
        "200/s",
        "5000/m",
        "1.5/h",
    ]
    assert format_rate(Rate(10, 2)) == "5/s" and str(Rate(1234567, 1)) == "1234567/s"
    with pytest.raises(ValueError):
        Rate(0, 1)


def test_a_mistyped_store_url_is_refused_without_its_password(tmp_path: Path) -> None:
    path = write(tmp_path, "store: 'redis:/app:hunter2@localhost:6379'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "hunter2" not in str(caught.value) and "********@localhost:6379" in str(caught.value)


# -- values that once escaped as Python errors, or read as something else ----------------------

T = "queue: q\ntopics:\n  t:\n    backend: http://h/x\n"


@pytest.mark.parametrize(
    ("main", "queue", "key"),
    [
        ("{}\n", T + "    timeout: " + "9" * 400 + "s\n", "topics.t.timeout"),
        ("{}\n", T + "    rate_limit: " + "9" * 400 + "/s\n", "topics.t.rate_limit"),
        ("shutdown_timeout: 1" + "0" * 400 + "\n", T, "shutdown_timeout"),
        ("{}\n", T + "    concurrency: " + "9" * 5000 + "\n", "topics.t.concurrency"),
        ("{}\n", T + "    dead_on: [" + "9" * 5000 + "]\n", "topics.t.dead_on[0]"),
        ("{}\n", T + "    filter: {n: " + "9" * 5000 + "}\n", "topics.t.filter.n"),
    ],
    ids=["duration", "rate", "main duration", "integer", "status", "filter value"],
)
def test_huge_numbers_are_config_errors(tmp_path: Path, main: str, queue: str, key: str) -> None:
    with pytest.raises(ConfigError, match="out of range") as caught:
        load_config(write(tmp_path, main, q=queue), {})
    assert caught.value.key is not None and caught.value.key.startswith(key)


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, q=T + "    filter: {a: " + "[" * 3000 + "]" * 3000 + "}\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path, {})


async def test_a_reload_that_fails_unexpectedly_keeps_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import cli

    def broken(*args: object) -> None:
        raise RuntimeError("a bug in reading the configuration")

    monkeypatch.setattr(cli, "load_config", broken)
    assert await cli.reload(None, str(write(tmp_path, q=T))) is False  # type: ignore[arg-type]


def test_drop_ins_are_found_in_a_directory_whose_name_looks_like_a_pattern(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "etc[1]"
    directory.mkdir()
    assert list(load_config(write(directory, q=T), {}).queues) == ["q"]


def test_backend_urls_with_credentials_are_refused_without_repeating_them(
    tmp_path: Path,
) -> None:
    queue = "queue: q\ntopics:\n  t:\n    backend: 'fastcgi://u:hunter2@h'\n    script: /x.php\n"
    with pytest.raises(ConfigError, match="cannot carry credentials") as caught:
        load_config(write(tmp_path, q=queue), {})
    assert "hunter2" not in str(caught.value)


def test_a_password_key_without_a_value_is_refused(tmp_path: Path) -> None:
    # An empty value must not read as "no password": the queue would be open.
    for empty in ("", "~", "null"):
        path = write(
            tmp_path, q=f"queue: q\npassword: {empty}\ntopics: {{t: {{backend: 'http://h'}}}}\n"
        )
        with pytest.raises(ConfigError, match="leave the key out"):
            load_config(path, {})


@pytest.mark.parametrize(
    ("main", "queue"),
    [
        ("admin_token_file: ${TOKEN_FILE:-}\n", T),
        ("{}\n", T.replace("http://h/x", "https://h/x") + "    ca_file: ''\n"),
    ],
    ids=["admin_token_file", "ca_file"],
)
def test_an_empty_file_name_is_refused_not_read_as_the_directory(
    tmp_path: Path, main: str, queue: str
) -> None:
    with pytest.raises(ConfigError, match="is empty"):
        load_config(write(tmp_path, main, q=queue), {})


# -- store URL options: the Redis client's timeouts --------------------------------------------


@pytest.mark.parametrize(
    ("url", "timeouts"),
    [
        ("redis://h:1/0", (10.0, 5.0)),  # the client's defaults when none is given
        ("redis://h:1/0?timeout=30s&connect_timeout=2s", (30.0, 2.0)),
        ("redis://h:1?connect_timeout=250ms", (10.0, 0.25)),
        ("redis://h:1?", (10.0, 5.0)),
        # redis-py's names, bare seconds as redis-py writes them
        ("redis://h:1/2?socket_timeout=0.5&socket_connect_timeout=1.5", (0.5, 1.5)),
        ("rediss://u:p?w@rd@h:1/0?timeout=1m", (60.0, 5.0)),  # '?' and '@' in the password
        ("redis+cluster://a:1,b:2?timeout=3s&connect_timeout=1s", (3.0, 1.0)),
    ],
)
def test_store_url_timeouts(tmp_path: Path, url: str, timeouts: tuple[float, float]) -> None:
    store = load_config(write(tmp_path, f"store: '{url}'\n"), {}).store
    assert (store.command_timeout, store.connect_timeout) == timeouts
    assert store.url == url


def test_store_url_options_leave_the_rest_of_the_url_alone(tmp_path: Path) -> None:
    store = load_config(write(tmp_path, "store: 'rediss://u:p?w@rd@h:1/3?timeout=1m'\n"), {}).store
    assert (store.nodes, store.username, store.password, store.db, store.tls) == (
        (("h", 1),),
        "u",
        "p?w@rd",
        3,
        True,
    )


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("redis://h:1?timeot=1s", "unknown option 'timeot'; did you mean 'timeout'?"),
        ("redis://h:1?db=2", "unknown option 'db'"),
        ("redis://h:1?timeout", "option 'timeout' needs a value, as in timeout=30s"),
        ("redis://h:1?timeout=", "option 'timeout': '' is not a duration"),
        ("redis://h:1?timeout=soon", "option 'timeout': 'soon' is not a duration"),
        ("redis://h:1?timeout=-1s", "option 'timeout': '-1s' is not a duration"),
        ("redis://h:1?timeout=0", "option 'timeout': must be longer than 0s"),
        ("redis://h:1?socket_connect_timeout=0ms", "option 'socket_connect_timeout': must be"),
        ("redis://h:1?timeout=1" + "0" * 400, "option 'timeout': '1000000000"),
        ("redis://h:1?timeout=1s&timeout=2s", "option 'timeout' is given twice"),
        (
            "redis://h:1?timeout=1s&socket_timeout=2s",
            "options 'timeout' and 'socket_timeout' are the same setting: give one",
        ),
        ("redis://h:1#x", "a fragment ('#…') is not supported"),
        ("sqlite:busgate.db?timeout=1s&x=2", "SQLite store takes no options after '?' ('timeout',"),
        ("sqlite:///srv/busgate.db?", "an SQLite store takes no options after '?'"),
    ],
)
def test_store_url_option_errors(tmp_path: Path, url: str, text: str) -> None:
    error = error_of(tmp_path, main=f"store: '{url}'\n")
    assert_error(error, tmp_path / "busgate.yaml", 1, "store", text)


def test_an_unknown_store_option_is_refused_without_its_value(tmp_path: Path) -> None:
    # redis-py reads ?password=… from the query: the error must not print it.
    error = error_of(tmp_path, main="store: 'redis://h:1/0?password=hunter2&timeout=1s'\n")
    assert_error(error, tmp_path / "busgate.yaml", 1, "store", "unknown option 'password'")
    assert "hunter2" not in str(error)
    assert "?password=********&timeout=1s" in str(error)
    error = error_of(tmp_path, main="store: 'sqlite:x.db?password=hunter2'\n")
    assert_error(error, tmp_path / "busgate.yaml", 1, "store", "no options after '?' ('password')")
    assert "hunter2" not in str(error)


def test_render_effective_shows_store_options_and_hides_the_password(tmp_path: Path) -> None:
    url = "redis://app:hunter2@h:1/0?timeout=30s&socket_connect_timeout=1.5"
    text = render_effective(load_config(write(tmp_path, f"store: '{url}'\n"), {}))
    assert "hunter2" not in text
    store = yaml.safe_load(text)["store"]
    assert store == "redis://app:********@h:1/0?timeout=30s&socket_connect_timeout=1.5"
    # and it reads back as the same settings
    reread = load_config(write(tmp_path, f"store: '{store.replace('********', 'x')}'\n"), {})
    assert (reread.store.command_timeout, reread.store.connect_timeout) == (30.0, 1.5)


def test_a_store_record_refuses_timeouts_that_do_not_apply_or_cannot_work() -> None:
    from gateway.config import StoreConfig

    with pytest.raises(InvalidField, match="an SQLite store has no hosts, credentials, db or"):
        StoreConfig(url="sqlite:///x.db", kind="sqlite", path="/x.db", command_timeout=1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidField, match="connect_timeout"):
            StoreConfig(url="redis://h", kind="redis", nodes=(("h", 6379),), connect_timeout=bad)
