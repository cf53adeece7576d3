"""``busgate curl`` at the edges: URLs curl would rewrite, a CA file that must be the only
trust, and producer text holding control characters that must not reach the terminal."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme

from adapters.delivery.fastcgi import FastCGIBackend
from adapters.delivery.http import HTTPBackend
from gateway.app import build_backend
from gateway.config import TopicConfig
from gateway.reproduce import job_of, reproduce_command
from tests.gateway.test_reproduce import (
    RecordingHTTPServer,
    all_but_the_span,
    echo_topic,
    run_printed,
    stored_record,
)
from tests.support.http_server import RecordingServer, serving
from tests.support.phpfpm import PhpFpm

#: An 8-bit CSI that clears the screen, an OSC that sets the title, a tab, then plain text.
C1_TEXT = "\u009b2J\u009b31mred\u009d0;title\u009c\tend \u00e9\u2603 it's \\x41"
#: What a terminal must not be sent: C0 (newline aside: it separates the command's lines),
#: DEL and C1.
TERMINAL_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.fixture
async def http_server() -> AsyncIterator[RecordingHTTPServer]:
    async with serving(RecordingHTTPServer()) as server:
        yield server


def http_topic(url: str, ca_file: str | None = None) -> TopicConfig:
    return TopicConfig(queue="orders", name="email", backend=url, kind="http", ca_file=ca_file)


async def deliver_and_reproduce(topic: TopicConfig, attributes: dict[str, str]) -> str:
    """One delivery by the daemon's backend, then the printed command run by bash."""
    record = stored_record(b'{"n": 1}', attempt=2, attributes=attributes)
    backend = build_backend(topic)
    assert isinstance(backend, HTTPBackend)
    delivery = await backend.deliver(job_of(record))
    await backend.aclose()
    assert delivery.status == 200, delivery.message
    command = reproduce_command(topic, record)
    response = await run_printed(command.encode())
    assert response.startswith(b"HTTP/1.1 200")
    return command


@pytest.mark.parametrize(
    "path",
    ["/a/./b/../hook?x=1", "/p?", "/a/%2e%2e/b/.%2E/c?q=./../", "/x/..", "/y/."],
)
async def test_curl_sends_the_request_target_the_daemon_sends(
    http_server: RecordingHTTPServer, path: str
) -> None:
    topic = http_topic(f"http://127.0.0.1:{http_server.port}{path}")
    await deliver_and_reproduce(topic, {})
    original, again = http_server.requests
    assert again.target == original.target
    assert all_but_the_span(again) == all_but_the_span(original)


async def test_control_characters_reach_the_backend_but_not_the_terminal(
    http_server: RecordingHTTPServer,
) -> None:
    # A producer's attribute becomes X-Busgate-Attr-*: C1 and tab pass the header check.
    command = await deliver_and_reproduce(
        http_topic(f"http://127.0.0.1:{http_server.port}/hook"), {"note": C1_TEXT}
    )
    assert not TERMINAL_CONTROL.search(command)
    original, again = http_server.requests
    assert all_but_the_span(again) == all_but_the_span(original)
    assert (b"x-busgate-attr-note", C1_TEXT.encode()) in again.headers


async def test_zsh_reads_the_escapes_as_bash_does(http_server: RecordingHTTPServer) -> None:
    topic = http_topic(f"http://127.0.0.1:{http_server.port}/hook")
    command = reproduce_command(topic, stored_record(b"{}", attempt=1, attributes={"n": C1_TEXT}))
    for shell in ("bash", "zsh"):
        done = await trio.run_process([shell, "-c", command], capture_stdout=True)
        assert done.stdout.startswith(b"HTTP/1.1 200")
    by_bash, by_zsh = http_server.requests
    assert all_but_the_span(by_zsh) == all_but_the_span(by_bash)


async def test_cgi_parameters_with_control_characters(php_fpm_unix: PhpFpm) -> None:
    topic = echo_topic(php_fpm_unix)
    record = stored_record(b"{}", attempt=1, attributes={"note": C1_TEXT})
    command = reproduce_command(topic, record)
    assert not TERMINAL_CONTROL.search(command)
    response = await run_printed(command.encode())
    server = json.loads(response.partition(b"\r\n\r\n")[2])["server"]
    backend = build_backend(topic)
    assert isinstance(backend, FastCGIBackend)
    job = job_of(record)
    (sent,) = [v for k, v in backend.params(job, backend.body(job)) if k.endswith(b"ATTR_NOTE")]
    assert server["HTTP_X_BUSGATE_ATTR_NOTE"] == sent.decode() == C1_TEXT


# -- ca_file: that file is the only trust ---------------------------------------------------


def tls_server(ca: trustme.CA) -> RecordingServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return RecordingServer(ssl_context=context)


async def test_the_right_ca_file_is_enough(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with serving(tls_server(ca)) as server:
        command = reproduce_command(
            http_topic(server.url, str(ca_file)), stored_record(b"{}", attempt=1)
        )
        assert (await run_printed(command.encode())).startswith(b"HTTP/1.1 200")
    (request,) = server.requests
    assert request.target == "/hooks/job"


async def with_system_certificates(
    directory: Path, command: str
) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` with bash where /etc/ssl/certs is ``directory``, for it alone."""
    swap = 'mount --bind "$0" /etc/ssl/certs && exec bash -c "$1"'
    return await trio.run_process(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", swap, str(directory), command],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_a_system_trusted_ca_is_not_trusted(tmp_path: Path) -> None:
    # The server's CA is trusted system-wide (in curl's CApath, /etc/ssl/certs, swapped for
    # a directory holding it in a private mount namespace); the topic's ca_file is another
    # CA.  The daemon refuses the server: so must the printed command.
    system_ca, topic_ca = trustme.CA(), trustme.CA()
    system = tmp_path / "system"
    system.mkdir()
    system_ca.cert_pem.write_to_path(str(system / "system.pem"))
    await trio.run_process(["openssl", "rehash", str(system)])
    topic_ca_file = tmp_path / "topic.pem"
    topic_ca.cert_pem.write_to_path(str(topic_ca_file))
    async with serving(tls_server(system_ca)) as server:
        record = stored_record(b"{}", attempt=1)
        backend = build_backend(http_topic(server.url, str(topic_ca_file)))
        assert isinstance(backend, HTTPBackend)
        refused = await backend.deliver(job_of(record))
        await backend.aclose()
        assert refused.status is None and "TLS" in refused.message
        command = reproduce_command(http_topic(server.url, str(topic_ca_file)), record)
        done = await with_system_certificates(system, command)
        assert done.returncode != 0
        assert b"SSL certificate problem" in done.stderr
        # The namespace does trust the server's CA: with curl's own CApath it would connect.
        plain = f"curl -q -sS --cacert {topic_ca_file} {server.url} -d x"
        trusting = await with_system_certificates(system, plain)
        assert trusting.returncode == 0, trusting.stderr
    assert len(server.requests) == 1
