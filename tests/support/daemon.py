"""Running the daemon in-process for a test, with its config written to a temp directory."""

from __future__ import annotations

import base64
import json
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from gateway.app import App
from gateway.config import load_config


def write_config(
    directory: Path, queues: dict[str, str], *, main_extra: str = "", store: str | None = None
) -> Path:
    """Write busgate.yaml (``store``, by default an SQLite file beside it; RESP on a free
    port) and one drop-in per queue."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "conf.d").mkdir(exist_ok=True)
    main = directory / "busgate.yaml"
    main.write_text(
        textwrap.dedent(
            f"""\
            store: {store or f"sqlite:{directory / 'busgate.db'}"}
            listen:
              resp: 127.0.0.1:0
              http: 127.0.0.1:0
            include: conf.d/*.yaml
            shutdown_timeout: 5s
            """
        )
        + main_extra
    )
    for name, text in queues.items():
        (directory / "conf.d" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return main


@asynccontextmanager
async def running_daemon(
    config_path: Path, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[App]:
    """The daemon of ``config_path``, in this process; ``clock`` is its wall clock."""
    config = load_config(config_path)
    async with trio.open_nursery() as nursery:
        app: App = await nursery.start(App(config, clock=clock).run)
        try:
            yield app
        finally:
            app.shutdown(timeout=5)


@dataclass
class Received:
    """One request as the recording backend (record.php or the flup sample) saw it."""

    server: dict[str, str]
    body: bytes

    @property
    def job_id(self) -> str:
        return self.server["HTTP_X_BUSGATE_JOB_ID"]

    @property
    def attempt(self) -> int:
        return int(self.server["HTTP_X_BUSGATE_ATTEMPT"])


def read_received(path: Path) -> list[Received]:
    if not path.exists():
        return []
    # The backend appends under flock, but this reader takes no lock and may catch a line
    # half written: only lines that end in a newline are complete.
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    out = []
    for line in complete.splitlines():
        entry: dict[str, Any] = json.loads(line)
        out.append(Received(entry["server"], base64.b64decode(entry["body_b64"])))
    return out


async def wait_received(path: Path, count: int, *, timeout: float = 20.0) -> list[Received]:
    """Wait until the backend has recorded at least ``count`` requests."""
    with trio.fail_after(timeout):
        while len(received := read_received(path)) < count:
            await trio.sleep(0.02)
    return received
