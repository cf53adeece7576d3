"""Where a Redis command goes: one server, or the Redis Cluster node owning the key's slot.

The store sends every command of an operation with one routing key (all keys of a queue share
the hash tag ``{queue}``, hence one slot), so a pipeline or a script always runs on one node.
The cluster router keeps a slot map from ``CLUSTER SLOTS``; ``MOVED`` refreshes it and retries,
``ASK`` (a slot being migrated) sends ``ASKING`` and the commands to the named node once.
Both commands are safe to repeat: a node that answers MOVED or ASK executed nothing.

Wake-ups arrive over one PSUBSCRIBE connection per daemon (``listen``), watched by a heartbeat;
on a cluster it moves to another node when the one it is on fails.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NoReturn, Protocol

import hiredis
import trio

from adapters.storage.errors import StoreUnavailable
from adapters.storage.redis_client import (
    Arg,
    Command,
    RedisAddress,
    RedisClient,
    RedisConnection,
    Script,
    ServerError,
    pack,
)

log = logging.getLogger("busgate.redis")

SLOTS = 16384
_MAX_REDIRECTS = 5
_LISTEN_BACKOFF_START = 0.05
_LISTEN_BACKOFF_MAX = 2.0
_RECEIVE_SIZE = 64 * 1024
#: After this many seconds without a byte from Redis, the subscription sends a PING and
#: expects the answer within the client's command timeout; without one the connection is
#: replaced.  A dead subscription (a partition, a NAT or firewall that forgot the flow, a
#: failover that moved the address) is otherwise never noticed: no RST ever comes, and every
#: wake-up then waits for the dispatcher's 5 s recheck.  15 s bounds that (with the default
#: 10 s timeout) to 25 s, keeps the flow active for middleboxes that expire idle flows after
#: 30 s or more, and costs one PING per idle interval per daemon, none while messages flow.
HEARTBEAT = 15.0
_PING = pack(("PING",))

MessageHandler = Callable[[bytes, bytes], None]
#: Called each time the subscription is confirmed: anything published before it may have been
#: missed, so whatever waits for messages should look again now rather than at its recheck.
SubscribedHandler = Callable[[], None]


def key_slot(key: bytes) -> int:
    """Redis Cluster's slot: CRC16 (XMODEM) of the key, or of its ``{hash tag}``."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


class Router(Protocol):
    async def pipeline(self, key: bytes, commands: Sequence[Command]) -> list[Any]: ...

    async def eval(self, key: bytes, script: Script, args: Sequence[Arg]) -> Any: ...

    async def pipelines(
        self, batches: Sequence[tuple[bytes, Sequence[Command]]]
    ) -> list[list[Any]]:
        """Several keys' command lists, sent as one pipeline per server."""
        ...

    async def execute_everywhere(self, *args: Arg) -> list[Any]: ...

    async def listen(
        self,
        pattern: bytes,
        handler: MessageHandler,
        *,
        on_subscribed: SubscribedHandler | None = None,
        task_status: trio.TaskStatus[None],
    ) -> None: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    async def aclose(self) -> None: ...


async def _eval_on(
    client: RedisClient,
    key: bytes,
    script: Script,
    args: Sequence[Arg],
    prefix: Sequence[Command] = (),
) -> Any:
    """EVALSHA, falling back to EVAL when the node has not cached the script yet."""
    for command in (("EVALSHA", script.sha, 1, key, *args), ("EVAL", script.source, 1, key, *args)):
        replies = await client.pipeline([*prefix, command])
        reply = replies[-1]
        if isinstance(reply, ServerError) and reply.code == "NOSCRIPT":
            continue
        return reply
    raise AssertionError("unreachable: EVAL does not answer NOSCRIPT")


class Standalone:
    """One Redis server (with its connection pool)."""

    def __init__(self, client: RedisClient, *, heartbeat: float = HEARTBEAT) -> None:
        self.client = client
        self.heartbeat = heartbeat

    async def pipeline(self, key: bytes, commands: Sequence[Command]) -> list[Any]:
        return await self.client.pipeline(commands)

    async def eval(self, key: bytes, script: Script, args: Sequence[Arg]) -> Any:
        reply = await _eval_on(self.client, key, script, args)
        if isinstance(reply, ServerError):
            raise reply
        return reply

    async def pipelines(
        self, batches: Sequence[tuple[bytes, Sequence[Command]]]
    ) -> list[list[Any]]:
        replies = await self.client.pipeline([c for _, commands in batches for c in commands])
        return _split(replies, [len(commands) for _, commands in batches])

    async def execute_everywhere(self, *args: Arg) -> list[Any]:
        return [await self.client.execute(*args)]

    async def listen(
        self,
        pattern: bytes,
        handler: MessageHandler,
        *,
        on_subscribed: SubscribedHandler | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await listen(
            lambda: (self.client,),
            pattern,
            handler,
            heartbeat=self.heartbeat,
            on_subscribed=on_subscribed,
            task_status=task_status,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.client.run(task_status=task_status)

    async def aclose(self) -> None:
        await self.client.aclose()


class Cluster:
    """A Redis Cluster: a client per master, a slot map, redirections followed."""

    def __init__(
        self,
        seeds: Sequence[RedisAddress],
        make_client: Callable[[RedisAddress], RedisClient],
        *,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        if not seeds:
            raise ValueError("a cluster needs at least one seed node")
        self.seeds = list(seeds)
        self.heartbeat = heartbeat
        self._make_client = make_client
        self._clients: dict[RedisAddress, RedisClient] = {}
        self._slots: list[RedisAddress | None] = [None] * SLOTS
        #: Every node (masters and replicas) the last CLUSTER SLOTS named.
        self._nodes: list[RedisAddress] = []
        self._nursery: trio.Nursery | None = None
        self._refreshing: trio.Event | None = None

    def client(self, address: RedisAddress) -> RedisClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self._make_client(address)
            if self._nursery is not None:
                self._nursery.start_soon(client.run)
        return client

    async def refresh(self) -> None:
        """Reload the slot map from the first node that answers (one refresh at a time)."""
        if self._refreshing is not None:
            await self._refreshing.wait()
            return
        self._refreshing = trio.Event()
        try:
            candidates = list(dict.fromkeys([*self._clients, *self.seeds]))
            errors = []
            for address in candidates:
                try:
                    ranges = await self.client(address).execute("CLUSTER", "SLOTS")
                except (StoreUnavailable, ServerError) as exc:
                    errors.append(f"{address}: {exc}")
                    continue
                slots: list[RedisAddress | None] = [None] * SLOTS
                nodes: dict[RedisAddress, None] = {}
                for start, end, master, *replicas in ranges:
                    owner, *copies = [_node_address(node, address) for node in [master, *replicas]]
                    nodes.update(dict.fromkeys([owner, *copies]))
                    for slot in range(int(start), int(end) + 1):
                        slots[slot] = owner
                self._slots = slots
                self._nodes = list(nodes)
                return
            raise StoreUnavailable("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))
        finally:
            self._refreshing.set()
            self._refreshing = None

    async def _owner(self, key: bytes) -> RedisClient:
        owner = self._slots[key_slot(key)]
        if owner is None:
            await self.refresh()
            owner = self._slots[key_slot(key)]
            if owner is None:
                raise StoreUnavailable(f"no cluster node serves slot {key_slot(key)}")
        return self.client(owner)

    async def pipeline(self, key: bytes, commands: Sequence[Command]) -> list[Any]:
        return await self._redirected(
            key, lambda client, asking: self._send(client, commands, asking)
        )

    async def eval(self, key: bytes, script: Script, args: Sequence[Arg]) -> Any:
        async def call(client: RedisClient, asking: bool) -> list[Any]:
            return [await _eval_on(client, key, script, args, [("ASKING",)] if asking else [])]

        (reply,) = await self._redirected(key, call)
        if isinstance(reply, ServerError):
            raise reply
        return reply

    async def pipelines(
        self, batches: Sequence[tuple[bytes, Sequence[Command]]]
    ) -> list[list[Any]]:
        # Group by owning node: one pipeline per node; a redirected batch is redone alone.
        owners: dict[RedisAddress, list[int]] = {}
        for index, (key, _) in enumerate(batches):
            client = await self._owner(key)
            owners.setdefault(client.address, []).append(index)
        results: list[list[Any]] = [[] for _ in batches]
        for address, indexes in owners.items():
            commands = [c for i in indexes for c in batches[i][1]]
            replies = await self.client(address).pipeline(commands)
            for i, part in zip(
                indexes, _split(replies, [len(batches[i][1]) for i in indexes]), strict=True
            ):
                if any(isinstance(r, ServerError) and r.code in ("MOVED", "ASK") for r in part):
                    part = await self.pipeline(batches[i][0], batches[i][1])
                results[i] = part
        return results

    @staticmethod
    async def _send(client: RedisClient, commands: Sequence[Command], asking: bool) -> list[Any]:
        if not asking:
            return await client.pipeline(commands)
        # ASKING applies to the next command only: one before each, all on one connection.
        interleaved: list[Command] = []
        for command in commands:
            interleaved += [("ASKING",), command]
        return (await client.pipeline(interleaved))[1::2]

    async def _redirected(self, key: bytes, call: Callable[[RedisClient, bool], Any]) -> list[Any]:
        client = await self._owner(key)
        asking = False
        for _ in range(_MAX_REDIRECTS):
            replies: list[Any] = await call(client, asking)
            redirect = next(
                (r for r in replies if isinstance(r, ServerError) and r.code in ("MOVED", "ASK")),
                None,
            )
            if redirect is None:
                return replies
            _code, _slot, target = str(redirect).split(" ", 2)
            host, _, port = target.rpartition(":")
            address = RedisAddress(host or client.address.host, int(port))
            if redirect.code == "MOVED":
                await self.refresh()
                client, asking = self.client(address), False
            else:
                client, asking = self.client(address), True
        raise StoreUnavailable(f"too many cluster redirections for key {key!r}")

    async def execute_everywhere(self, *args: Arg) -> list[Any]:
        if all(owner is None for owner in self._slots):
            await self.refresh()
        masters = {owner for owner in self._slots if owner is not None}
        return [await self.client(address).execute(*args) for address in sorted(masters, key=str)]

    async def listen(
        self,
        pattern: bytes,
        handler: MessageHandler,
        *,
        on_subscribed: SubscribedHandler | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await listen(
            self._subscription_nodes,
            pattern,
            handler,
            heartbeat=self.heartbeat,
            on_subscribed=on_subscribed,
            task_status=task_status,
        )

    def _subscription_nodes(self) -> list[RedisClient]:
        # A plain PUBLISH (the scripts') is broadcast over the cluster bus to every node,
        # replicas included: a subscription on any one node hears the whole cluster, so every
        # node known is a place for it.  The seeds first, in the operator's order.
        known = dict.fromkeys([*self.seeds, *self._nodes, *self._clients])
        return [self.client(address) for address in known]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for client in self._clients.values():
                nursery.start_soon(client.run)
            task_status.started()
            await trio.sleep_forever()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


def _node_address(node: Sequence[Any], answered_by: RedisAddress) -> RedisAddress:
    """A node of a CLUSTER SLOTS reply; an empty host means the node that answered's."""
    host = node[0].decode() if node[0] else answered_by.host
    return RedisAddress(host, int(node[1]))


def _split(replies: list[Any], sizes: Sequence[int]) -> list[list[Any]]:
    parts, start = [], 0
    for size in sizes:
        parts.append(replies[start : start + size])
        start += size
    return parts


class _NoAnswer(StoreUnavailable):
    """Redis did not answer the subscription's PSUBSCRIBE or heartbeat PING in time."""


class _Lost(StoreUnavailable):
    """The subscription's connection broke (reset, closed, or bytes that are not RESP)."""


class _Refused(StoreUnavailable):
    """Redis answered PSUBSCRIBE with an error: an ACL user without the channel pattern."""


async def _receive(conn: RedisConnection, deadline: float) -> bool:
    """Feed the connection's reader what arrives before ``deadline``; False if nothing did."""
    with trio.move_on_at(deadline):
        data = await conn.stream.receive_some(_RECEIVE_SIZE)
        if not data:
            raise trio.BrokenResourceError("Redis closed the subscription")
        conn.reader.feed(bytes(data))
        return True
    return False


async def _send(conn: RedisConnection, payload: bytes, deadline: float, what: str) -> None:
    # A send waits only when the socket buffer is full, which a dead peer can cause.
    with trio.move_on_at(deadline):
        await conn.stream.send_all(payload)
        return
    raise _NoAnswer(f"could not send {what} before its deadline")


async def listen(
    nodes: Callable[[], Sequence[RedisClient]],
    pattern: bytes,
    handler: MessageHandler,
    *,
    heartbeat: float = HEARTBEAT,
    on_subscribed: SubscribedHandler | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """PSUBSCRIBE on a dedicated connection to one of ``nodes()``, calling
    ``handler(channel, data)`` per message, until cancelled.

    ``nodes()`` (asked again at every connect) lists the servers that can carry the
    subscription, in order of preference: one for a standalone Redis, every known node of a
    cluster.  When the subscription fails (refused, broken, or silent: Redis owes an answer
    within the client's command timeout to the PSUBSCRIBE and to a PING sent after
    ``heartbeat`` seconds of silence), the next node not tried since the last confirmed
    subscription takes it, at once; once every node has failed, the next round waits a backoff
    first.  Before the first confirmed subscription, a round that fails raises
    ``StoreUnavailable`` (the store's start fails, naming each node).

    ``on_subscribed()`` runs after every confirmed PSUBSCRIBE.  Messages published while
    disconnected are lost; callers must not depend on them for correctness (the dispatcher
    also rechecks on a timer).
    """
    started = False
    delay = _LISTEN_BACKOFF_START
    on: RedisAddress | None = None  # the node of the last confirmed subscription
    up = False  # whether that subscription still stands
    failed: dict[RedisAddress, StoreUnavailable] = {}  # nodes tried since, and why
    # The failure of the subscription itself is logged as it happens; the others (connecting
    # elsewhere) once, with the node that took over or at the end of a round.
    logged: StoreUnavailable | None = None

    def unlogged() -> str:
        return "; ".join(str(exc) for exc in failed.values() if exc is not logged)

    def confirmed(client: RedisClient) -> None:
        nonlocal started, delay, on, up
        others = unlogged()
        also = f" (could not use {others})" if others else ""
        if on is None and failed:
            log.warning("wake-up subscription on %s%s", client.address, also)
        elif on is not None and on != client.address:
            log.warning("wake-up subscription moved from %s to %s%s", on, client.address, also)
        elif failed:
            log.warning("wake-up subscription back on %s", client.address)
        on, up = client.address, True
        failed.clear()
        delay = _LISTEN_BACKOFF_START
        if on_subscribed is not None:
            on_subscribed()
        if not started:
            started = True
            task_status.started()

    while True:
        client = next((c for c in nodes() if c.address not in failed), None)
        if client is None:  # a round is over: every node failed
            if not started:
                if len(failed) == 1:
                    raise next(iter(failed.values()))
                raise StoreUnavailable(
                    "no Redis node took the wake-up subscription: "
                    + "; ".join(str(exc) for exc in failed.values())
                )
            if others := unlogged():
                log.warning("wake-up subscription: retrying in %.2fs: %s", delay, others)
            await trio.sleep(delay)
            delay = min(delay * 2, _LISTEN_BACKOFF_MAX)
            failed.clear()
            continue
        try:
            await _subscribe(client, pattern, handler, heartbeat, partial(confirmed, client))
        except StoreUnavailable as exc:
            failed[client.address] = exc
            if up:
                up, logged = False, exc
                log.log(
                    logging.ERROR if isinstance(exc, _Refused) else logging.WARNING,
                    "wake-up subscription failed, looking for a node: %s",
                    exc,
                )


async def _subscribe(
    client: RedisClient,
    pattern: bytes,
    handler: MessageHandler,
    heartbeat: float,
    confirmed: Callable[[], None],
) -> NoReturn:
    """One subscription on one node, until it fails: raises ``StoreUnavailable`` naming it."""
    timeout = client.command_timeout
    conn = await client.connect_dedicated()
    try:
        # `awaiting` names the command Redis owes an answer to by `deadline`; with none
        # owed, `deadline` is when silence has lasted long enough to send a PING.
        awaiting: str | None = "PSUBSCRIBE"
        deadline = trio.current_time() + timeout
        await _send(conn, pack(("PSUBSCRIBE", pattern)), deadline, "PSUBSCRIBE")
        reader = conn.reader
        while True:
            message = reader.gets()
            if message is False:
                if await _receive(conn, deadline):
                    continue
                if awaiting is not None:
                    raise _NoAnswer(f"Redis did not answer {awaiting} within {timeout:g}s")
                awaiting, deadline = "PING", trio.current_time() + timeout
                await _send(conn, _PING, deadline, "PING")
                continue
            if isinstance(message, ServerError):
                if awaiting == "PSUBSCRIBE":  # NOPERM: an ACL user without &channels
                    raise _Refused(
                        f"{client.name}: Redis refused the wake-up subscription (PSUBSCRIBE"
                        f" {pattern.decode()}): {message}; the user needs access to that"
                        " channel pattern"
                    )
                # Only the PING can fail here (an ACL user without +ping): still an answer.
                awaiting = None
            elif message[0] == b"pmessage":
                handler(message[2], message[3])
            elif message[0] == b"psubscribe":
                awaiting = None
                confirmed()
            elif message[0] == b"pong":
                awaiting = None
            if awaiting is None:
                deadline = trio.current_time() + heartbeat
    except (trio.BrokenResourceError, OSError, hiredis.ProtocolError) as exc:
        raise _Lost(f"{client.name}: wake-up subscription: connection lost: {exc}") from exc
    except _NoAnswer as exc:
        raise _NoAnswer(f"{client.name}: wake-up subscription: {exc}") from exc
    finally:
        conn.close()
