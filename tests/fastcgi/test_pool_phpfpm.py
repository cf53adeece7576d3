"""The connection pool against a real php-fpm master, over TCP and a unix socket."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from functools import partial
from pathlib import Path

import pytest
import trio

from fastcgi.address import Address
from fastcgi.connection import Limits
from fastcgi.errors import ConnectError, ConnectionLost, ReadTimeout
from fastcgi.pool import ConnectionPool, PoolLimits, Timeouts
from tests.fastcgi.cgi_env import cgi_env
from tests.support.phpfpm import PhpFpm


@pytest.fixture(params=["tcp", "unix"])
def fpm(request: pytest.FixtureRequest) -> PhpFpm:
    name = "php_fpm" if request.param == "tcp" else "php_fpm_unix"
    fpm: PhpFpm = request.getfixturevalue(name)
    return fpm


@pytest.mark.parametrize("size", [0, 1024, 200 * 1024, 5 * 1024 * 1024])
async def test_bodies_arrive_byte_exact(fpm: PhpFpm, size: int) -> None:
    body = os.urandom(size)
    digest = hashlib.sha256(body).hexdigest()
    async with ConnectionPool(fpm.address) as pool:
        response = await pool.request(
            cgi_env(fpm.script("echo.php"), body, x_expect_sha256=digest), body
        )
    assert response.status == 200
    report = json.loads(response.body)
    assert report["length"] == size
    assert report["match"] is True
    assert report["server"]["CONTENT_LENGTH"] == str(size)


async def test_warnings_come_back_on_stderr_not_in_the_body(fpm: PhpFpm) -> None:
    async with ConnectionPool(fpm.address) as pool:
        response = await pool.request(cgi_env(fpm.script("warn.php")))
    assert response.status == 200
    assert response.body == b"body after warnings"
    assert b"PHP Warning:  careful with that job" in response.stderr
    assert b"written with error_log" in response.stderr
    assert b"careful" not in response.body


async def test_megabytes_of_warnings_are_cut_not_a_failure(fpm: PhpFpm) -> None:
    async with ConnectionPool(fpm.address, limits=PoolLimits(max_connections=1)) as pool:
        flooded = await pool.request(cgi_env(fpm.script("warn_flood.php")))
        after = await pool.request(cgi_env(fpm.script("warn.php")))  # on the same connection
        stats = pool.statistics()
    assert (flooded.status, flooded.body) == (200, b"done after warnings")
    assert len(flooded.stderr) == Limits().max_stderr  # the first MiB is kept
    assert after.body == b"body after warnings"
    assert (stats.opened_total, stats.failures_total) == (1, 0)


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_children_recycled_after_max_requests_cost_no_failure(
    tmp_path: Path, unix: bool
) -> None:
    # Each child leaves after two requests and closes its kept-alive connection right after
    # its last answer: a connection reused at once is found closed, and the request goes
    # again on a new one, without a failure and without running twice.
    record = tmp_path / "record.jsonl"
    fpm = PhpFpm(
        tmp_path / "fpm",
        unix=unix,
        max_children=2,
        env={"BUSGATE_RECORD": str(record)},
        extra_pool_lines=("pm.max_requests = 2",),
    )
    fpm.start()
    try:
        async with ConnectionPool(fpm.address, limits=PoolLimits(max_connections=2)) as pool:

            async def worker(n: int) -> None:
                for i in range(30):
                    body = b'{"n": %d}' % (n * 100 + i)
                    response = await pool.request(cgi_env(fpm.script("record.php"), body), body)
                    assert response.status == 200

            async with trio.open_nursery() as nursery:
                for n in range(2):
                    nursery.start_soon(worker, n)
            stats = pool.statistics()
    finally:
        fpm.stop()
    assert stats.failures_total == 0
    assert len(record.read_text().splitlines()) == 60  # each ran once
    assert stats.opened_total >= 20  # the children did recycle


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_a_pool_takes_the_worker_another_pool_keeps_idle(tmp_path: Path, unix: bool) -> None:
    # Two topics delivering to one php-fpm pool of two children.  The first kept both
    # children on its idle connections; the second's new connection would wait in php-fpm's
    # listen queue until the first's idle timeout (a minute here) had the first not let one go.
    fpm = PhpFpm(tmp_path / "fpm", unix=unix, max_children=2)
    fpm.start()
    limits = PoolLimits(max_connections=2, idle_timeout=60)
    noop = cgi_env(fpm.script("noop.php"))
    try:
        async with (
            ConnectionPool(fpm.address, limits=limits) as first,
            ConnectionPool(fpm.address, limits=limits) as second,
        ):
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(first.request, noop)
            assert first.statistics().idle == 2
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    for _ in range(2):
                        nursery.start_soon(partial(second.request, noop, read_timeout=2))
            assert first.statistics().idle == 0
            assert second.statistics().failures_total == 0
            # And back: the first pool takes its workers from the second's idle connections.
            with trio.fail_after(5):
                await first.request(noop, read_timeout=2)
            assert second.statistics().idle == 1
    finally:
        fpm.stop()


async def test_pools_sharing_a_php_fpm_with_children_to_spare_keep_their_connections(
    php_fpm: PhpFpm,
) -> None:
    # Busy by turns, with a child free for every connection: nobody's connection is let go.
    limits = PoolLimits(max_connections=2, idle_timeout=60)
    noop = cgi_env(php_fpm.script("noop.php"))
    async with (
        ConnectionPool(php_fpm.address, limits=limits) as first,
        ConnectionPool(php_fpm.address, limits=limits) as second,
    ):
        for _ in range(20):
            for pool in (first, second):
                async with trio.open_nursery() as nursery:
                    for _ in range(2):
                        nursery.start_soon(pool.request, noop)
        assert (first.statistics().opened_total, second.statistics().opened_total) == (2, 2)


async def test_failure_statuses(fpm: PhpFpm) -> None:
    async with ConnectionPool(fpm.address) as pool:
        failed = await pool.request(cgi_env(fpm.script("status500.php")))
        exited = await pool.request(cgi_env(fpm.script("exit1.php")))
        fatal = await pool.request(cgi_env(fpm.script("fatal.php")))
        missing = await pool.request(cgi_env(fpm.script("no-such-script.php")))
        stats = pool.statistics()
    assert (failed.status, failed.body) == (500, b"failed on purpose")
    # php-fpm does not pass exit codes on: exit(1) is a normal 200 response.
    assert (exited.status, exited.body, exited.app_status) == (200, b"exiting with 1", 0)
    assert fatal.status == 500
    assert b"PHP Fatal error:  Uncaught Error: Call to undefined function" in fatal.stderr
    assert missing.status == 404
    assert b"Primary script unknown" in missing.stderr
    # None of these broke the connection: all four went over one kept-alive socket.
    assert stats.opened_total == 1 and stats.open == 1


async def test_timeout_closes_the_connection_and_the_pool_keeps_working(fpm: PhpFpm) -> None:
    async with ConnectionPool(fpm.address, timeouts=Timeouts(read=0.3)) as pool:
        with pytest.raises(ReadTimeout, match=r"no complete response within 0.3s") as caught:
            await pool.request(cgi_env(fpm.script("sleep.php"), x_sleep_ms="3000"))
        assert str(fpm.address) in str(caught.value)
        stats = pool.statistics()
        assert (stats.open, stats.in_use, stats.timeouts_total) == (0, 0, 1)
        response = await pool.request(cgi_env(fpm.script("echo.php")))
        assert response.status == 200
        # A per-request read timeout overrides the pool's.
        slow = await pool.request(
            cgi_env(fpm.script("sleep.php"), x_sleep_ms="500"), read_timeout=5
        )
        assert slow.body == b"slept"


async def test_connection_cap_holds_under_load(fpm: PhpFpm) -> None:
    limits = PoolLimits(max_connections=3)
    peak_open = 0
    peak_waiting = 0
    async with ConnectionPool(fpm.address, limits=limits) as pool:

        async def one() -> None:
            response = await pool.request(cgi_env(fpm.script("sleep.php"), x_sleep_ms="50"))
            assert response.status == 200

        async def watch() -> None:
            nonlocal peak_open, peak_waiting
            while True:
                stats = pool.statistics()
                peak_open = max(peak_open, stats.open)
                peak_waiting = max(peak_waiting, stats.waiting)
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as workers:
                for _ in range(15):
                    workers.start_soon(one)
            nursery.cancel_scope.cancel()
        stats = pool.statistics()
    assert peak_open == 3
    assert peak_waiting > 0
    assert stats.opened_total == 3
    assert stats.requests_total == 15 and stats.failures_total == 0


async def test_max_requests_and_max_age_recycle_connections(php_fpm: PhpFpm) -> None:
    async with ConnectionPool(php_fpm.address, limits=PoolLimits(max_requests=3)) as pool:
        for _ in range(10):
            await pool.request(cgi_env(php_fpm.script("noop.php")))
        assert pool.statistics().opened_total == 4  # 3 + 3 + 3 + 1
    async with ConnectionPool(php_fpm.address, limits=PoolLimits(max_age=0.1)) as pool:
        await pool.request(cgi_env(php_fpm.script("noop.php")))
        await trio.sleep(0.15)
        await pool.request(cgi_env(php_fpm.script("noop.php")))
        assert pool.statistics().opened_total == 2


async def test_idle_connections_are_closed_by_the_reaper(php_fpm: PhpFpm) -> None:
    # A pool run by its owner rather than by `async with`, as FastCGIBackend does.
    pool = ConnectionPool(php_fpm.address, limits=PoolLimits(idle_timeout=0.2))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        async with trio.open_nursery() as burst:
            for _ in range(4):
                burst.start_soon(
                    pool.request, cgi_env(php_fpm.script("sleep.php"), x_sleep_ms="20")
                )
        assert pool.statistics().idle == 4
        await trio.sleep(0.5)
        stats = pool.statistics()
        assert (stats.open, stats.closed_total) == (0, 4)
        await pool.aclose()


async def test_cancelled_request_discards_its_connection(php_fpm: PhpFpm) -> None:
    async with ConnectionPool(php_fpm.address) as pool:
        with trio.move_on_after(0.2):
            await pool.request(cgi_env(php_fpm.script("sleep.php"), x_sleep_ms="1000"))
        stats = pool.statistics()
        assert (stats.open, stats.in_use, stats.closed_total) == (0, 0, 1)
        assert (await pool.request(cgi_env(php_fpm.script("noop.php")))).status == 200


async def test_ten_thousand_requests_over_eight_connections(php_fpm: PhpFpm) -> None:
    total, workers = 10_000, 8
    async with ConnectionPool(php_fpm.address, limits=PoolLimits(max_connections=8)) as pool:
        env = cgi_env(php_fpm.script("noop.php"))

        async def worker(count: int) -> None:
            for _ in range(count):
                response = await pool.request(env)
                assert response.status == 200

        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker, total // workers)
        assert pool.statistics().idle == 8
    stats = pool.statistics()  # after aclose(): nothing may be left open
    assert stats.requests_total == total and stats.failures_total == 0
    assert stats.opened_total == 8 and stats.open == 0 and stats.closed_total == 8


async def test_pool_reconnects_after_php_fpm_restarts(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    fpm = PhpFpm(Path(tmp_path) / "restart")
    fpm.start()
    try:
        async with ConnectionPool(fpm.address, timeouts=Timeouts(connect=1)) as pool:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(
                        pool.request, cgi_env(fpm.script("sleep.php"), x_sleep_ms="20")
                    )
            assert pool.statistics().idle == 4
            await trio.to_thread.run_sync(fpm.stop)
            with pytest.raises(ConnectError, match=str(fpm.address.port)):
                await pool.request(cgi_env(fpm.script("noop.php")))
            await trio.to_thread.run_sync(fpm.start)
            # The four idle sockets are dead (EOF); the pool notices before reuse.
            for _ in range(20):
                response = await pool.request(cgi_env(fpm.script("noop.php")))
                assert response.status == 200
            stats = pool.statistics()
            assert stats.failures_total == 1
            assert stats.closed_total >= 4
    finally:
        fpm.stop()


async def test_backend_not_listening_names_the_address(tmp_path: os.PathLike[str]) -> None:
    from tests.support.ports import free_port

    port = free_port()
    async with ConnectionPool(Address(host="127.0.0.1", port=port)) as pool:
        with pytest.raises(ConnectError, match=rf"fastcgi://127\.0\.0\.1:{port}: cannot connect"):
            await pool.request({})
    path = f"{tmp_path}/nobody.sock"
    async with ConnectionPool(Address(path=path)) as pool:
        with pytest.raises(ConnectError, match=rf"fastcgi\+unix://{path}: cannot connect"):
            await pool.request({})
        assert pool.statistics().open == 0


async def test_get_values_from_php_fpm(php_fpm: PhpFpm) -> None:
    async with ConnectionPool(php_fpm.address) as pool:
        values = await pool.get_values([b"FCGI_MPXS_CONNS"])
        assert values == {b"FCGI_MPXS_CONNS": b"0"}  # php-fpm does not multiplex
        # The connection is still good for requests afterwards.
        assert (await pool.request(cgi_env(php_fpm.script("noop.php")))).status == 200
        assert pool.statistics().opened_total == 1


async def test_a_pool_that_is_not_running_refuses_requests(php_fpm: PhpFpm) -> None:
    # Its deadlines would not be enforced: run() is what enforces them.
    pool = ConnectionPool(php_fpm.address)
    with pytest.raises(RuntimeError, match="not running"):
        await pool.request(cgi_env(php_fpm.script("noop.php")))
    assert pool.statistics().opened_total == 0


async def test_deadlines_of_concurrent_requests_are_each_enforced(php_fpm: PhpFpm) -> None:
    # One timer serves every in-flight request: a short deadline armed after a long one
    # must still fire on time, and requests that finish in time are not touched.
    async with ConnectionPool(php_fpm.address, timeouts=Timeouts(read=5)) as pool:
        outcomes: dict[str, object] = {}

        async def call(name: str, sleep_ms: int, read: float) -> None:
            env = cgi_env(php_fpm.script("sleep.php"), x_sleep_ms=str(sleep_ms))
            try:
                outcomes[name] = (await pool.request(env, read_timeout=read)).status
            except ReadTimeout as exc:
                outcomes[name] = exc

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "long-ok", 300, 5.0)
            await trio.sleep(0.05)
            nursery.start_soon(call, "short-late", 2000, 0.2)
            nursery.start_soon(call, "short-ok", 50, 0.2)
        assert outcomes["long-ok"] == 200 and outcomes["short-ok"] == 200
        assert isinstance(outcomes["short-late"], ReadTimeout)
        assert "0.2s" in str(outcomes["short-late"])
        assert trio.current_time() - started < 1.5  # not the 2 s the script sleeps
        stats = pool.statistics()
        assert (stats.timeouts_total, stats.open) == (1, 2)


async def test_a_worker_killed_mid_request_is_a_lost_connection(tmp_path: Path) -> None:
    """php-fpm's child dies under a request (a crash, request_terminate_timeout): the pool
    reports a lost connection, and the next request gets a fresh child."""
    fpm = PhpFpm(tmp_path, max_children=1)
    fpm.start()
    try:
        assert fpm.process is not None
        master = fpm.process.pid
        async with ConnectionPool(fpm.address) as pool:

            async def kill_the_child() -> None:
                await trio.sleep(0.3)  # sleep.php has begun its 2 s
                children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
                for child in children:
                    os.kill(int(child), signal.SIGKILL)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_the_child)
                # A reset or an EOF, depending on what the child left unread: lost, both.
                with pytest.raises(ConnectionLost):
                    await pool.request(cgi_env(fpm.script("sleep.php")))
            after = await pool.request(cgi_env(fpm.script("noop.php")))
            assert after.status == 200
    finally:
        fpm.stop()
