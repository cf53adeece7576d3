"""Where a Redis command goes: one server, or the Redis Cluster node owning the key's slot.

The store sends every command of an operation with one routing key (all keys of a queue share
the hash tag ``{queue}``, hence one slot), so a pipeline or a script always runs on one node.
The cluster router keeps a slot map from ``CLUSTER SLOTS``; ``MOVED`` refreshes it and retries,
``ASK`` (a slot being migrated) sends ``ASKING`` and the commands to the named node once.
Both commands are safe to repeat: a node that answers MOVED or ASK executed nothing.  So is a
call that could not connect: the map is refreshed and the call sent to the slot's owner, which
is how a failover (a replica promoted in place of a dead master) is followed.  So is a call that
a server refused to run for now (``_NOT_RUN``: a cluster failing a master over, a Redis loading
its dataset after a restart): both routers wait a little and send it again, within its deadline.

Wake-ups arrive over one PSUBSCRIBE connection per daemon (``listen``), watched by a heartbeat;
on a cluster it moves to another node when the one it is on fails.
"""

from __future__ import annotations

import binascii
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, NoReturn, Protocol

import hiredis
import trio

from adapters.storage.errors import StoreRefused, StoreUnavailable, StoreUncertain
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
#: How long a call that cannot reach its slot's node, or that a server refused to run for now,
#: waits before it tries again, doubling up to the maximum: a failover takes the cluster's node
#: timeout (seconds) to start, loading a dataset seconds to minutes, and the call has until its
#: deadline.
_FAILOVER_BACKOFF_START = 0.1
_FAILOVER_BACKOFF_MAX = 1.0
#: Error replies for commands a server refused to run for now, having run nothing: the cluster
#: is down while it fails a master over (CLUSTERDOWN), a migration splits the keys (TRYAGAIN),
#: or the server is loading its dataset into memory after a restart (LOADING, standalone or a
#: cluster node; the connection's login still works then, every other command is refused).
_NOT_RUN = frozenset({"CLUSTERDOWN", "TRYAGAIN", "LOADING"})
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

    async def eval_then(
        self, key: bytes, script: Script, args: Sequence[Arg], then: Command
    ) -> tuple[Any, Any]:
        """``eval``, followed by ``then`` on the same connection in the same pipeline (one
        round trip): the script's reply (an error reply raised, as by ``eval``) and
        ``then``'s (an error reply returned).  ``then`` is a command about what the script
        did, as ``WAIT`` is: only the script's reply decides whether the call is redirected
        or sent again, and a call that may have run the script is never sent again."""
        ...

    async def pipelines(
        self, batches: Sequence[tuple[bytes, Sequence[Command]]]
    ) -> list[list[Any]]:
        """Several keys' command lists, sent as one pipeline per server."""
        ...

    async def execute_everywhere(self, *args: Arg) -> list[Any]:
        """A command on every master (health, startup checks); an error reply is raised.
        A server loading its dataset is reported at once (``LOADING``), not waited for."""
        ...

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
    suffix: Sequence[Command] = (),
    *,
    deadline: float | None = None,
    reconnect: bool = True,
) -> list[Any]:
    """The script between ``prefix`` and ``suffix`` in one pipeline: the replies of the script
    and of ``suffix``.  A ``suffix`` is eval_then's WAIT, which may hold the connection
    (``lingers``).

    The script goes as EVAL the first time this node is sent it (which caches it there), then
    as EVALSHA, and as EVAL again if the node answers NOSCRIPT (restarted, or SCRIPT FLUSH).
    Not EVALSHA first to find out: the WAIT behind a NOSCRIPT waits for nothing, and with a
    replica down it would hold the first push for ``replica_timeout`` twice.
    """
    at = len(prefix)
    lingers = bool(suffix)
    by_source = script.sha not in client.scripts
    while True:
        # One tuple per call: a push's arguments run to thousands, so the other form of the
        # command is built only if it is sent.
        head = ("EVAL", script.source) if by_source else ("EVALSHA", script.sha)
        replies = await client.pipeline(
            [*prefix, (*head, 1, key, *args), *suffix],
            deadline=deadline,
            reconnect=reconnect,
            lingers=lingers,
        )
        reply = replies[at]
        if not by_source and isinstance(reply, ServerError) and reply.code == "NOSCRIPT":
            by_source = True
            continue
        client.scripts.add(script.sha)
        return replies[at:] if at else replies


class Standalone:
    """One Redis server (with its connection pool).

    A call the server ran none of (``_NOT_RUN``: ``LOADING``, while it loads its dataset
    after a restart) is sent again with backoff until its deadline, as the cluster router's.
    """

    def __init__(self, client: RedisClient, *, heartbeat: float = HEARTBEAT) -> None:
        self.client = client
        self.heartbeat = heartbeat

    # Each call is made once, and again through _again only if the server ran none of it:
    # the usual call builds no closure and awaits no frame more than it did before.

    async def pipeline(self, key: bytes, commands: Sequence[Command]) -> list[Any]:
        client = self.client
        deadline = trio.current_time() + client.command_timeout
        replies = await client.pipeline(commands, deadline=deadline)
        if _not_run(replies):
            replies = await _again(
                lambda deadline: client.pipeline(commands, deadline=deadline), replies, deadline
            )
        return replies

    async def eval(self, key: bytes, script: Script, args: Sequence[Arg]) -> Any:
        client = self.client
        deadline = trio.current_time() + client.command_timeout
        replies = await _eval_on(client, key, script, args, deadline=deadline)
        if _not_run(replies):
            replies = await _again(
                lambda deadline: _eval_on(client, key, script, args, deadline=deadline),
                replies,
                deadline,
            )
        (reply,) = replies
        if isinstance(reply, ServerError):
            raise reply
        return reply

    async def eval_then(
        self, key: bytes, script: Script, args: Sequence[Arg], then: Command
    ) -> tuple[Any, Any]:
        client = self.client
        suffix = (then,)
        deadline = trio.current_time() + client.command_timeout
        replies = await _eval_on(client, key, script, args, suffix=suffix, deadline=deadline)
        if _not_run(replies[:1]):  # the script's reply decides: ``then`` may have run anyway
            replies = await _again(
                lambda deadline: _eval_on(
                    client, key, script, args, suffix=suffix, deadline=deadline
                ),
                replies,
                deadline,
                decisive=1,
            )
        reply, after = replies
        if isinstance(reply, ServerError):
            raise reply
        return reply, after

    async def pipelines(
        self, batches: Sequence[tuple[bytes, Sequence[Command]]]
    ) -> list[list[Any]]:
        return _split(
            await self.pipeline(b"", [c for _, commands in batches for c in commands]),
            [len(commands) for _, commands in batches],
        )

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
    """A Redis Cluster: a client per master, a slot map, redirections and failovers followed.

    A call that cannot reach its slot's node (nothing sent: a plain ``StoreUnavailable``)
    asks the cluster again who owns the slot: after a failover, the promoted replica does,
    and the call goes there.  While the cluster has not promoted anyone yet (it takes its
    ``cluster-node-timeout`` to notice a dead master), the call waits a little and asks
    again, within its deadline; so does a call every command of which a node refused to run
    for now (``CLUSTERDOWN`` while the cluster fails a master over, ``TRYAGAIN``).  A call
    that may have reached Redis (``StoreUncertain``) is never retried: a push could be
    stored twice.
    """

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
        #: Each master of the slot map, with one slot it serves: where a command for every
        #: master goes, so that it follows that slot to a new master after a failover.
        self._masters: dict[RedisAddress, int] = {}
        #: Nodes whose last call failed: asked last for the slot map, so that a dead node
        #: costs a connect attempt (up to the connect timeout) once, not at every refresh.
        self._failing: set[RedisAddress] = set()
        self._command_timeout: float | None = None
        self._nursery: trio.Nursery | None = None
        self._refreshing: trio.Event | None = None

    def client(self, address: RedisAddress) -> RedisClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self._make_client(address)
            if self._nursery is not None:
                self._nursery.start_soon(client.run)
        return client

    def _deadline(self) -> float:
        """When a call starting now must be over: the clients' command timeout from now."""
        if self._command_timeout is None:
            self._command_timeout = self.client(self.seeds[0]).command_timeout
        return trio.current_time() + self._command_timeout

    async def refresh(
        self, deadline: float | None = None, *, why: str = "", level: int = logging.INFO
    ) -> None:
        """Reload the slot map from the first node that answers (one refresh at a time).

        Asked in turn: the nodes the last map named, the seeds, then any other node known;
        nodes whose last call failed go last.  Each gets one connection attempt and its
        connect timeout to answer, so a dead node (a host that drops packets) does not use
        the whole deadline.  Slots that changed owner are logged at ``level``, with ``why``.
        """
        if self._refreshing is not None:
            await self._refreshing.wait()
            return
        if deadline is None:
            deadline = self._deadline()
        self._refreshing = trio.Event()
        try:
            known = list(dict.fromkeys([*self._nodes, *self.seeds, *self._clients]))
            candidates = [a for a in known if a not in self._failing]
            candidates += [a for a in known if a in self._failing]
            errors = []
            for address in candidates:
                client = self.client(address)
                ranges: Any = None
                with trio.move_on_at(min(deadline, trio.current_time() + client.connect_timeout)):
                    try:
                        (ranges,) = await client.pipeline(
                            [("CLUSTER", "SLOTS")], deadline=deadline, reconnect=False
                        )
                    except StoreUnavailable as exc:
                        ranges = exc
                if ranges is None:
                    ranges = StoreUnavailable(
                        f"{client.name}: no answer within {client.connect_timeout:g}s"
                    )
                if isinstance(ranges, list) and not ranges:
                    # A node outside any cluster (reset by `redis-cli --cluster del-node`, or
                    # not joined yet) serves no slot: its empty map is no map.
                    ranges = StoreUnavailable(f"{client.name}: serves no slot (not in the cluster)")
                if isinstance(ranges, StoreUnavailable):
                    self._failing.add(address)
                if isinstance(ranges, StoreUnavailable | ServerError):
                    errors.append(f"{address}: {ranges}")
                    continue
                self._failing.discard(address)
                self._install(ranges, address, why, level)
                return
            raise StoreUnavailable("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))
        finally:
            self._refreshing.set()
            self._refreshing = None

    def _install(self, ranges: Any, answered_by: RedisAddress, why: str, level: int) -> None:
        """Take a CLUSTER SLOTS answer as the slot map, logging the slots that moved."""
        # The addresses already known, as the objects the old map holds: comparing the maps
        # slot by slot is then mostly an identity check.
        known = {address: address for address in [*self._masters, *self._clients]}
        slots: list[RedisAddress | None] = [None] * SLOTS
        nodes: dict[RedisAddress, None] = {}
        masters: dict[RedisAddress, int] = {}
        for start, end, master, *replicas in ranges:
            owner, *copies = [
                known.setdefault(address, address)
                for address in (_node_address(node, answered_by) for node in [master, *replicas])
            ]
            nodes.update(dict.fromkeys([owner, *copies]))
            masters.setdefault(owner, int(start))
            slots[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
        moved = _moves(self._slots, slots)
        self._slots, self._nodes, self._masters = slots, list(nodes), masters
        if moved:
            log.log(level, "slot map refreshed%s: %s", f" ({why})" if why else "", moved)

    async def _first_map(self, deadline: float) -> None:
        """A slot map where there is none yet, asking again with backoff until ``deadline``
        while no node answers: a cluster (re)starting costs the calls made meanwhile a wait,
        as a standalone Redis restarting does."""
        delay = _FAILOVER_BACKOFF_START
        while True:
            try:
                await self.refresh(deadline)
            except StoreUnavailable:
                if trio.current_time() + delay >= deadline:
                    raise
            else:
                return
            await trio.sleep(delay)
            delay = min(delay * 2, _FAILOVER_BACKOFF_MAX)

    async def _owner(self, slot: int, deadline: float) -> RedisAddress:
        owner = self._slots[slot]
        if owner is None:
            if self._masters:
                await self.refresh(deadline)  # a slot no node served at the last refresh
            else:
                await self._first_map(deadline)
            owner = self._slots[slot]
            if owner is None:
                raise StoreUnavailable(f"no cluster node serves slot {slot}")
        return owner

    async def pipeline(self, key: bytes, commands: Sequence[Command]) -> list[Any]:
        return await self._pipeline(key, commands, self._deadline())

    async def _pipeline(
        self, key: bytes, commands: Sequence[Command], deadline: float
    ) -> list[Any]:
        return await self._routed(
            key_slot(key),
            key,
            lambda client, asking: self._send(client, commands, asking, deadline),
            deadline,
        )

    async def eval(self, key: bytes, script: Script, args: Sequence[Arg]) -> Any:
        deadline = self._deadline()

        async def call(client: RedisClient, asking: bool) -> list[Any]:
            prefix: list[Command] = [("ASKING",)] if asking else []
            return await _eval_on(
                client, key, script, args, prefix, deadline=deadline, reconnect=False
            )

        (reply,) = await self._routed(key_slot(key), key, call, deadline, script=True)
        if isinstance(reply, ServerError):
            raise reply
        return reply

    async def eval_then(
        self, key: bytes, script: Script, args: Sequence[Arg], then: Command
    ) -> tuple[Any, Any]:
        deadline = self._deadline()
        suffix = (then,)
        after: list[Any] = [None]

        async def call(client: RedisClient, asking: bool) -> list[Any]:
            # ``then`` goes to the node the script went to, on its connection: after a MOVED
            # or ASK (the script did not run) it goes again with the script to the new node.
            prefix: list[Command] = [("ASKING",)] if asking else []
            reply, after[0] = await _eval_on(
                client, key, script, args, prefix, suffix, deadline=deadline, reconnect=False
            )
            return [reply]  # redirections and retries are the script's reply's to decide

        (reply,) = await self._routed(key_slot(key), key, call, deadline, script=True)
        if isinstance(reply, ServerError):
            raise reply
        return reply, after[0]

    async def pipelines(
        self, batches: Sequence[tuple[bytes, Sequence[Command]]]
    ) -> list[list[Any]]:
        # Group by owning node: one pipeline per node; a batch redirected, or whose node
        # could not be reached, is redone alone (following its slot).
        deadline = self._deadline()
        owners: dict[RedisAddress, list[int]] = {}
        for index, (key, _) in enumerate(batches):
            owners.setdefault(await self._owner(key_slot(key), deadline), []).append(index)
        results: list[list[Any]] = [[] for _ in batches]
        for address, indexes in owners.items():
            commands = [c for i in indexes for c in batches[i][1]]
            try:
                replies = await self.client(address).pipeline(
                    commands, deadline=deadline, reconnect=False
                )
            except StoreUnavailable as exc:
                self._failing.add(address)
                if not _nothing_sent(exc):
                    raise
                what = _describe(batches[indexes[0]][0])
                if len(indexes) > 1:
                    what += f" and {len(indexes) - 1} more"
                with contextlib.suppress(StoreUnavailable):  # the batches wait on their own
                    await self.refresh(deadline, why=f"{what}: {exc}", level=logging.WARNING)
                for i in indexes:
                    results[i] = await self._pipeline(batches[i][0], batches[i][1], deadline)
                continue
            self._failing.discard(address)
            for i, part in zip(
                indexes, _split(replies, [len(batches[i][1]) for i in indexes]), strict=True
            ):
                if _not_run(part) or any(
                    isinstance(r, ServerError) and r.code in ("MOVED", "ASK") for r in part
                ):
                    part = await self._pipeline(batches[i][0], batches[i][1], deadline)
                results[i] = part
        return results

    @staticmethod
    async def _send(
        client: RedisClient, commands: Sequence[Command], asking: bool, deadline: float
    ) -> list[Any]:
        if not asking:
            return await client.pipeline(commands, deadline=deadline, reconnect=False)
        # ASKING applies to the next command only: one before each, all on one connection.
        interleaved: list[Command] = []
        for command in commands:
            interleaved += [("ASKING",), command]
        replies = await client.pipeline(interleaved, deadline=deadline, reconnect=False)
        return replies[1::2]

    async def _routed(
        self,
        slot: int,
        what: bytes | str,
        call: Callable[[RedisClient, bool], Awaitable[list[Any]]],
        deadline: float,
        *,
        patient: bool = True,
        script: bool = False,
    ) -> list[Any]:
        """``call(client, asking)`` on the node serving ``slot``, following MOVED and ASK,
        and the slot to another node when its node cannot be reached.  ``what`` names the
        call in messages: a routing key (its queue), or words.  Unless ``patient`` (a health
        check), replies that ran nothing (``_NOT_RUN``) are returned rather than waited out.

        A ``script``'s ASK is not followed but waited out like TRYAGAIN: its slot is being
        migrated, and the script touches keys it does not name, some of which may not have
        moved yet (it would run on the new node without them).  Once the slot has moved,
        the old node answers MOVED, which is followed."""
        client = self.client(await self._owner(slot, deadline))
        asking = False
        redirects = 0
        delay = _FAILOVER_BACKOFF_START
        failed: set[RedisAddress] = set()  # nodes this call could not reach
        while True:
            try:
                replies = await call(client, asking)
            except StoreUnavailable as exc:
                self._failing.add(client.address)
                if not _nothing_sent(exc) or trio.current_time() >= deadline:
                    raise
                failed.add(client.address)
                # Nothing reached Redis: the node is down, for good if it was a master whose
                # replica has taken over.  Where does the cluster say the slot is now?
                with contextlib.suppress(StoreUnavailable):  # no node answered: the map stands
                    await self.refresh(
                        deadline, why=f"{_describe(what)}: {exc}", level=logging.WARNING
                    )
                owner = self._slots[slot]
                if owner is None or owner in failed:
                    # No failover yet (the cluster takes its node timeout to notice), or the
                    # new owner is down too: wait a little, then try whichever node the map
                    # names by then (perhaps the same one, back from a restart).
                    if trio.current_time() + delay >= deadline:
                        raise
                    await trio.sleep(delay)
                    delay = min(delay * 2, _FAILOVER_BACKOFF_MAX)
                    owner = self._slots[slot] or client.address
                client, asking = self.client(owner), False
                continue
            self._failing.discard(client.address)
            if patient and _not_run(replies) and trio.current_time() + delay < deadline:
                # The node ran none of it: the cluster is down while it fails a master over
                # (CLUSTERDOWN, from every master under the default
                # cluster-require-full-coverage), the keys are split by a migration
                # (TRYAGAIN), or the node is loading its dataset after a restart (LOADING).
                # Wait, then try wherever the map says by then.
                await trio.sleep(delay)
                delay = min(delay * 2, _FAILOVER_BACKOFF_MAX)
                with contextlib.suppress(StoreUnavailable):
                    await self.refresh(
                        deadline, why=f"{_describe(what)}: {replies[0]}", level=logging.WARNING
                    )
                client, asking = self.client(self._slots[slot] or client.address), False
                continue
            redirect = next(
                (r for r in replies if isinstance(r, ServerError) and r.code in ("MOVED", "ASK")),
                None,
            )
            if redirect is None:
                return replies
            if script and redirect.code == "ASK":
                if trio.current_time() + delay >= deadline:
                    raise StoreUnavailable(
                        f"{_describe(what)}: its slot is being migrated to another node, and"
                        f" the migration did not end in time; nothing was run ({redirect})"
                    )
                await trio.sleep(delay)
                delay = min(delay * 2, _FAILOVER_BACKOFF_MAX)
                client, asking = self.client(self._slots[slot] or client.address), False
                continue
            redirects += 1
            if redirects >= _MAX_REDIRECTS:
                raise StoreUnavailable(f"too many cluster redirections for {_describe(what)}")
            _code, _slot, target = str(redirect).split(" ", 2)
            host, _, port = target.rpartition(":")
            address = RedisAddress(host or client.address.host, int(port))
            if redirect.code == "MOVED":
                await self.refresh(deadline, why=f"{_describe(what)}: {redirect}")
                client, asking = self.client(address), False
            else:
                client, asking = self.client(address), True

    async def execute_everywhere(self, *args: Arg) -> list[Any]:
        deadline = self._deadline()
        if not self._masters:
            await self._first_map(deadline)
        what = f"{args[0]!s} on every master"

        async def call(client: RedisClient, asking: bool) -> list[Any]:
            return await client.pipeline([args], deadline=deadline, reconnect=False)

        replies = []
        for _master, slot in sorted(self._masters.items(), key=lambda item: str(item[0])):
            (reply,) = await self._routed(slot, what, call, deadline, patient=False)
            if isinstance(reply, ServerError):
                raise reply
            replies.append(reply)
        return replies

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


def _nothing_sent(exc: StoreUnavailable) -> bool:
    """Whether a failed call is safe to send again elsewhere: nothing reached Redis (no
    ``StoreUncertain``), and not a login refused, which no retry mends."""
    return not isinstance(exc, StoreUncertain | StoreRefused)


async def _again(
    attempt: Callable[[float], Awaitable[list[Any]]],
    replies: list[Any],
    deadline: float,
    *,
    decisive: int | None = None,
) -> list[Any]:
    """After ``replies`` that ran nothing (``_not_run`` of the first ``decisive`` of them,
    or all): ``attempt(deadline)`` again, after a backoff, until one runs or the deadline is
    too near for another wait.  The last replies, refusals included, for the caller to raise.
    """
    delay = _FAILOVER_BACKOFF_START
    while _not_run(replies[:decisive]) and trio.current_time() + delay < deadline:
        await trio.sleep(delay)
        delay = min(delay * 2, _FAILOVER_BACKOFF_MAX)
        replies = await attempt(deadline)
    return replies


def _not_run(replies: Sequence[Any]) -> bool:
    """Whether every reply is an error that Redis gives before running a command and that
    passes (the cluster down during a failover, keys split by a migration, a dataset being
    loaded): only then is sending the call again safe, since none of its commands ran."""
    # A loop, not all() over a generator: this runs after every call, and most often stops
    # at the first reply, an answer.
    for reply in replies:
        if not isinstance(reply, ServerError) or reply.code not in _NOT_RUN:
            return False
    return bool(replies)


def _describe(what: bytes | str) -> str:
    """A call in words: a routing key is named by its hash tag, the queue."""
    if isinstance(what, str):
        return what
    start = what.find(b"{")
    end = what.find(b"}", start + 1)
    if start >= 0 and end > start + 1:
        return f"queue {what[start + 1 : end].decode(errors='replace')}"
    return f"key {what.decode(errors='replace')}"


def _moves(old: Sequence[RedisAddress | None], new: Sequence[RedisAddress | None]) -> str:
    """The slots that changed owner, in words (``slots 0-5460 moved from a to b``); slots
    without an owner before (the first map) did not move."""
    moves: dict[tuple[RedisAddress, RedisAddress | None], list[list[int]]] = {}
    previous = None
    for slot, (was, now) in enumerate(zip(old, new, strict=True)):
        if was is None or was is now or was == now:
            previous = None
            continue
        runs = moves.setdefault((was, now), [])
        if previous == (was, now):
            runs[-1][1] = slot
        else:
            runs.append([slot, slot])
        previous = (was, now)
    return "; ".join(
        "slot{} {} moved from {} to {}".format(
            "s" if len(runs) > 1 or runs[0][0] != runs[0][1] else "",
            ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs),
            was,
            now or "no node",
        )
        for (was, now), runs in moves.items()
    )


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
