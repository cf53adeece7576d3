"""The ``busgate`` command.

busgate run -c busgate.yaml            run the daemon (SIGHUP reloads, SIGTERM drains)
busgate check-config -c busgate.yaml   validate and print the effective configuration
busgate demo                           the daemon plus the bundled sample backend
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from adapters.storage.errors import StoreError
from gateway.app import App, StartupError
from gateway.config import Config, ConfigError, load_config, render_effective

log = logging.getLogger("busgate")

DEFAULT_CONFIG = "/etc/busgate/busgate.yaml"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


async def serve(config: Config) -> None:
    """Run the daemon until SIGTERM or SIGINT; reload on SIGHUP."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            app: App = await nursery.start(App(config).run)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.warning("SIGHUP: reload is not supported yet; restart to apply changes")
                    continue
                app.shutdown()
                break


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    trio.run(serve, config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    sys.stdout.write(render_effective(config))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(once=args.once, port=args.port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="busgate", description="A job gateway.")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("BUSGATE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
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
    demo.set_defaults(handler=_demo)

    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"busgate: configuration error: {exc}", file=sys.stderr)
        return 2
    except (StartupError, StoreError) as exc:
        print(f"busgate: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
