"""The dead-letter list carries the first KiB of each payload, not all of it: 50 dead jobs of
1 MiB were 52 MB a dashboard refresh, which shows 60 characters of each.  The whole payload
stays a query option away (``?payload=full``, ``busgate dead list --full-payloads``) and on
the job's own page; the CLI says when what it prints was cut."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from adapters.storage.jobs import EXCERPT_BYTES
from gateway.app import App
from gateway.resp import encode_command
from tests.support.daemon import running_daemon, write_config
from tests.support.http_server import RecordingServer, serving

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "a-dead-list-admin-token-long-enough"
DEAD = "/v1/queues/q/topics/t/dead"
#: 200 KiB of JSON text whose byte 1024 is inside a two-byte character: '{"pad": "' is 9
#: bytes, then every "é" starts at an odd offset.
BIG = ('{"pad": "' + "é" * (100 * 1024) + '"}').encode()
SHORT = b'{"short": true}'
BINARY = bytes(range(256)) * 8  # not UTF-8: base64


class Refusing(RecordingServer):
    """Reads each job whole and answers 422: dead at once."""

    @staticmethod
    async def _answer(conn: h11.Connection, stream: trio.abc.Stream, body: bytes) -> bool:
        headers = [("Content-Length", "0")]
        await stream.send_all(conn.send(h11.Response(status_code=422, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        return True


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    async with serving(Refusing()) as backend:
        queue = f"queue: q\ntopics:\n  t: {{backend: '{backend.url}'}}\n"
        config = write_config(tmp_path, {"q": queue}, main_extra="admin_token_file: admin.token\n")
        async with running_daemon(config) as app:
            yield app


def get(app: App, path: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://{app.http_address}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def api(app: App, path: str) -> tuple[int, Any]:
    return await trio.to_thread.run_sync(get, app, path)


async def dead_jobs(app: App, query: str = "") -> dict[int, dict[str, Any]]:
    """The dead jobs of q/t by their payload_size, once all three have died."""
    with trio.fail_after(10):
        while True:
            status, page = await api(app, DEAD + query)
            assert status == 200, page
            if len(page["jobs"]) == 3:
                return {job["payload_size"]: job for job in page["jobs"]}
            await trio.sleep(0.05)


async def push_all(app: App) -> None:
    host, _, port = app.resp_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(encode_command("RPUSH", "q", BIG, SHORT, BINARY))
    assert await stream.receive_some(100) == b":3\r\n"
    await stream.aclose()


async def test_the_dead_list_cuts_payloads_and_gives_them_whole_when_asked(app: App) -> None:
    await push_all(app)
    jobs = await dead_jobs(app)
    assert sorted(jobs) == sorted([len(BIG), len(SHORT), len(BINARY)])

    big = jobs[len(BIG)]
    assert (big["payload_encoding"], big["payload_truncated"]) == ("utf-8", True)
    # Cut before the character byte 1024 is part of, not through it (nor replaced).
    assert big["payload"].encode() == BIG[: EXCERPT_BYTES - 1]
    short = jobs[len(SHORT)]
    assert (short["payload"], short["payload_encoding"]) == (SHORT.decode(), "utf-8")
    assert short["payload_truncated"] is False
    binary = jobs[len(BINARY)]
    assert (binary["payload_encoding"], binary["payload_truncated"]) == ("base64", True)
    assert base64.b64decode(binary["payload"], validate=True) == BINARY[:EXCERPT_BYTES]

    whole = await dead_jobs(app, "?payload=full")
    assert whole[len(BIG)]["payload"].encode() == BIG
    assert base64.b64decode(whole[len(BINARY)]["payload"]) == BINARY
    assert not any(job["payload_truncated"] for job in whole.values())
    status, answer = await api(app, DEAD + "?payload=all")
    assert status == 400 and "excerpt" in answer["error"] and "full" in answer["error"]

    # The job's own page has it whole.
    status, document = await api(app, f"/v1/jobs/{big['id']}")
    assert status == 200 and document["copies"][0]["payload"].encode() == BIG


async def busgate(app: App, *args: str) -> tuple[str, str]:
    token_file = Path(app.config.path).parent / "admin.token"
    where = ["--url", f"http://{app.http_address}", "--token-file", str(token_file)]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BUSGATE_")}
    result = await trio.run_process(
        [sys.executable, "-m", "gateway.cli", *args, *where],
        capture_stdout=True,
        capture_stderr=True,
        cwd=ROOT,
        env={**environ, "PYTHONPATH": str(ROOT)},
    )
    return result.stdout.decode(), result.stderr.decode()


async def test_busgate_dead_list_says_when_a_payload_is_cut(app: App) -> None:
    await push_all(app)
    await dead_jobs(app)

    out, err = await busgate(app, "dead", "list", "q/t")
    rows = {row.split()[0]: row for row in out.splitlines()[1:]}
    assert len(rows) == 3
    binary_row = next(row for row in rows.values() if "(binary" in row)
    assert f"(binary, {len(BINARY)} bytes) base64:" in binary_row  # the whole size
    assert "busgate: 2 payloads cut to the first KiB" in err and "--full-payloads" in err

    out, err = await busgate(app, "dead", "list", "q/t", "--json")
    assert sum(job["payload_truncated"] for job in json.loads(out)["jobs"]) == 2
    assert "2 payloads cut" in err

    out, err = await busgate(app, "dead", "list", "q/t", "--json", "--full-payloads")
    jobs = {job["payload_size"]: job for job in json.loads(out)["jobs"]}
    assert jobs[len(BIG)]["payload"].encode() == BIG and "cut" not in err
