"""Group commit: pushes from many producers share store calls, and each producer still gets
the ids and counts of its own jobs, not its neighbours' (the store call's result is shared,
and each push reads its own part of it)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway.app import App
from gateway.resp import encode_command
from tests.gateway.test_producer_http import call
from tests.gateway.test_producer_protocol import CountingPushes
from tests.support.daemon import running_daemon, write_config

QUEUES = {
    "held": """\
        queue: held
        topics:
          t:
            backend: fastcgi://127.0.0.1:9
            script: /srv/app/index.php
            paused: true
        """,
}
PRODUCERS = 40
ROUNDS = 3


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with running_daemon(write_config(tmp_path, QUEUES)) as app:
        yield app


async def test_merged_resp_pushes_each_answer_with_their_own_ids(app: App) -> None:
    pushes = CountingPushes(app)
    host, _, port = app.resp_address.rpartition(":")
    answers: dict[bytes, bytes] = {}  # payload -> the id or count its producer was sent

    async def producer(n: int) -> None:
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            for round_ in range(ROUNDS):
                auto, two = f"auto-{n}-{round_}".encode(), f"two-{n}-{round_}".encode()
                # One read of three pushes, so a store call carries several of one producer's
                # requests as well as other producers'.
                await stream.send_all(
                    encode_command("XADD", "held", "*", "payload", auto)
                    + encode_command("LPUSH", "held", two + b"a", two + b"b")
                    + encode_command("XADD", "held", f"mine-{n}-{round_}", "payload", b"x" + auto)
                )
                received = b""
                while received.count(b"\r\n") < 4:  # $26, the id; :2; $len, the id ...
                    received += await stream.receive_some(4096)
                while received.count(b"\r\n") < 5:
                    received += await stream.receive_some(4096)
                lines = received.split(b"\r\n")
                answers[auto], answers[two], answers[b"x" + auto] = lines[1], lines[2], lines[4]

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(PRODUCERS):
                nursery.start_soon(producer, n)

    assert len(answers) == PRODUCERS * ROUNDS * 3
    calls = [jobs for _, jobs in pushes.calls]
    assert max(calls) > 4, f"no store call merged producers' pushes: {calls}"
    assert sum(calls) == PRODUCERS * ROUNDS * 4
    assert app.store is not None
    for n in range(PRODUCERS):
        for round_ in range(ROUNDS):
            auto = f"auto-{n}-{round_}".encode()
            assert answers[f"two-{n}-{round_}".encode()] == b":2"
            assert answers[b"x" + auto] == f"mine-{n}-{round_}".encode()
            (record,) = await app.store.get_job(answers[auto].decode())
            assert record.payload == auto  # the id it was given is its own job's


async def test_merged_http_pushes_each_answer_with_their_own_ids(app: App) -> None:
    pushes = CountingPushes(app)
    ids: dict[bytes, str] = {}

    def producer(n: int) -> None:
        payloads = [f"http-{n}-{i}".encode() for i in range(n % 3 + 1)]
        body = json.dumps({"jobs": [{"payload": p.decode()} for p in payloads]}).encode()
        headers = {"Content-Type": "application/json"}
        status, answer, _ = call(app, "POST", "/v1/queues/held/jobs", body, headers)
        assert status == 202, answer
        assert isinstance(answer["ids"], list)
        ids.update(zip(payloads, answer["ids"], strict=True))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(PRODUCERS):
                nursery.start_soon(trio.to_thread.run_sync, producer, n)

    assert len(ids) == sum(n % 3 + 1 for n in range(PRODUCERS))
    calls = [jobs for _, jobs in pushes.calls]
    assert len(calls) < PRODUCERS, f"no store call merged producers' pushes: {calls}"
    assert app.store is not None
    for payload, job_id in ids.items():
        (record,) = await app.store.get_job(job_id)
        assert record.payload == payload
