"""The daemon: the store, the producer servers and one dispatcher per topic, in one nursery.

    App.run
      ├── producer server (RESP)
      └── dispatchers nursery: one Dispatcher per topic (each with its backend pool)

``reload(config)`` swaps the producers' view of the queues in one assignment and starts,
stops or replaces only the dispatchers whose topic changed, so pushes never fail during a
reload and unchanged topics keep delivering.  ``shutdown()`` stops accepting producers and
reserving jobs, lets in-flight deliveries finish until ``shutdown_timeout``, and releases
whatever is left.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, replace

import trio

from adapters.delivery.base import Backend
from adapters.delivery.fastcgi import FastCGIBackend, FastCGITarget
from adapters.delivery.http import HTTPBackend, HTTPTarget
from adapters.storage.base import Store
from adapters.storage.errors import StoreError, StoreLoading, StoreUnsupported
from adapters.storage.redis_client import RedisAddress, RedisClient
from adapters.storage.redis_routing import Cluster, Standalone
from adapters.storage.redis_routing import Router as RedisRouter
from adapters.storage.redis_store import RedisStore, check_redis_version
from adapters.storage.sqlite import SQLiteStore
from fastcgi.address import parse_address
from gateway.admin import AdminAPI, read_token
from gateway.config import (
    Config,
    StoreConfig,
    TopicConfig,
    config_warnings,
    php_fpm_notes,
    store_tls_context,
)
from gateway.dispatcher import RECORD_GRACE, Dispatcher, DispatcherStatistics
from gateway.dns import Resolver
from gateway.health import BackendHealth
from gateway.http_server import SEND_TIMEOUT as HTTP_SEND_TIMEOUT
from gateway.http_server import HTTPServer, Request, Response, Router
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import registry_for
from gateway.metrics import render as render_metrics
from gateway.producer import FLUSH_GRACE, Directory, ProducerService
from gateway.producer_http import add_producer_routes
from gateway.resp_server import RespServer, RespStatistics
from gateway.telemetry import Telemetry
from gateway.wallclock import WallClock

log = logging.getLogger("busgate")


#: How long /readyz waits for the store to answer.
READY_TIMEOUT = 2.0


class StartupError(Exception):
    """The daemon cannot start with this configuration (the message says why): a file it
    names cannot be used (the admin token, a ``ca_file``).  Like a `ConfigError`, starting
    again does not mend it: ``busgate`` exits with status 2 (RestartPreventExitStatus)."""


def token_problem(path: str | None, error: Exception) -> str:
    """Why the admin token in ``path`` cannot be used, as a start, a reload or
    check-config says it."""
    return f"admin_token_file: {error if path is None else _naming(path, error)}"


def _naming(path: str, error: Exception) -> str:
    """``error``'s text with the file it is about, ``[Errno 2] No such file or directory:
    '/etc/busgate/ca.pem'``, unless it names it already: a decoding error does not, nor an
    OSError from ssl."""
    text = str(error)
    return text if path in text else f"{text}: {path!r}"


class ReloadRefused(Exception):
    """The new configuration cannot be applied to the running daemon; the old one stays."""


TopicKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class ReloadReport:
    added: tuple[TopicKey, ...]
    removed: tuple[TopicKey, ...]
    changed: tuple[TopicKey, ...]  # restarted with the new settings
    toggled: tuple[TopicKey, ...]  # only paused/resumed
    #: Other settings that took effect: a queue's password or max_payload, the producer
    #: limits, shutdown_timeout, the admin token (named, never shown).
    settings: tuple[str, ...] = ()

    def __str__(self) -> str:
        def names(keys: tuple[TopicKey, ...]) -> str:
            return ",".join(f"{q}/{t}" for q, t in keys) or "-"

        return (
            f"added={names(self.added)} removed={names(self.removed)}"
            f" changed={names(self.changed)} paused/resumed={names(self.toggled)}"
            f" settings={','.join(self.settings) or '-'}"
        )


def _topics_of(config: Config) -> dict[Key, TopicConfig]:
    return {(q.name, t.name): t for q in config.queues.values() for t in q.topics}


def _settings_changed(old: Config, new: Config, token_changed: bool) -> tuple[str, ...]:
    """What a reload changed besides topics (``ReloadReport.settings``)."""
    changed = [
        f"{name}.{field}"
        for name in old.queues.keys() & new.queues.keys()
        for field in ("password", "max_payload")
        if getattr(old.queues[name], field) != getattr(new.queues[name], field)
    ]
    changed.sort()
    if old.producer != new.producer:
        changed.append("producer")
    if old.shutdown_timeout != new.shutdown_timeout:
        changed.append("shutdown_timeout")
    if token_changed:
        changed.append("admin_token")
    return tuple(changed)


async def open_store(
    config: StoreConfig, *, clock: Callable[[], float] = time.time, read_only: bool = False
) -> Store:
    """``read_only``: an operator's look (``busgate curl``), which may not write an SQLite
    store's files; a Redis store's login decides alone what it may do."""
    if config.kind == "sqlite":
        assert config.path is not None
        return await SQLiteStore.open(config.path, clock=clock, read_only=read_only)
    try:
        tls = store_tls_context(config)  # read once for every node of a cluster
    except ValueError as exc:  # a file gone or spoilt since the configuration was read
        raise StartupError(f"store: {exc}") from None

    def client(address: RedisAddress) -> RedisClient:
        return RedisClient(
            address,
            username=config.username,
            password=config.password,
            db=config.db,
            tls=tls or False,
            connect_timeout=config.connect_timeout,
            command_timeout=config.command_timeout,
        )

    addresses = [RedisAddress(host, port) for host, port in config.nodes]
    router: RedisRouter
    if config.kind == "redis-cluster":
        router = Cluster(addresses, client)
    else:
        router = Standalone(client(addresses[0]))
    store = RedisStore(
        router, clock=clock, replicas=config.replicas, replica_timeout=config.replica_timeout
    )
    try:
        # Fail at startup, naming the server, rather than at the first push; and on a Redis
        # too old for the scripts, rather than at the first reserve.
        for info in await router.execute_everywhere("INFO", "server"):
            check_redis_version(info.decode() if isinstance(info, bytes) else str(info))
        await store.check_replicas()
        if not read_only:  # a replica, an evicting maxmemory-policy, missing permissions
            await store.check_server()
    except StoreUnsupported as exc:
        await store.aclose()
        where = ", ".join(f"{host}:{port}" for host, port in config.nodes)
        raise StoreUnsupported(f"{where}: {exc}") from None
    except StoreError:
        await store.aclose()
        raise
    return store


Key = tuple[str, str]


def build_backends(config: Config, only: Container[Key] | None = None) -> dict[Key, Backend]:
    """Every topic's delivery adapter (or those of ``only``), before any of them is used.

    Setting one up reads files (an https topic's ``ca_file``): a missing or broken one is a
    ``StartupError`` naming the drop-in and the topic, so a start or a reload can refuse the
    configuration before it has changed anything.
    """
    backends: dict[Key, Backend] = {}
    for queue in config.queues.values():
        for topic in queue.topics:
            key = (queue.name, topic.name)
            if only is not None and key not in only:
                continue
            try:
                backends[key] = build_backend(topic)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise StartupError(f"{queue.source}: {_setup_problem(topic, exc)}") from None
    return backends


def _setup_problem(topic: TopicConfig, error: Exception) -> str:
    """The key and what is wrong, as a config error words it; with the ``ca_file`` named,
    which neither ssl's errors nor an OSError from it do."""
    if topic.ca_file is None:
        return f"topics.{topic.name}: {error}"
    return f"topics.{topic.name}.ca_file: {_naming(topic.ca_file, error)}"


def build_backend(topic: TopicConfig) -> Backend:
    if topic.kind == "fastcgi":
        assert topic.script is not None
        return FastCGIBackend(
            FastCGITarget(
                address=parse_address(topic.backend),
                script=topic.script,
                uri=topic.uri,
                document_root=topic.document_root,
                host=topic.host,
                content_type=topic.content_type,
                timeout=topic.timeout,
                connect_timeout=topic.connect_timeout,
                max_connections=topic.concurrency,
                keep_alive=topic.keep_alive,
            )
        )
    return HTTPBackend(
        HTTPTarget(
            url=topic.backend,
            timeout=topic.timeout,
            connect_timeout=topic.connect_timeout,
            content_type=topic.content_type,
            max_connections=topic.concurrency,
            verify_tls=topic.verify_tls,
            ca_file=topic.ca_file,
        )
    )


@dataclass(frozen=True, slots=True)
class AppStatistics:
    resp: RespStatistics
    dispatchers: tuple[DispatcherStatistics, ...]


class App:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._wallclock = WallClock(clock)  # steps since the start, for every dispatcher
        self.store: Store | None = None
        self.service: ProducerService | None = None
        self.resp: RespServer | None = None
        self.resp_address = ""
        self.http_address = ""
        self.http: HTTPServer | None = None
        self._draining = False
        self._dispatchers: dict[tuple[str, str], Dispatcher] = {}
        #: Those a reload stopped, until their deliveries have drained: a shutdown meanwhile
        #: cuts them short too, and the stats count what they have in flight.
        self._stopping: dict[tuple[str, str], Dispatcher] = {}
        self._dispatcher_nursery: trio.Nursery | None = None
        #: A reload's changes are made one reload at a time (``apply``), and a drained
        #: topic's restart (``_restart_when_drained``) between two of them.
        self._reload_lock = trio.Lock()
        #: The backend each stopping topic starts with once drained (a changed topic).
        self._waiting: dict[Key, Backend] = {}
        self._restarted = trio.Event()  # set (and replaced) as each stopping topic is done
        self._producers: trio.CancelScope | None = None
        self._producers_drained = trio.Event()
        #: Bounds the producers' drain; a second shutdown() may bring it forward.
        self._producer_drain = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    @property
    def draining(self) -> bool:
        """Shutting down: no longer accepting or reserving."""
        return self._draining

    def dispatcher(self, queue: str, topic: str) -> Dispatcher:
        return self._dispatchers[queue, topic]

    def dispatcher_statistics(self) -> dict[tuple[str, str], DispatcherStatistics]:
        # A changed topic's new dispatcher starts once its old one has drained: one a key.
        running = {**self._stopping, **self._dispatchers}
        return {key: d.statistics() for key, d in running.items()}

    def statistics(self) -> AppStatistics:
        assert self.resp is not None
        return AppStatistics(
            resp=self.resp.statistics(),
            dispatchers=tuple(d.statistics() for d in self._dispatchers.values()),
        )

    async def run(self, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        try:
            token = read_token(config.admin_token_file)
        except (OSError, ValueError) as exc:
            raise StartupError(token_problem(config.admin_token_file, exc)) from None
        backends = build_backends(config)
        # Before the store: a Redis named by host name is looked up through it too.
        trio.socket.set_custom_hostname_resolver(Resolver())
        self.store = store = await open_store(config.store, clock=self._clock)
        try:
            self.service = ProducerService(store, Directory(config), clock=self._clock)
            self.health = BackendHealth(self._topics)
            self.telemetry = Telemetry(
                store,
                lambda: self.config,
                self.dispatcher_statistics,
                self.health.current,
                clock=self._clock,
                refused=self.service.refusals.statistics,
                failed=self.service.failures.statistics,
            )
            self.admin = AdminAPI(self, self.telemetry, token)
            self.resp = RespServer(self.service, config.listen_resp, config.producer)
            self.http = HTTPServer(
                self._routes(),
                config.listen_http.host,
                config.listen_http.port,
                lambda: self.config.producer.max_connections,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                await nursery.start(self.health.run)
                async with trio.open_nursery() as dispatchers:
                    self._dispatcher_nursery = dispatchers
                    self._producers = trio.CancelScope()
                    self._nursery = nursery
                    # The ports before any job is reserved: one taken (or an address not up
                    # yet at boot) fails the start with nothing under way.  After, it cut
                    # deliveries short, and each restart ran the head of the queue again.
                    self.resp_address = await nursery.start(self._run_producers)
                    self.http_address = await nursery.start(self.http.run)
                    for queue in config.queues.values():
                        for topic in queue.topics:
                            await self._start_dispatcher(topic, backends[queue.name, topic.name])
                    await nursery.start(self.telemetry.run)
                    log.info(
                        "busgate running: %d queues, %d topics, store %s",
                        len(config.queues),
                        len(self._dispatchers),
                        config.store.redacted_url,
                    )
                    for note in php_fpm_notes(config):
                        log.info("%s", note)
                    for warning in config_warnings(config):
                        log.warning("%s", warning)
                    task_status.started(self)
                    await self._stopped.wait()
                await self._producers_drained.wait()  # the replies owed for stored pushes
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()

    def _topics(self) -> list[TopicConfig]:
        return [t for q in self.config.queues.values() for t in q.topics]

    def _routes(self) -> Router:
        assert self.service is not None
        router = Router()
        add_producer_routes(router, self.service)
        router.add("GET", "/healthz", self._healthz)
        router.add("GET", "/readyz", self._readyz)
        router.add("GET", "/metrics", self._metrics, guard=self.admin.authorize)
        self.admin.routes(router)
        self._registry = registry_for(self.telemetry)
        return router

    async def _metrics(self, request: Request) -> Response:
        return Response(200, render_metrics(self._registry), content_type=METRICS_CONTENT_TYPE)

    async def _healthz(self, request: Request) -> Response:
        return Response.json({"status": "ok"})

    async def _readyz(self, request: Request) -> Response:
        """Ready: the store answers and the daemon is not draining."""
        assert self.store is not None
        if self._draining:
            return Response.json({"status": "draining"}, 503)
        try:
            with trio.fail_after(READY_TIMEOUT):
                await self.store.check()
        except StoreLoading as exc:  # a Redis restarting: calls wait for it meanwhile
            return Response.json({"status": "loading", "error": str(exc)}, 503)
        except StoreError as exc:
            return Response.json({"status": "store unavailable", "error": str(exc)}, 503)
        except trio.TooSlowError:
            error = f"the store did not answer within {READY_TIMEOUT:g}s"
            return Response.json({"status": "store unavailable", "error": error}, 503)
        return Response.json({"status": "ready"})

    async def _drain_producers(self, deadline: float) -> None:
        """Close the Redis-protocol port at once; end its connections once none is owed a
        reply for a push the store already has (a push now is refused, as on HTTP).  The
        HTTP server is ended with the daemon: by then it is answering no request.

        No later than ``deadline``, the deliveries' own bound: a producer that does not read
        its replies must not hold the stop past what the README promises.
        """
        assert self.resp is not None and self.http is not None and self._producers is not None
        self._producer_drain.deadline = min(self._producer_drain.deadline, deadline)
        try:
            with self._producer_drain:
                async with trio.open_nursery() as both:
                    both.start_soon(self.resp.drain)
                    both.start_soon(self.http.drain, FLUSH_GRACE + HTTP_SEND_TIMEOUT)
        finally:
            self._producers.cancel()
            self._producers_drained.set()

    async def _run_producers(self, *, task_status: trio.TaskStatus[str]) -> None:
        assert self._producers is not None and self.resp is not None
        with self._producers:
            await self.resp.run(task_status=task_status)

    async def _start_dispatcher(self, topic: TopicConfig, backend: Backend) -> None:
        assert self.store is not None and self._dispatcher_nursery is not None
        dispatcher = Dispatcher(
            self.store,
            topic,
            backend,
            clock=self._clock,
            wallclock=self._wallclock,
            listeners=(self.telemetry.record,),
        )
        self._dispatchers[dispatcher.key] = dispatcher
        await self._dispatcher_nursery.start(dispatcher.run)

    async def reload(self, new: Config) -> ReloadReport:
        """``apply`` a new configuration, then wait until every topic it changed runs again
        (``settled``)."""
        report = await self.apply(new)
        await self.settled()
        return report

    async def apply(self, new: Config) -> ReloadReport:
        """Apply a new configuration without stopping pushes or losing a delivery.

        Producers switch to the new queues in one assignment, and added topics start.  A
        removed or changed topic's dispatcher stops reserving and drains its in-flight
        deliveries (each may run to its topic's timeout); a changed topic's new dispatcher
        starts once it has, so a FastCGI pool is never open twice.  That happens on its own,
        each topic on its own: this returns without waiting for it, so a reload that comes
        meanwhile (a new queue, a rotated password) takes effect at once rather than behind
        a slow delivery.  Raises ``ReloadRefused`` for changes that need a restart, or a
        backend that cannot be set up; nothing has changed then.
        """
        async with self._reload_lock:  # one at a time; its drains are not waited for
            report = await self._apply(new)
        log.info("configuration reloaded: %s", report)
        await self._warn_of_jobs_left(list(report.removed))
        for note in php_fpm_notes(new):
            log.info("%s", note)
        for warning in config_warnings(new):
            log.warning("%s", warning)
        return report

    async def settled(self) -> None:
        """Wait until no topic a reload stopped is still draining, and those it changed run
        again."""
        while self._stopping:
            await self._restarted.wait()

    async def _apply(self, new: Config) -> ReloadReport:
        old = self.config
        refused = [
            what
            for what, before, after in (
                ("store", old.store, new.store),
                ("listen.resp", old.listen_resp, new.listen_resp),
                ("listen.http", old.listen_http, new.listen_http),
            )
            if before != after
        ]
        if refused:
            raise ReloadRefused(f"{', '.join(refused)} changed: restart busgate to apply")
        try:
            token = read_token(new.admin_token_file)
        except (OSError, ValueError) as exc:
            raise ReloadRefused(token_problem(new.admin_token_file, exc)) from None
        assert self.service is not None and self._dispatcher_nursery is not None
        new_topics, old_topics = _topics_of(new), _topics_of(old)
        removed = [key for key in old_topics if key not in new_topics]
        added = [key for key in new_topics if key not in old_topics]
        changed, toggled = [], []
        for key in new_topics.keys() & old_topics.keys():
            before, after = old_topics[key], new_topics[key]
            if before == after:
                continue
            if replace(before, paused=after.paused) == after:
                toggled.append(key)
            else:
                changed.append(key)
        # Everything that can fail is done before anything changes: the old config runs on.
        try:
            backends = build_backends(new, {*added, *changed})
        except StartupError as exc:
            raise ReloadRefused(str(exc)) from None
        settings = _settings_changed(old, new, token != self.admin.token)
        self.config = new
        self.service.reload(Directory(new))
        if self.resp is not None:
            self.resp.limits = new.producer  # read afresh by every connection and read
        self.admin.token = token
        for key in toggled:
            # One still draining after an earlier reload starts with this config's `paused`.
            if (dispatcher := self._dispatchers.get(key)) is not None:
                dispatcher.topic = new_topics[key]
                if new_topics[key].paused:
                    dispatcher.pause()
                else:
                    dispatcher.resume()
        now = trio.current_time()
        for key in removed + changed:
            if (dispatcher := self._dispatchers.pop(key, None)) is not None:
                self._stopping[key] = dispatcher
                # Nothing stops the daemon here: a delivery may run to its own timeout (and
                # a moment more for that to fire), rather than be cut and run again.
                dispatcher.stop(now + max(new.shutdown_timeout, dispatcher.topic.timeout + 1))
                self._dispatcher_nursery.start_soon(self._restart_when_drained, key)
            # Otherwise an earlier reload's dispatcher still drains: what starts after it is
            # what the latest reload says.
            if key in changed:
                self._waiting[key] = backends[key]
            else:
                self._waiting.pop(key, None)
        for key in added:
            if key in self._stopping:  # removed by an earlier reload, and still draining
                self._waiting[key] = backends[key]
            elif not self._draining:  # a shutdown began: start nothing more
                await self._start_dispatcher(new_topics[key], backends[key])
        return ReloadReport(tuple(added), tuple(removed), tuple(changed), tuple(toggled), settings)

    async def _restart_when_drained(self, key: Key) -> None:
        """Once the dispatcher a reload stopped has drained, start what the configuration
        now says for its topic, if anything."""
        await self._stopping[key].finished.wait()
        async with self._reload_lock:
            backend = self._waiting.pop(key, None)
            if backend is not None and not self._draining:
                await self._start_dispatcher(_topics_of(self.config)[key], backend)
            del self._stopping[key]
        self._restarted.set()
        self._restarted = trio.Event()

    async def _warn_of_jobs_left(self, removed: list[Key]) -> None:
        """A removed topic's jobs stay in the store, where nothing delivers them: say so,
        once per topic that holds any (the stats list it, not configured, meanwhile)."""
        assert self.store is not None
        if not removed:
            return
        try:
            # One read for them all (a whole queue's drop-in may have gone), one deadline.
            with trio.fail_after(5):
                left = await self.store.stats_many(removed)
        except (StoreError, trio.TooSlowError) as exc:
            # The reload is done; the warning is only a courtesy.
            why = str(exc) or "the store did not answer within 5s"
            log.warning("could not count the jobs left in removed topics: %s", why)
            return
        for stats in left:
            waiting = stats.ready + stats.delayed + stats.leased
            if waiting or stats.dead:
                log.warning(
                    "topic %s/%s was removed with %d jobs waiting (%d ready, %d delayed,"
                    " %d leased) and %d dead: they stay in the store, undelivered, until a"
                    " topic of that name comes back; /v1/stats and `busgate stats` list it"
                    " as not configured meanwhile",
                    stats.queue,
                    stats.topic,
                    waiting,
                    stats.ready,
                    stats.delayed,
                    stats.leased,
                    stats.dead,
                )

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting and reserving now; cancel deliveries still running after ``timeout``.

        Called again during the drain, it only brings the end forward (a second SIGTERM).
        """
        grace = self.config.shutdown_timeout if timeout is None else timeout
        deadline = trio.current_time() + grace if math.isfinite(grace) else math.inf
        first = not self._draining
        if first:
            log.info("shutting down: draining in-flight deliveries for up to %gs", grace)
        self._draining = True
        if self.service is not None:
            self.service.stop()  # HTTP pushes; the RESP listener closes below
        if first and self._nursery is not None:
            self._nursery.start_soon(self._drain_producers, deadline + RECORD_GRACE)
        elif first:  # still starting: no producer has been served
            self._producers_drained.set()
        else:
            drain = self._producer_drain
            drain.deadline = min(drain.deadline, deadline + RECORD_GRACE)
        for dispatcher in [*self._dispatchers.values(), *self._stopping.values()]:
            dispatcher.stop(deadline)
        self._stopped.set()
