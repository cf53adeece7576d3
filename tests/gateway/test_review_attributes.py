"""Attributes holding a lone surrogate ("\\ud800", which JSON can say and UTF-8 cannot).

They used to be stored; then every admin answer that carried one (the job's page, the
topic's whole dead list) was a 500, and `busgate dead list|replay` an "internal error".  Now
every way in refuses them, and a job stored with one before still shows, replays and deletes.

A real daemon runs in-process on SQLite or on a real redis-server, delivering to the h11
recording backend; the CLI runs as a subprocess.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import redis
import trio

from adapters.storage.jobs import NewJob
from gateway.app import App
from tests.gateway.test_admin import api
from tests.gateway.test_admin_cli import busgate
from tests.gateway.test_operator_review import DIES, Daemon
from tests.gateway.test_operator_review import daemon as daemon  # the fixture

LONE = "x\ud800"


def push_json(app: App, document: Any) -> tuple[int, dict[str, Any]]:
    # json.dumps writes the lone surrogate as the escape "\ud800", as any client would.
    request = urllib.request.Request(
        f"http://{app.http_address}/v1/queues/orders/email/jobs",
        data=json.dumps(document).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_every_way_in_refuses_an_attribute_with_a_lone_surrogate(daemon: Daemon) -> None:
    for attributes in ({"a": LONE}, {LONE: "v"}):
        status, answer = await trio.to_thread.run_sync(
            push_json, daemon.app, {"payload": DIES, "id": "sur1", "attributes": attributes}
        )
        assert status == 400, answer
        assert "not valid Unicode (a lone surrogate)" in answer["error"], answer
    status, answer = await trio.to_thread.run_sync(
        push_json,
        daemon.app,
        {"jobs": [{"payload": "ok"}, {"payload": "x", "attributes": {"a": LONE}}]},
    )
    assert status == 400 and answer["error"].startswith("jobs[1]: attribute 'a'"), answer

    # A byte of the command line that is not UTF-8 (bash's $'t=\xff'): Python reads it as the
    # surrogate \udcff, which the CLI refuses before it pushes anything.
    url = f"http://{daemon.app.http_address}"
    run = await busgate("push", "orders", "payload", "--attr", "t=\udcff", "--url", url)
    assert (run.code, run.out) == (2, ""), run.err
    assert "an attribute is UTF-8 text" in run.err, run.err

    # The Redis protocol reads attributes as UTF-8, which has no surrogates (ED A0 80 is
    # not UTF-8): refused there already.
    host, _, port = daemon.app.resp_address.rpartition(":")

    def xadd() -> None:
        with redis.Redis(host=host, port=int(port)) as client:
            client.xadd("orders", {"payload": "x", "a": b"x\xed\xa0\x80"})

    with pytest.raises(redis.ResponseError, match="attribute a must be UTF-8"):
        await trio.to_thread.run_sync(xadd)
    assert await daemon.depth() == {"ready": 0, "leased": 0, "dead": 0}


async def test_a_job_stored_with_a_lone_surrogate_can_still_be_seen_and_handled(
    daemon: Daemon,
) -> None:
    """As a job pushed before the check, straight through the service: its answers escape
    the surrogate as JSON does ("\\ud800"), instead of failing to encode it as UTF-8."""
    app = daemon.app
    assert app.service is not None
    entry = app.service.resolve("orders", {})
    job = NewJob(DIES.encode(), id="sur1", attributes={"a": LONE, "b": "é"})
    await app.service.push(entry, [job])
    assert await daemon.dead_ids(1) == ["sur1"]
    assert await daemon.dead_ids(1, "sms") == ["sur1"]

    status, document = await api(app, "GET", "/v1/jobs/sur1")
    assert status == 200, document
    assert [c["attributes"] for c in document["copies"]] == [{"a": LONE, "b": "é"}] * 2
    status, page = await api(app, "GET", "/v1/queues/orders/topics/email/dead")
    assert status == 200 and [j["id"] for j in page["jobs"]] == ["sur1"], page

    code, out, err = await daemon.cli("dead", "list", "orders/email")
    assert code == 0 and "sur1" in out, err
    code, out, err = await daemon.cli("jobs", "show", "sur1")
    assert code == 0, err
    assert "  attributes a=x\\ud800 b=é" in out.splitlines(), out
    code, out, err = await daemon.cli("jobs", "show", "sur1", "--json")
    assert code == 0, err
    assert json.loads(out)["copies"][0]["attributes"] == {"a": LONE, "b": "é"}

    code, out, err = await daemon.cli("dead", "replay", "orders/email", "--status", "404", "--yes")
    assert (code, err) == (0, ""), out
    assert out.startswith("replayed 1 of 1 dead job of orders/email"), out
    code, out, err = await daemon.cli("dead", "delete", "orders/sms", "--ids", "sur1", "--yes")
    assert (code, out, err) == (0, "deleted 1 dead job of orders/sms\n", "")
