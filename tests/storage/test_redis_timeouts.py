"""The Redis store's timeouts, set in the store URL (``?timeout=…&connect_timeout=…``), hold
against real servers: a frozen redis-server (SIGSTOP) and a port that accepts and never answers.
"""

from __future__ import annotations

import signal
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from adapters.storage.base import Store
from adapters.storage.errors import StoreUnavailable, StoreUncertain
from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from gateway.app import open_store
from gateway.config import parse_store
from tests.gateway.test_startup_errors import check_config
from tests.support.redis import RedisCluster, RedisServer
from tests.support.stores import running_store

ROUTES = [("email", Filter())]


@asynccontextmanager
async def store_at(url: str, directory: Path) -> AsyncIterator[Store]:
    """The store a daemon configured with ``store: url`` opens, running."""
    async with running_store(await open_store(parse_store(url, str(directory)))) as store:
        yield store


@contextmanager
def frozen(*servers: RedisServer) -> Iterator[None]:
    """The servers stopped (SIGSTOP): connections stay open, nothing is answered."""
    processes = [server.process for server in servers]
    assert all(process is not None for process in processes)
    try:
        for process in processes:
            assert process is not None
            process.send_signal(signal.SIGSTOP)
        yield
    finally:
        for process in processes:
            assert process is not None
            process.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("option", ["timeout=300ms", "socket_timeout=0.3"])
async def test_the_url_timeout_bounds_a_call_to_a_frozen_redis(
    redis: RedisServer, tmp_path: Path, option: str
) -> None:
    url = f"redis://127.0.0.1:{redis.port}/0?{option}"
    async with store_at(url, tmp_path) as store:
        await store.push("orders", ROUTES, [NewJob(b"warm-up")])  # connected, scripts loaded
        with frozen(redis):
            # The default (10s) would trip the guard: the URL's 300ms is what applies.
            with trio.fail_after(3):
                started = trio.current_time()
                with pytest.raises(StoreUncertain, match=r"no answer within 0\.3s"):
                    await store.push("orders", ROUTES, [NewJob(b"late")])
                assert 0.3 <= trio.current_time() - started < 2
                with pytest.raises(StoreUnavailable, match=r"within 0\.3s"):
                    await store.check()  # /readyz's question, bounded the same way


async def test_the_url_timeout_reaches_every_cluster_node(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    redis_cluster.flush()
    seeds = ",".join(f"127.0.0.1:{node.port}" for node in redis_cluster.nodes)
    async with store_at(f"redis+cluster://{seeds}?timeout=300ms", tmp_path) as store:
        queues = [f"queue{i}" for i in range(12)]  # spread over the three masters
        for queue in queues:
            await store.push(queue, ROUTES, [NewJob(b"warm-up")])
        # Frozen for well under the cluster's node timeout (2s): no node is marked failing.
        with frozen(*redis_cluster.nodes), trio.fail_after(3):
            for queue in queues[:3]:
                started = trio.current_time()
                with pytest.raises(StoreUnavailable, match=r"within 0\.3s"):
                    await store.push(queue, ROUTES, [NewJob(b"late")])
                assert trio.current_time() - started < 1


async def test_the_url_connect_timeout_bounds_each_connection_attempt(tmp_path: Path) -> None:
    # A port that accepts connections and never answers: each attempt gives up after the
    # URL's 100ms and the call tries again until its own 1s deadline. With the default
    # connect timeout (5s) the first attempt would use the whole second.
    attempts: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        attempts.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), silent, 0)
        port = listener.socket.getsockname()[1]
        url = f"redis://127.0.0.1:{port}/0?timeout=1s&connect_timeout=100ms"
        with trio.fail_after(3):
            started = trio.current_time()
            with pytest.raises(StoreUnavailable):
                await open_store(parse_store(url, str(tmp_path)))
            elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert 0.1 <= elapsed < 2
    assert len(attempts) >= 3, f"{len(attempts)} connection attempts in {elapsed:.2f}s"


async def test_the_url_connect_timeout_bounds_the_wake_up_subscription(
    redis: RedisServer, tmp_path: Path
) -> None:
    # The subscription has a connection of its own, bounded by the connect timeout alone: a
    # Redis that froze after the store was opened fails the start within it.
    url = f"redis://127.0.0.1:{redis.port}/0?connect_timeout=200ms"
    store = await open_store(parse_store(url, str(tmp_path)))
    try:
        with frozen(redis), trio.fail_after(3):
            started = trio.current_time()
            expected = pytest.RaisesExc(StoreUnavailable, match=r"not connected within 0\.2s")
            with pytest.RaisesGroup(expected, flatten_subgroups=True):
                async with trio.open_nursery() as nursery:
                    await nursery.start(store.run)
            assert 0.2 <= trio.current_time() - started < 2
    finally:
        await store.aclose()


def test_check_config_prints_the_store_options_and_not_the_password(tmp_path: Path) -> None:
    config = tmp_path / "busgate.yaml"
    store = "redis://app:hunter2@127.0.0.1:6379/0?timeout=30s&connect_timeout=2s"
    config.write_text(f"store: '{store}'\nlisten: {{resp: '127.0.0.1:0', http: '127.0.0.1:0'}}\n")
    done = check_config(config)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert (
        "store: redis://app:********@127.0.0.1:6379/0?timeout=30s&connect_timeout=2s\n"
        in done.stdout
    )


def test_check_config_names_a_wrong_store_option(tmp_path: Path) -> None:
    config = tmp_path / "busgate.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            listen: {resp: '127.0.0.1:0', http: '127.0.0.1:0'}
            store: 'redis://:hunter2@127.0.0.1:6379/0?conect_timeout=2s'
            """
        )
    )
    done = check_config(config)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"busgate: configuration error: {config}:2: store:"
        " 'redis://:********@127.0.0.1:6379/0?conect_timeout=********': unknown option"
        " 'conect_timeout'; did you mean 'connect_timeout'?"
        " (the options are timeout and connect_timeout, durations such as 30s or 500ms)\n"
    )
