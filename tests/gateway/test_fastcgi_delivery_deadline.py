"""The job's deadline in the FastCGI adapter: a timeout spends an attempt only once the
request is on its way to php-fpm; nor does a full listen queue.  What a 3xx says.  And a
script that answers early and works on (``keep_alive``)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from adapters.delivery.base import Failure, running
from adapters.delivery.fastcgi import FastCGIBackend, FastCGITarget
from adapters.storage.jobs import Job, Priority, new_job_id, new_trace_id
from fastcgi.address import Address, parse_address
from tests.support.phpfpm import PhpFpm
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


async def test_a_full_unix_listen_queue_spends_no_attempt(tmp_path: Path) -> None:
    # php-fpm on a unix socket, every child busy and its listen queue full: connect() says
    # EAGAIN, which trio takes for "in progress", then reports connected.  The request went
    # nowhere ("Transport endpoint is not connected"), as a lost connection: an attempt
    # spent, and jobs dead in a second without php seeing them.
    path = str(tmp_path / "fpm.sock")
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as filler:
        listener.bind(path)
        listener.listen(0)  # never accepts: the queue holds one connection
        filler.connect(path)  # and this one fills it
        backend = FastCGIBackend(FastCGITarget(Address(path=path), "/srv/index.php", timeout=2))
        async with running(backend):
            delivery = await backend.deliver(job())
    assert delivery.failure is Failure.CONNECT and delivery.failure.job_never_ran, delivery
    assert "listen queue is full" in delivery.message, delivery.message


async def test_a_redirect_says_where_it_pointed(php_fpm_unix: PhpFpm) -> None:
    # As the HTTP adapter says it: busgate does not follow it, the operator must see where.
    target = FastCGITarget(
        php_fpm_unix.address,
        php_fpm_unix.script("redirect.php"),
        host="app.example",
        uri="/jobs/run",
    )
    backend = FastCGIBackend(target)
    async with running(backend):
        delivery = await backend.deliver(job())
    assert delivery.status == 302
    assert delivery.message == "302 Found -> http://app.example/login?next=%2Fjobs"


@pytest.mark.parametrize("keep_alive", [True, False])
async def test_keep_alive_false_for_scripts_that_answer_early(
    php_fpm_unix: PhpFpm, keep_alive: bool
) -> None:
    # fastcgi_finish_request() ends the answer, and the php-fpm child works on, keeping the
    # connection: the next job sent on it waited 1.5 s for that work, counted in its
    # duration (and its timeout: a job could time out before its script started).  A
    # connection per job is accepted by a free child.
    target = FastCGITarget(
        php_fpm_unix.address,
        php_fpm_unix.script("finish_early.php"),
        max_connections=1,
        keep_alive=keep_alive,
    )
    backend = FastCGIBackend(target)
    async with running(backend):
        first = await backend.deliver(job())
        second = await backend.deliver(job())
    assert (first.status, second.status) == (200, 200)
    assert first.duration < 0.5
    if keep_alive:
        assert second.duration > 1.0  # what keep_alive: false is for
    else:
        assert second.duration < 0.5, second.duration
    assert backend.pool.statistics().opened_total == (1 if keep_alive else 2)
