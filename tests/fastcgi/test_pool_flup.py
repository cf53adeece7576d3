"""The pool against flup (the bundled sample backend) over a unix socket."""

from __future__ import annotations

import base64
import json
import os

import trio

from fastcgi.pool import ConnectionPool
from tests.conftest import SampleBackend
from tests.fastcgi.cgi_env import cgi_env


async def test_flup_round_trip_and_keep_alive(sample_backend: SampleBackend) -> None:
    bodies = [b"", b"x" * 1024, os.urandom(200 * 1024), os.urandom(5 * 1024 * 1024)]
    async with ConnectionPool(sample_backend.address) as pool:
        for body in bodies:
            response = await pool.request(cgi_env("/app/job.py", body, x_busgate_job_id="j"), body)
            assert response.status == 200
            assert response.body == b"recorded\n"
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(pool.request, cgi_env("/app/job.py"))
        stats = pool.statistics()
    assert stats.failures_total == 0
    assert stats.opened_total <= 8
    lines = [json.loads(line) for line in sample_backend.record.read_text().splitlines()]
    assert [base64.b64decode(line["body_b64"]) for line in lines[:4]] == bodies
    assert lines[0]["server"]["HTTP_X_BUSGATE_JOB_ID"] == "j"
    assert len(lines) == 12


async def test_flup_error_status(sample_backend: SampleBackend) -> None:
    body = b'{"respond_status": 503}'
    async with ConnectionPool(sample_backend.address) as pool:
        response = await pool.request(cgi_env("/app/job.py", body), body)
    assert response.status == 503
