"""The job's deadline in the FastCGI adapter: a timeout spends an attempt only once the
request is on its way to php-fpm."""

from __future__ import annotations

import time

from adapters.delivery.base import Failure, running
from adapters.delivery.fastcgi import FastCGIBackend, FastCGITarget
from adapters.storage.jobs import Job, Priority, new_job_id, new_trace_id
from fastcgi.address import parse_address
from tests.support.ports import unanswered_port


def job() -> Job:
    now = time.time()
    return Job(new_job_id(), "q", "t", b"{}", {}, Priority.NORMAL, 1, now, now, new_trace_id())


async def test_a_connect_cut_short_by_the_jobs_timeout_spends_no_attempt() -> None:
    # A php-fpm whose listen backlog is full (every child busy for long, or a host that
    # drops SYNs) never completes the handshake.  With the topic's timeout under the 5 s
    # connect timeout, the attempt was "timeout: no response within 0.5s", spent: the job
    # died after max_attempts without php ever seeing it.
    with unanswered_port() as port:
        address = parse_address(f"fastcgi://127.0.0.1:{port}")
        backend = FastCGIBackend(FastCGITarget(address, "/srv/app/index.php", timeout=0.5))
        async with running(backend):
            delivery = await backend.deliver(job())
    assert delivery.failure is Failure.CONNECT and delivery.failure.job_never_ran
    assert "not connected before the deadline" in delivery.message, delivery.message
    assert 0.45 < delivery.duration < 1.5
