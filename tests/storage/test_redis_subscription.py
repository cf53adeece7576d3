"""The wake-up subscription notices a dead connection: a heartbeat PING, answered within the
command timeout, or the connection is replaced.  Against a real redis-server, through a TCP
proxy that can go silent the way a NAT or firewall that forgot a flow does (no RST, no data),
and a redis-server frozen with SIGSTOP.
"""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial

import pytest
import trio

from adapters.storage.doorbell import Doorbells
from adapters.storage.errors import StoreUnavailable
from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from adapters.storage.redis_client import RedisAddress, RedisClient
from adapters.storage.redis_routing import Router, Standalone
from adapters.storage.redis_store import RedisStore
from tests.support.redis import RedisServer
from tests.support.stores import running_store

ROUTES = [("email", Filter())]
WAKE = b"bg:{*}:wake"
#: Short enough that a test waits about a second for a dead subscription to be replaced;
#: the dispatcher's recheck (5 s) is longer than every window measured here.
HEARTBEAT = 0.5
TIMEOUT = 0.5


class Flow:
    """One proxied connection; ``silent`` drops what either side sends, closing nothing."""

    def __init__(self) -> None:
        self.silent = False
        self.closed_by_client = False


class SilenceableProxy:
    """A TCP proxy to a Redis server that can go silent on the connections it carries.

    ``silence()`` affects the connections open at that moment only, as a middlebox that lost
    its state does: new connections go through.  ``silence_after`` makes a connection go
    silent as soon as the client sends those bytes (Redis never sees them).
    """

    def __init__(self, target: RedisAddress, *, silence_after: bytes | None = None) -> None:
        self.target = target
        self.silence_after = silence_after
        self.flows: list[Flow] = []
        self.port = 0

    @property
    def address(self) -> RedisAddress:
        return RedisAddress("127.0.0.1", self.port)

    def silence(self) -> None:
        for flow in self.flows:
            flow.silent = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, client: trio.SocketStream) -> None:
        flow = Flow()
        self.flows.append(flow)
        upstream = await trio.open_tcp_stream(self.target.host, self.target.port)
        async with client, upstream, trio.open_nursery() as nursery:

            async def from_client() -> None:
                await self._pump(client, upstream, flow, self.silence_after)
                flow.closed_by_client = True
                nursery.cancel_scope.cancel()

            async def from_server() -> None:
                await self._pump(upstream, client, flow, None)
                nursery.cancel_scope.cancel()

            nursery.start_soon(from_client)
            nursery.start_soon(from_server)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, flow: Flow, trigger: bytes | None
    ) -> None:
        while data := await source.receive_some(65536):
            if trigger is not None and trigger in data:
                flow.silent = True
            if not flow.silent:
                await sink.send_all(data)


@asynccontextmanager
async def proxy_to(
    server: RedisServer, *, silence_after: bytes | None = None
) -> AsyncIterator[SilenceableProxy]:
    proxy = SilenceableProxy(server.address, silence_after=silence_after)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()


def opened(router: Router) -> AbstractAsyncContextManager[RedisStore]:
    return running_store(RedisStore(router))


class Subscriber:
    """A bare ``listen`` on a router: what it heard, and how many times it subscribed."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.subscriptions = 0

    def on_message(self, channel: bytes, data: bytes) -> None:
        self.messages.append((channel, data))

    def on_subscribed(self) -> None:
        self.subscriptions += 1


@asynccontextmanager
async def subscribed(router: Router) -> AsyncIterator[Subscriber]:
    subscriber = Subscriber()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                router.listen, WAKE, subscriber.on_message, on_subscribed=subscriber.on_subscribed
            )
        )
        try:
            yield subscriber
        finally:
            await router.aclose()
            nursery.cancel_scope.cancel()


def router(address: RedisAddress) -> Standalone:
    return Standalone(RedisClient(address, command_timeout=TIMEOUT), heartbeat=HEARTBEAT)


def pings(server: RedisServer) -> int:
    found = re.search(r"cmdstat_ping:calls=(\d+)", server.cli("INFO", "commandstats"))
    return int(found.group(1)) if found else 0


async def until(condition: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``condition()`` holds, polled; fails the test after ``seconds``."""
    started = trio.current_time()
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.02)
    return trio.current_time() - started


async def test_a_silently_dropped_subscription_is_replaced_within_heartbeat_and_timeout(
    redis: RedisServer,
) -> None:
    # Host A reaches Redis through a middlebox that then forgets A's connections: no RST,
    # nothing delivered either way.  Host B pushes directly; only A's subscription can ring
    # A's doorbell.
    async with (
        proxy_to(redis) as proxy,
        opened(router(proxy.address)) as host_a,
        opened(Standalone(RedisClient(redis.address))) as host_b,
    ):
        await host_b.push("orders", ROUTES, [NewJob(b"before")])
        with trio.fail_after(2):
            assert await host_a.wait_for_jobs("orders", "email")
        (subscription,) = [f for f in proxy.flows if not f.closed_by_client]
        proxy.silence()

        async with trio.open_nursery() as nursery:

            async def push_until_heard() -> None:
                while True:
                    await host_b.push("orders", ROUTES, [NewJob(b"after")])
                    await trio.sleep(0.1)

            nursery.start_soon(push_until_heard)
            started = trio.current_time()
            # 4 s: shorter than the dispatcher's recheck, which would hide a dead subscription.
            heard = await host_a.wait_for_jobs("orders", "email", started + 4)
            waited = trio.current_time() - started
            nursery.cancel_scope.cancel()
        assert heard, "a push on host B never woke host A: its subscription is dead"
        # One heartbeat of silence, then the PING's timeout, then a reconnect.
        assert waited < HEARTBEAT + TIMEOUT + 1.5
        await until(lambda: subscription.closed_by_client, 1)  # the dead one is not kept


async def test_an_unconfirmed_psubscribe_fails_the_start_within_the_timeout(
    redis: RedisServer,
) -> None:
    # Connected and logged in, then nothing: the PSUBSCRIBE confirmation has a deadline.
    async with proxy_to(redis, silence_after=b"PSUBSCRIBE") as proxy:
        store = RedisStore(router(proxy.address))
        try:
            with trio.fail_after(3):
                started = trio.current_time()
                expected = pytest.RaisesExc(
                    StoreUnavailable, match=r"did not answer PSUBSCRIBE within 0\.5s"
                )
                with pytest.RaisesGroup(expected, flatten_subgroups=True):
                    async with trio.open_nursery() as nursery:
                        await nursery.start(store.run)
                assert TIMEOUT <= trio.current_time() - started < 2
        finally:
            await store.aclose()


async def test_a_frozen_redis_is_noticed_and_the_subscription_is_back_after_sigcont(
    redis: RedisServer,
) -> None:
    assert redis.process is not None
    async with subscribed(router(redis.address)) as subscriber:
        assert subscriber.subscriptions == 1
        redis.process.send_signal(signal.SIGSTOP)
        try:
            # Past a heartbeat and its timeout: the listener has given up on the connection
            # and is connecting again (that waits in Redis's accept backlog).
            await trio.sleep(HEARTBEAT + TIMEOUT + 0.5)
        finally:
            redis.process.send_signal(signal.SIGCONT)
        await until(lambda: subscriber.subscriptions == 2, 3)
        publisher = RedisClient(redis.address)
        try:
            assert await publisher.execute("PUBLISH", "bg:{orders}:wake", "email") == 1
        finally:
            await publisher.aclose()
        await until(lambda: subscriber.messages == [(b"bg:{orders}:wake", b"email")], 1)


async def test_the_heartbeat_is_one_ping_per_idle_interval_and_none_while_messages_flow(
    redis: RedisServer,
) -> None:
    async with subscribed(router(redis.address)) as subscriber:
        before = pings(redis)
        await trio.sleep(4 * HEARTBEAT + 0.2)
        idle = pings(redis) - before
        assert 2 <= idle <= 5, f"{idle} PINGs in four idle intervals"
        publisher = RedisClient(redis.address)
        try:
            before = pings(redis)
            for _ in range(40):  # 2 s of messages, each well within a heartbeat
                await publisher.execute("PUBLISH", "bg:{orders}:wake", "email")
                await trio.sleep(HEARTBEAT / 10)
            busy = pings(redis) - before
        finally:
            await publisher.aclose()
        assert len(subscriber.messages) == 40
        assert busy <= 1, f"{busy} PINGs while messages arrived"
        assert subscriber.subscriptions == 1


async def test_a_ping_refused_by_the_acl_still_proves_the_connection_alive(
    redis: RedisServer,
) -> None:
    # A least-privilege user may lack +ping: the NOPERM error is an answer all the same.
    redis.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all", "-ping")
    client = RedisClient(redis.address, username="app", password="s3cret", command_timeout=TIMEOUT)
    async with subscribed(Standalone(client, heartbeat=HEARTBEAT)) as subscriber:
        await trio.sleep(3 * HEARTBEAT)
        assert subscriber.subscriptions == 1
    refused = redis.cli("ACL", "LOG")  # the PINGs were sent, and refused
    assert "\nobject\nping\nusername\napp\n" in refused
    count = re.match(r"count\n(\d+)\n", refused)
    assert count is not None and int(count.group(1)) >= 2, refused


async def test_ring_all_wakes_every_waiting_topic() -> None:
    bells = Doorbells()
    woken: list[tuple[str, str]] = []

    async def wait(queue: str, topic: str) -> None:
        if await bells[queue, topic].wait(trio.current_time() + 1):
            woken.append((queue, topic))

    async with trio.open_nursery() as nursery:
        for key in [("orders", "email"), ("orders", "search"), ("audit", "log")]:
            nursery.start_soon(wait, *key)
        await trio.sleep(0.01)
        bells.ring_all()
    assert sorted(woken) == [("audit", "log"), ("orders", "email"), ("orders", "search")]


async def test_a_push_made_while_the_subscription_was_down_is_heard_when_it_is_back(
    redis: RedisServer,
) -> None:
    # Host B pushes once, while host A's subscription is silently dead: that PUBLISH is lost
    # to A.  Once A has a new subscription it looks at once, not at its recheck (5 s).
    async with (
        proxy_to(redis) as proxy,
        opened(router(proxy.address)) as host_a,
        opened(Standalone(RedisClient(redis.address))) as host_b,
    ):
        with trio.move_on_after(0.2):
            await host_a.wait_for_jobs("orders", "email")  # A's bell exists, unrung
        proxy.silence()
        await host_b.push("orders", ROUTES, [NewJob(b"while down")])
        started = trio.current_time()
        heard = await host_a.wait_for_jobs("orders", "email", started + 4)
        assert heard and trio.current_time() - started < HEARTBEAT + TIMEOUT + 1.5


async def test_a_wake_message_that_is_not_utf8_is_ignored(redis: RedisServer) -> None:
    # Anyone who may PUBLISH on the Redis could stop every daemon with one byte.
    async with (
        opened(router(redis.address)) as host_a,
        opened(Standalone(RedisClient(redis.address))) as host_b,
    ):
        redis.cli("PUBLISH", "bg:{orders}:wake", "\udcff")
        await trio.sleep(0.2)
        await host_b.push("orders", ROUTES, [NewJob(b"after")])
        with trio.fail_after(2):
            assert await host_a.wait_for_jobs("orders", "email")
        assert [job.payload for job in await host_a.reserve("orders", "email", 1, 30)] == [b"after"]
