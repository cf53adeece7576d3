"""The ``busgate`` command.

busgate run -c busgate.yaml            run the daemon (SIGHUP reloads, SIGTERM drains)
busgate check-config -c busgate.yaml   validate and print the effective configuration
busgate demo                           the daemon plus the bundled sample backend
busgate curl JOB_ID                    a command that repeats a job's delivery
busgate stats | jobs show | dead list|replay|delete | pause | resume | push
                                       operator commands over the admin and producer APIs
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import trio

from adapters.storage.errors import (
    StoreCorrupt,
    StoreError,
    StoreRefused,
    StoreUnsupported,
)
from gateway import heap, logs
from gateway.admin import read_token
from gateway.admin_cli import add_admin_commands
from gateway.app import App, ReloadRefused, StartupError, build_backends, token_problem
from gateway.config import (
    DEFAULT_CONFIG,
    ConfigError,
    config_warnings,
    load_config,
    render_effective,
)
from gateway.systemd import Notifier, run_watchdog, watchdog_interval

log = logging.getLogger("busgate")


async def serve(config_path: str) -> None:
    """Run the daemon until SIGTERM or SIGINT; reload the configuration on SIGHUP.

    Under systemd (``$NOTIFY_SOCKET``) it reports READY once producers are served,
    RELOADING/READY around a reload, STOPPING on shutdown, and pings the watchdog.
    """
    config = load_config(config_path)
    raise_open_files_limit(2 * config.producer.max_connections + _SPARE_FILES)
    notifier = Notifier.from_environ()
    interval = watchdog_interval()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as outer:
            outer.start_soon(logs.flushing)  # info lines in batches; all written on the way out
            if interval is not None:
                # Outside the App's nursery: it keeps pinging while in-flight work drains.
                await outer.start(run_watchdog, notifier, interval)
            async with trio.open_nursery() as nursery:
                app: App = await nursery.start(App(config).run)
                heap.settle()
                await notifier.ready(_status(app))
                reloads = _Reloads(app, config_path, notifier)
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        await notifier.stopping("draining in-flight deliveries")
                        app.shutdown()
                        break
                    reloads.request(nursery)
                outer.start_soon(_hurry, signals, app)
            outer.cancel_scope.cancel()


async def _hurry(signals: AsyncIterator[int], app: App) -> None:
    """A second SIGTERM or SIGINT (Ctrl-C twice) during the drain: stop waiting for
    in-flight deliveries, and release their jobs to the store now.  A backend may have
    started one: it is delivered again (at-least-once), with no attempt spent."""
    async for signum in signals:
        if signum != signal.SIGHUP:
            log.warning(
                "%s again: cancelling in-flight deliveries now; their jobs go back to the store",
                signal.Signals(signum).name,
            )
            app.shutdown(0)
            return


#: Descriptors beside the producer connections: backends, the store, logs, listeners.
_SPARE_FILES = 1024


def raise_open_files_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (the hard limit caps it), as
    Redis does for its maxclients: a shell's default of 1024 would refuse producers long
    before ``max_connections``.  Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open files limit from %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open files limit %d is below the %d that producer.max_connections (on each of"
            " listen.resp and listen.http) needs: raise LimitNOFILE, or lower max_connections",
            soft,
            wanted,
        )
    return soft


class _Reloads:
    """SIGHUP reloads, run beside the signal loop so that a SIGTERM is acted on at once even
    while a reload waits for changed topics to drain.  One runs at a time; a SIGHUP during
    one asks for another once it ends (the file may have changed again)."""

    def __init__(self, app: App, config_path: str, notifier: Notifier) -> None:
        self.app = app
        self.config_path = config_path
        self.notifier = notifier
        self._running = False
        self._again = False

    def request(self, nursery: trio.Nursery) -> None:
        if self._running:
            self._again = True
            return
        self._running = True
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                await self.notifier.reloading()
                await reload(self.app, self.config_path)
                heap.settle()
                if self.app.draining:
                    return  # STOPPING was sent; READY would take it back
                await self.notifier.ready(_status(self.app))
                if not self._again:
                    return
        finally:
            self._running = False


def _status(app: App) -> str:
    queues = len(app.config.queues)
    topics = sum(len(q.topics) for q in app.config.queues.values())
    return f"{queues} queues, {topics} topics; redis protocol on {app.resp_address}"


async def reload(app: App, config_path: str) -> bool:
    """Load and apply the configuration file; on any error keep running the old one."""
    log.info("SIGHUP: reloading %s", config_path)
    try:
        new = load_config(config_path)
        # Not app.reload: a changed topic restarts once drained, by itself, and the next
        # SIGHUP must not wait for that.
        await app.apply(new)
    except (ConfigError, ReloadRefused, StartupError) as exc:
        log.error("reload rejected, the running configuration stays: %s", exc)
        return False
    except Exception:  # a bug in reading it: the daemon must not die of a SIGHUP
        log.exception("reload of %s failed", config_path)
        return False
    return True


def _run(args: argparse.Namespace) -> int:
    trio.run(serve, args.config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    # The daemon reads the token at start and refuses to start without it: so does this.
    try:
        read_token(config.admin_token_file)
    except PermissionError as exc:
        # Not necessarily a mistake: this may run as another user than the daemon's.
        print(
            f"busgate: warning: admin_token_file: {exc} (as uid {os.getuid()});"
            " the daemon's user must be able to read it",
            file=sys.stderr,
        )
    except (OSError, ValueError) as exc:
        raise StartupError(token_problem(config.admin_token_file, exc)) from None
    build_backends(config)  # an https topic's ca_file is read at start: so it is here
    for warning in config_warnings(config):
        print(f"busgate: warning: {warning}", file=sys.stderr)
    sys.stdout.write(render_effective(config))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(once=args.once, port=args.port, http_port=args.http_port)


def _curl(args: argparse.Namespace) -> int:
    from adapters.storage.jobs import JobRecord
    from gateway.app import open_store
    from gateway.reproduce import ReproduceError, choose_copy, reproduce_command, topic_of

    config = load_config(args.config)
    store_config = config.store
    if store_config.kind == "sqlite" and not os.path.exists(str(store_config.path)):
        # Opening it would create an empty store; say where we looked instead.
        print(f"busgate: curl: no store at {store_config.path}", file=sys.stderr)
        return 1

    async def copies() -> list[JobRecord]:
        # Only to read: an operator who may read the store, not write it, can run this.
        store = await open_store(store_config, read_only=True)
        try:
            return await store.get_job(args.job_id)
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()

    records = trio.run(copies)
    try:
        record = choose_copy(args.job_id, records, args.topic)
        command = reproduce_command(topic_of(config, record), record)
    except ReproduceError as exc:
        print(f"busgate: curl: {exc}", file=sys.stderr)
        return 1
    print(command)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="busgate", description="A job gateway.")
    parser.add_argument(
        "--log-level", choices=logs.LEVELS, help="default: $BUSGATE_LOG_LEVEL, else info"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    check.set_defaults(handler=_check_config)

    demo = commands.add_parser("demo", help="run the daemon with the bundled sample backend")
    demo.add_argument("--once", action="store_true", help="exit after the first job is delivered")
    demo.add_argument("--port", type=int, default=12018, help="Redis-protocol port (0: any)")
    demo.add_argument(
        "--http-port", type=int, default=12019, help="dashboard and HTTP API port (0: any)"
    )
    demo.set_defaults(handler=_demo)

    curl = commands.add_parser(
        "curl", help="print a command (curl or cgi-fcgi) that delivers a stored job again"
    )
    curl.add_argument("job_id", metavar="JOB_ID")
    curl.add_argument("--topic", help="NAME or QUEUE/NAME, when the job went to several topics")
    curl.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    curl.set_defaults(handler=_curl)

    add_admin_commands(commands)

    args = parser.parse_args(argv)
    logs.setup(args.log_level or _environ_log_level(parser))
    try:
        try:
            code: int = args.handler(args)
        except BaseExceptionGroup as group:
            # An error raised at startup reaches here wrapped by the nurseries it crossed.
            raise _sole(group) from None
    except ConfigError as exc:
        print(f"busgate: configuration error: {exc}", file=sys.stderr)
        return 2
    except (StartupError, StoreError) as exc:
        # `run` cannot start; `check-config` or `curl` say which of them failed.
        doing = "cannot start" if args.command in ("run", "demo") else args.command
        print(f"busgate: {doing}: {exc}", file=sys.stderr)
        # A file the configuration names that cannot be used (StartupError), or a store that
        # refuses the configured login (or busgate's user), is not busgate's, or cannot be
        # read, is a configuration matter too, which starting again does not mend (the
        # unit's RestartPreventExitStatus=2); a store that cannot be reached now may be later.
        permanent = StartupError | StoreRefused | StoreUnsupported | StoreCorrupt
        return 2 if isinstance(exc, permanent) else 1
    except OSError as exc:  # a port in use, a file that cannot be read: no traceback
        hint = ""
        if args.command == "demo" and exc.errno == errno.EADDRINUSE:
            # Most likely another demo, still running in some terminal, on the default ports.
            hint = (
                f" (port {args.port} or {args.http_port}; another busgate demo running?"
                " --port and --http-port pick others, 0 any free one)"
            )
        print(f"busgate: {exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def _environ_log_level(parser: argparse.ArgumentParser) -> str:
    """``$BUSGATE_LOG_LEVEL``, or info when it is unset or empty (``BUSGATE_LOG_LEVEL=`` in
    an EnvironmentFile).  argparse checks the choices of a flag given, not of a default, so
    a level it does not know is refused here, as the flag would be: exit status 2."""
    # In any case, as before the check (`INFO` in an env file worked, and must go on).
    level = (os.environ.get("BUSGATE_LOG_LEVEL") or "info").lower()
    if level not in logs.LEVELS:
        parser.error(
            f"BUSGATE_LOG_LEVEL: invalid choice: {level!r} (choose from {', '.join(logs.LEVELS)})"
        )
    return level


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested one-exception groups; else the group itself."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner


if __name__ == "__main__":
    sys.exit(main())
