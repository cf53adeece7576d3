"""Bytes and text at the producer and operator edges, with real daemons and real clients.

* A JSON payload that is not a string reached backends as Python wrote it again: ``1E2`` as
  ``100.0``, ``0.10000000000000000001`` as ``0.1``, a big number short of digits, one of two
  equal keys dropped.  Now it is the producer's text, exactly.
* ``busgate push Q - --attr k=v`` refused a binary payload (the API takes ``?attr.k=v`` with
  a raw body), and a command-line payload that is not UTF-8 failed on a lone surrogate.
* The ids ``.`` and ``..`` were taken, though no URL can name them (clients resolve
  ``/v1/jobs/..``): no page nor API call could show the job.
* The dead-list filter ``attribute=name:value`` could not name an attribute holding ':'.
* The CLI printed a producer's literal ``\\x1b`` as it printed ESC.

A real daemon runs in-process on SQLite or on a real redis-server, delivering to the h11
recording backend; the CLI runs as a subprocess, jobs are pushed with redis-py and urllib.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
import trio

from tests.gateway.test_admin import api
from tests.gateway.test_admin_cli import busgate
from tests.gateway.test_operator_review import DEAD, DIES, Daemon
from tests.gateway.test_operator_review import daemon as daemon  # the fixture
from tests.support.http_server import Request

JOBS = "/v1/queues/orders/email/jobs"  # one topic: one delivery a job


async def push(daemon: Daemon, body: bytes, path: str = JOBS, **kw: Any) -> tuple[int, Any]:
    """A push through the producer HTTP API (the queue has no password: no token)."""
    return await api(daemon.app, "POST", path, body, token=None, **kw)


async def delivered(daemon: Daemon, job_id: str) -> Request:
    """The request that carried the job to the backend."""
    with trio.fail_after(10):
        while True:
            for request in daemon.backend.requests:
                if request.headers.get("x-busgate-job-id") == job_id:
                    return request
            await trio.sleep(0.02)


async def xadd(daemon: Daemon, job_id: str, fields: dict[str, str | bytes]) -> str:
    host, _, port = daemon.app.resp_address.rpartition(":")

    def call() -> str:
        with redis.Redis(host=host, port=int(port)) as client:
            reply: bytes = client.xadd("orders", fields, id=job_id)
            return reply.decode()

    return await trio.to_thread.run_sync(call)


# -- a JSON payload is the text the producer wrote -----------------------------------------------

#: Each a JSON text that Python reads and writes again as another one.
WRITTEN = [
    '{"v": 0.10000000000000000001, "e": 1E2}',
    "[123456789012345678901234567890.5, -0.0, 1e-7]",
    '{"a": 1, "a": 2,\n "\\u00e9": "\\/"}',
]


async def test_a_json_payload_reaches_the_backend_as_written(daemon: Daemon) -> None:
    single = '{"id": "one", "payload":  ' + WRITTEN[0] + " }"
    batch = '{"jobs": [ {"payload": ' + WRITTEN[1] + ', "id": "two"}, {"id": "three", '
    batch += '"payload":' + WRITTEN[2] + '}, {"payload": "a string \\u00e9", "id": "four"}]}'
    # A name may be written with escapes too: "p\u0061yload" is "payload".
    escaped = '{"id": "five", "p\\u0061yload": [1E2]}'
    for body in (single, batch, escaped):
        status, answer = await push(daemon, body.encode())
        assert status == 202, answer

    for job_id, text in [
        *zip(["one", "two", "three"], WRITTEN, strict=True),
        ("four", "a string é"),
        ("five", "[1E2]"),
    ]:
        assert (await delivered(daemon, job_id)).body == text.encode(), job_id
        status, job = await api(daemon.app, "GET", f"/v1/jobs/{job_id}")
        assert status == 200 and job["copies"][0]["payload"] == text, job


async def test_json_payloads_are_still_read_strictly(daemon: Daemon) -> None:
    for body, error in [
        (b'{"payload": {"n": NaN}}', "NaN is not a JSON number"),
        (b'{"payload": [1e400]}', "1e400 is out of range"),
        (b'{"payload": {"a": 1,}}', "Expecting property name"),
        (b'{"payload": 1} x', "Extra data"),
        (b'{"jobs": [{"payload": 1} {"payload": 2}]}', "Expecting ',' delimiter"),
        (b'{"payload": 1, "colour": "red"}', "unknown job field(s): colour"),
        (b'{"jobs": [{"payload": {"a": "\\ud800"}}]}', "jobs[0]: payload is not valid Unicode"),
    ]:
        status, answer = await push(daemon, body)
        assert status == 400 and error in answer["error"], (body, answer)
    assert await daemon.depth() == {"ready": 0, "leased": 0, "dead": 0}


# -- busgate push: the payload's bytes, whatever they are ----------------------------------------


async def test_the_cli_pushes_a_binary_payload_with_attributes(daemon: Daemon) -> None:
    url = f"http://{daemon.app.http_address}"
    run = await busgate(
        "push", "orders/email", "-", "--id", "bin", "--attr", "tenant=acmé", "--url", url,
        stdin=b"\xff\x00bin",
    )  # fmt: skip
    assert (run.code, run.out) == (0, "bin\n"), run.err
    request = await delivered(daemon, "bin")
    assert request.body == b"\xff\x00bin"
    assert request.headers["x-busgate-attr-tenant"] == "acmé"


async def test_the_cli_pushes_a_command_line_payload_that_is_not_utf8(daemon: Daemon) -> None:
    # bash's "$(printf 'lat\351')": Python reads the byte E9 as the surrogate \udce9, and
    # gives the process the byte back.
    url = f"http://{daemon.app.http_address}"
    run = await busgate("push", "orders/email", "lat\udce9", "--id", "latin", "--url", url)
    assert (run.code, run.out) == (0, "latin\n"), run.err
    assert (await delivered(daemon, "latin")).body == b"lat\xe9"


# -- ids no URL can name ---------------------------------------------------------------------


async def test_dot_ids_are_refused_every_way_in(daemon: Daemon) -> None:
    for job_id in (".", ".."):
        with pytest.raises(redis.ResponseError, match="no URL can name it"):
            await xadd(daemon, job_id, {"payload": "x"})
        status, answer = await push(daemon, json.dumps({"payload": "x", "id": job_id}).encode())
        assert status == 400 and "no URL can name it" in answer["error"], answer
        status, answer = await push(daemon, b"x", f"{JOBS}?id={job_id}", content_type="text/plain")
        assert status == 400 and "no URL can name it" in answer["error"], answer
    assert await daemon.depth() == {"ready": 0, "leased": 0, "dead": 0}
    # Dots among other characters are a path segment like any other.
    assert await xadd(daemon, "...", {"payload": "x"}) == "..."
    assert (await delivered(daemon, "...")).body == b"x"


# -- the dead-list filter on an attribute whose name holds ':' -------------------------------------


async def test_the_dead_filter_names_an_attribute_holding_a_colon(daemon: Daemon) -> None:
    await xadd(daemon, "named", {"payload": DIES, "a:b": "colon"})
    await xadd(daemon, "valued", {"payload": DIES, "a": "b:colon"})
    await xadd(daemon, "url", {"payload": DIES, "url": "http://x:8/y"})
    await daemon.dead_ids(3)

    async def listed(attribute: str) -> list[str]:
        status, page = await api(daemon.app, "POST", f"{DEAD}/delete", {
            "filter": {"attribute": attribute}, "dry_run": True,
        })  # fmt: skip
        assert status in (200, 404), page
        code, out, err = await daemon.cli(
            "dead", "list", "orders/email", "--attribute", attribute, "--json"
        )
        assert code == 0, err
        ids = [job["id"] for job in json.loads(out)["jobs"]]
        assert page["matched"] == len(ids), (page, ids)
        return ids

    assert await listed("a\\:b:colon") == ["named"]
    assert await listed("a:b:colon") == ["valued"]  # the first ':' ends the name, as it did
    assert await listed("url:http://x:8/y") == ["url"]
    assert await listed("a\\:b:other") == []
    status, answer = await api(daemon.app, "GET", f"{DEAD}?attribute=a\\:b")
    assert status == 400 and "name:value" in answer["error"], answer


# -- the CLI's text: a backslash is escaped too ----------------------------------------------


async def test_a_literal_escape_does_not_print_as_the_character(daemon: Daemon) -> None:
    url = f"http://{daemon.app.http_address}"
    for job_id, payload in (("lit", b"A\\x1bB"), ("esc", b"A\x1bB")):
        run = await busgate(
            "push", "orders/email", "-", "--id", job_id, "--url", url, stdin=payload
        )
        assert run.code == 0, run.err
        await delivered(daemon, job_id)
    shown = {}
    for job_id in ("lit", "esc"):
        code, out, err = await daemon.cli("jobs", "show", job_id)
        assert code == 0, err
        (line,) = [line for line in out.splitlines() if line.startswith("  payload")]
        shown[job_id] = line.split(None, 1)[1]
    assert shown == {"lit": "A\\\\x1bB", "esc": "A\\x1bB"}
