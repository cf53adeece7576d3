"""Review of HTTP delivery: what an operator reads about a redirect, repeated header fields,
IPv6 backends, host names that do not resolve, and a connect cut short by the job's timeout.
Against real servers on loopback; the Host field of a default port (a server on port 80 or
443 is not a test's to open) on the request busgate sends and ``busgate curl`` prints."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from adapters.delivery.base import Failure
from adapters.delivery.http import HTTPBackend, HTTPTarget
from tests.gateway.test_admin import api
from tests.gateway.test_http_delivery import job
from tests.gateway.test_http_delivery_faults import (
    OK,
    answer_ok_until_eof,
    deliver_in_turn,
    raw_service,
    read_request,
)
from tests.support.daemon import running_daemon, write_config
from tests.support.ports import unanswered_port

# -- a redirect says where it points ------------------------------------------------------------


def redirect(status: bytes, *locations: bytes) -> bytes:
    fields = b"".join(b"Location: " + location + b"\r\n" for location in locations)
    return b"HTTP/1.1 " + status + b"\r\n" + fields + b"Content-Length: 5\r\n\r\nmoved"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            redirect(b"302 Found", b"https://api.example.com/v2/hook"),
            "302 Found -> https://api.example.com/v2/hook",
        ),
        # Relative: resolved against the topic's URL, as a client following it would.
        (
            redirect(b"303 See Other", b"/login?next=%2Fhook"),
            "303 See Other -> {origin}/login?next=%2Fhook",
        ),
        # The status's own phrase, not whatever the server wrote after the code.
        (
            redirect(b"308 Go away", b"https://b.example/"),
            "308 Permanent Redirect -> https://b.example/",
        ),
        # Control and format characters (a terminal escape, a right-to-left override, a tab)
        # reach logs, terminals and the dashboard written out, never as themselves.
        (
            redirect(
                b"307 Temporary Redirect", b"https://c.example/\x1b[2J\xe2\x80\xaeevil\tx\xff"
            ),
            "307 Temporary Redirect -> https://c.example/\\x1b[2J\\u202eevil\\tx\\xff",
        ),
        # A singleton field repeated with the same value is that value...
        (
            redirect(b"301 Moved Permanently", b"https://d.example/", b"https://d.example/"),
            "301 Moved Permanently -> https://d.example/",
        ),
        # ... and with different values it is malformed: neither, and never both joined.
        (
            redirect(b"302 Found", b"https://e.example/", b"https://f.example/"),
            "302 Found -> 2 different Location fields",
        ),
        (redirect(b"300 Multiple Choices"), "300 Multiple Choices, without a Location"),
        # Not a URL at all (urljoin raises on it): shown as it came.
        (redirect(b"302 Found", b"http://[oops/x"), "302 Found -> http://[oops/x"),
    ],
    ids=[
        "absolute",
        "relative",
        "own phrase",
        "controls",
        "repeated",
        "conflicting",
        "none",
        "not a URL",
    ],
)
async def test_a_redirect_says_where_it_points(answer: bytes, message: str) -> None:
    # A 3xx is not followed (README: a status like any other), but its attempt said only
    # "status 302": where the service had moved to was lost.
    urls: list[str] = []

    async def handler(stream: trio.SocketStream, number: int) -> None:
        _, rest = await read_request(stream)
        await stream.send_all(answer)
        await answer_ok_until_eof(stream, rest)

    async with trio.open_nursery() as nursery:
        url, connections = await raw_service(nursery, handler)
        urls.append(url)
        backend = HTTPBackend(HTTPTarget(url=url, timeout=5, max_connections=1))
        moved = await backend.deliver(job())
        after = await backend.deliver(job())
        await backend.aclose()
        nursery.cancel_scope.cancel()
    origin = urls[0].removesuffix("/hook")
    assert (moved.status, moved.body, moved.failure) == (int(answer[9:12]), b"moved", None)
    assert moved.message == message.format(origin=origin)
    # Only the 3xx says more than its status; the connection lives on after it.
    assert (after.status, after.message) == (200, "") and connections == [1]


async def test_a_long_location_is_cut_short() -> None:
    long = b"https://g.example/" + b"a" * 5000

    async def handler(stream: trio.SocketStream, number: int) -> None:
        await read_request(stream)
        await stream.send_all(redirect(b"301 Moved Permanently", long))

    ((moved,), _, _) = await deliver_in_turn(handler, 1)
    assert moved.message.startswith("301 Moved Permanently -> https://g.example/aaaa")
    assert moved.message.endswith("…") and len(moved.message) < 300


async def test_test_delivery_shows_where_a_redirect_points(tmp_path: Path) -> None:
    # What an operator trying a topic sees: the admin API's test delivery passes the
    # delivery's message on.
    token = "an-admin-token-long-enough"

    async def handler(stream: trio.SocketStream, number: int) -> None:
        await read_request(stream)
        await stream.send_all(redirect(b"302 Found", b"https://login.example/sso?from=busgate"))

    async with trio.open_nursery() as nursery:
        url, _ = await raw_service(nursery, handler)
        (tmp_path / "admin.token").write_text(token + "\n")
        config = write_config(
            tmp_path,
            {"orders": f"queue: orders\ntopics:\n  search: {{backend: '{url}', paused: true}}\n"},
            main_extra="admin_token_file: admin.token\n",
        )
        async with running_daemon(config) as app:
            status, result = await api(
                app, "POST", "/v1/queues/orders/topics/search/test-delivery", {"payload": "{}"}
            )
        nursery.cancel_scope.cancel()
    assert status == 200 and result["status"] == 302
    assert result["message"] == "302 Found -> https://login.example/sso?from=busgate"


# -- repeated header fields ---------------------------------------------------------------------


async def test_repeated_header_fields_are_kept_one_pair_each_never_joined() -> None:
    # A guard (this held before the review): joining repeats with ", " is right for list
    # fields only; Content-Type is a singleton, and "application/json, text/html" was
    # never sent.  The delivery keeps each field line as the service sent it.
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Type: text/html\r\n"
        b"Vary: Accept\r\nVary: Origin\r\nContent-Length: 2\r\n\r\nok"
    )

    async def handler(stream: trio.SocketStream, number: int) -> None:
        await read_request(stream)
        await stream.send_all(answer)

    ((delivery,), _, _) = await deliver_in_turn(handler, 1)
    assert [(k, v) for k, v in delivery.headers if k in (b"content-type", b"vary")] == [
        (b"content-type", b"application/json"),
        (b"content-type", b"text/html"),
        (b"vary", b"Accept"),
        (b"vary", b"Origin"),
    ]


# -- where the request goes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://[::1]/hook", "[::1]"),
        ("https://[2001:db8::7]/hook", "[2001:db8::7]"),
        ("https://[2001:db8::7]:8443/hook", "[2001:db8::7]:8443"),
        ("http://Example.COM:80/hook", "example.com"),
        ("http://example.com:8080/hook", "example.com:8080"),
    ],
)
def test_the_host_field_is_an_rfc_9110_uri_host(url: str, host: str) -> None:
    # "Host: ::1" (an IPv6 address on the default port) is no host at all: nginx and Tomcat
    # answer it with 400, which dead-letters every job at once (400 is in dead_on).
    headers = dict(HTTPBackend(HTTPTarget(url=url)).request(job())[0])
    assert headers["Host"] == host
    parts, written = urlsplit(url), urlsplit(f"//{headers['Host']}")
    assert (written.hostname, written.port or parts.port) == (parts.hostname, parts.port)


async def test_an_ipv6_backend_gets_its_bracketed_address_as_host() -> None:
    hosts: list[bytes] = []

    async def serve(stream: trio.SocketStream) -> None:
        head, _ = await read_request(stream)
        hosts.append(head.lower().split(b"\r\nhost: ")[1].split(b"\r\n")[0])
        await stream.send_all(OK)

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, serve, 0, host="::1"))
        url = f"http://[::1]:{listener.socket.getsockname()[1]}/hook"
        backend = HTTPBackend(HTTPTarget(url=url, timeout=5))
        delivery = await backend.deliver(job())
        await backend.aclose()
        nursery.cancel_scope.cancel()
    assert delivery.status == 200, delivery.message
    assert hosts == [urlsplit(url).netloc.encode()]


async def test_a_host_name_that_does_not_resolve_says_so() -> None:
    # getaddrinfo's error codes are not errno values: the message read "Unknown error -2".
    backend = HTTPBackend(HTTPTarget(url="http://no-such-host.invalid/hook", timeout=10))
    delivery = await backend.deliver(job())
    await backend.aclose()
    assert delivery.failure is Failure.CONNECT and delivery.failure.job_never_ran
    prefix = "http://no-such-host.invalid: cannot resolve no-such-host.invalid: "
    assert delivery.message.startswith(prefix), delivery.message
    assert "Unknown error" not in delivery.message


# -- the job's deadline ---------------------------------------------------------------------------


async def test_a_connect_cut_short_by_the_jobs_timeout_spends_no_attempt() -> None:
    # A server whose accept queue is full (overloaded, or a host that drops SYNs) never
    # completes the handshake.  With the topic's timeout under the 5 s connect timeout the
    # attempt was "timeout: no response within 0.5s", spent, so the job died after
    # max_attempts without ever reaching the service; with a timeout over 5 s the same
    # outage was a connect failure that spends nothing.
    with unanswered_port() as port:
        backend = HTTPBackend(HTTPTarget(url=f"http://127.0.0.1:{port}/hook", timeout=0.5))
        delivery = await backend.deliver(job())
        await backend.aclose()
    assert delivery.failure is Failure.CONNECT and delivery.failure.job_never_ran
    assert delivery.message == f"http://127.0.0.1:{port}: not connected before the deadline"
    assert 0.45 < delivery.duration < 1.5
