"""The W3C ``traceparent`` header of an HTTP push is the trace of every job it carries.

For a raw body as for a JSON one (one job or a batch), unless a job names its own trace
("traceparent" in the JSON): that one wins.  End to end: a real push to the daemon, the
job delivered to the h11 recording server, whose received ``traceparent`` carries the trace
id (a fresh span per attempt: the delivery contract).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway.app import App
from tests.support.daemon import running_daemon, write_config
from tests.support.http_server import RecordingServer, serving

HEADER_TRACE = "0af7651916cd43dd8448eb211c80319c"
HEADER = f"00-{HEADER_TRACE}-b7ad6b7169203331-01"
OWN_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OWN = f"00-{OWN_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
async def backend() -> AsyncIterator[RecordingServer]:
    async with serving(RecordingServer()) as server:
        yield server


@pytest.fixture
async def app(backend: RecordingServer, tmp_path: Path) -> AsyncIterator[App]:
    queue = f"""\
        queue: orders
        password: s3cret
        topics:
          email:
            backend: {backend.url}
        """
    async with running_daemon(write_config(tmp_path, {"orders": queue})) as app:
        yield app


def post(app: App, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://{app.http_address}/v1/queues/orders/jobs",
        data=body,
        method="POST",
        headers={"Authorization": "Bearer s3cret", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def push(app: App, body: bytes, headers: dict[str, str]) -> list[str]:
    status, answer = await trio.to_thread.run_sync(post, app, body, headers)
    assert status == 202, answer
    ids = answer["ids"]
    assert isinstance(ids, list)
    return ids


async def delivered_traces(backend: RecordingServer, ids: list[str]) -> list[str]:
    """The trace id each job of ``ids`` reached the backend with."""
    with trio.fail_after(10):
        while len(backend.requests) < len(ids):
            await trio.sleep(0.01)
    traces = {
        request.headers["x-busgate-job-id"]: request.headers["traceparent"].split("-")
        for request in backend.requests
    }
    assert all(parts[0] == "00" and len(parts) == 4 for parts in traces.values())
    return [traces[job_id][1] for job_id in ids]


JSON = {"Content-Type": "application/json", "traceparent": HEADER}


async def test_the_header_is_the_trace_of_a_json_job(app: App, backend: RecordingServer) -> None:
    ids = await push(app, b'{"payload": {"order": 42}}', JSON)
    assert await delivered_traces(backend, ids) == [HEADER_TRACE]
    assert app.store is not None
    (record,) = await app.store.get_job(ids[0])
    assert record.trace_id == HEADER_TRACE


async def test_the_header_is_the_trace_of_every_job_of_a_batch_that_names_none(
    app: App, backend: RecordingServer
) -> None:
    batch = {"jobs": [{"payload": 1}, {"payload": 2, "traceparent": OWN}, {"payload": 3}]}
    ids = await push(app, json.dumps(batch).encode(), JSON)
    assert await delivered_traces(backend, ids) == [HEADER_TRACE, OWN_TRACE, HEADER_TRACE]


async def test_the_header_is_the_trace_of_a_raw_body(app: App, backend: RecordingServer) -> None:
    ids = await push(app, b"raw", {"Content-Type": "text/plain", "traceparent": HEADER})
    assert await delivered_traces(backend, ids) == [HEADER_TRACE]


async def test_without_the_header_each_job_gets_a_trace_of_its_own(
    app: App, backend: RecordingServer
) -> None:
    batch = {"jobs": [{"payload": 1}, {"payload": 2}]}
    ids = await push(app, json.dumps(batch).encode(), {"Content-Type": "application/json"})
    first, second = await delivered_traces(backend, ids)
    assert first != second and HEADER_TRACE not in (first, second)


#: Headers W3C Trace Context says to ignore: the jobs get a trace of their own.
INVALID_HEADERS = [
    "00-not-a-trace",
    f"00-{HEADER_TRACE.upper()}-b7ad6b7169203331-01",  # upper case
    f"ff-{HEADER_TRACE}-b7ad6b7169203331-01",  # version ff
    f"00-{HEADER_TRACE}-b7ad6b7169203331-01-more",  # version 00 has four fields
    f"00-{'0' * 32}-b7ad6b7169203331-01",  # all-zero trace id
    f"00-{HEADER_TRACE}-{'0' * 16}-01",  # all-zero parent id
]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"], ids=["json", "raw"])
@pytest.mark.parametrize("header", INVALID_HEADERS)
async def test_an_invalid_header_is_ignored_as_w3c_says(
    app: App, backend: RecordingServer, content_type: str, header: str
) -> None:
    ids = await push(app, b'{"payload": 1}', {"Content-Type": content_type, "traceparent": header})
    (trace,) = await delivered_traces(backend, ids)
    assert trace != HEADER_TRACE and trace.upper() != HEADER_TRACE.upper()
    assert trace != "0" * 32


async def test_a_later_version_with_more_fields_is_read(app: App, backend: RecordingServer) -> None:
    """A version after 00 may add fields: its trace id is still the jobs' trace."""
    header = f"01-{HEADER_TRACE}-b7ad6b7169203331-01-what-comes-next"
    ids = await push(
        app, b'{"payload": 1}', {"Content-Type": "application/json", "traceparent": header}
    )
    assert await delivered_traces(backend, ids) == [HEADER_TRACE]


async def test_an_invalid_trace_a_job_names_is_a_400(app: App) -> None:
    body = b'{"payload": 1, "traceparent": "00-%s-b7ad6b7169203331-01"}' % (b"0" * 32)
    status, answer = await trio.to_thread.run_sync(
        post, app, body, {"Content-Type": "application/json"}
    )
    assert status == 400, answer
    assert app.store is not None
    assert (await app.store.stats("orders", "email")).pushed_total == 0


async def test_openapi_documents_the_header_on_both_push_paths(app: App) -> None:
    def get() -> dict[str, object]:
        url = f"http://{app.http_address}/openapi.json"
        with urllib.request.urlopen(url, timeout=10) as response:
            document: dict[str, object] = json.loads(response.read())
            return document

    document = await trio.to_thread.run_sync(get)
    paths = document["paths"]
    assert isinstance(paths, dict)
    for path in ("/v1/queues/{queue}/jobs", "/v1/queues/{queue}/{topic}/jobs"):
        headers = [p["name"] for p in paths[path]["post"]["parameters"] if p["in"] == "header"]
        assert headers == ["traceparent"], path
