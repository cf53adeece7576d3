"""Bulk replay and delete act on what was counted and confirmed, while failures keep arriving.

* A replay or delete by filter counted the dead jobs in one listing and acted on a second:
  with failures arriving it answered ``{"matched": 6176, "replayed": 6191}``, and read the
  dead set twice.  Now it lists once and acts on the ids it counted.
* The dashboard and ``busgate dead delete`` confirmed a dry run's count, then sent the filter
  again: the jobs that failed while the operator read the question were deleted too (36
  confirmed, 94 deleted).  A dry run now answers a ``confirm`` token, and the act with it
  touches the jobs counted, or none (409) when they changed.  ``busgate dead replay``
  collected its ids after asking: it now asks about the ids it replays.

A real daemon runs in-process on SQLite or on a real redis-server, delivering to the h11
recording backend, which makes every job dead at its first attempt; the CLI runs as a
subprocess on a terminal (a pty), as an operator's shell would.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from adapters.storage.jobs import State
from tests.gateway.test_admin import api
from tests.gateway.test_admin_cli import ROOT
from tests.gateway.test_operator_review import DEAD, DIES, Daemon
from tests.gateway.test_operator_review import daemon as daemon  # the fixture

DONE = {"replay": "replayed", "delete": "deleted"}


async def fail_more(daemon: Daemon, count: int) -> None:
    """Push ``count`` jobs and wait until they are dead: failures arriving meanwhile."""
    before = (await daemon.depth())["dead"]
    await daemon.push(*[DIES] * count)
    with trio.fail_after(20):
        while (await daemon.depth())["dead"] < before + count:
            await trio.sleep(0.02)


def failing_after_a_listing(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make 5 more jobs fail as soon as the store has listed the dead jobs once; the list
    holds one entry per listing the store was asked for (each starts without a cursor)."""
    store = daemon.app.store
    assert store is not None
    real_list_dead = store.list_dead
    listings: list[int] = []

    async def list_dead(queue: str, topic: str, where: Any, cursor: Any, limit: int) -> Any:
        if cursor is None:
            listings.append(1)
        page = await real_list_dead(queue, topic, where, cursor, limit)
        if page.cursor is None and len(listings) == 1 and topic == "email":
            await fail_more(daemon, 5)
        return page

    monkeypatch.setattr(store, "list_dead", list_dead)
    return listings


async def dead_now(daemon: Daemon, ids: list[str]) -> list[bool]:
    return [state is State.DEAD for state in await daemon.states(ids)]


# -- one listing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "body"), [("delete", {"all": True}), ("replay", {"filter": {"status": 404}})]
)
async def test_a_bulk_act_lists_once_and_acts_on_what_it_counted(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, action: str, body: dict[str, Any]
) -> None:
    await daemon.push(*[DIES] * 30)
    counted = await daemon.dead_ids(30)
    listings = failing_after_a_listing(daemon, monkeypatch)
    status, answer = await api(daemon.app, "POST", f"{DEAD}/{action}", body)
    assert (status, answer) == (200, {"matched": 30, DONE[action]: 30})
    assert len(listings) == 1  # the dead set is read once
    store = daemon.app.store
    assert store is not None
    arrived = [i for i in await daemon.dead_ids(5) if i not in counted]
    assert len(arrived) == 5 and await dead_now(daemon, arrived) == [True] * 5
    if action == "delete":
        assert await daemon.depth() == {"ready": 0, "leased": 0, "dead": 5}
    else:
        assert (await store.stats("orders", "email")).replayed_total == 30


# -- the confirmed set ------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["delete", "replay"])
async def test_a_confirmed_act_touches_the_jobs_its_dry_run_counted(
    daemon: Daemon, action: str
) -> None:
    await daemon.push(*[DIES] * 30)
    counted = await daemon.dead_ids(30)
    where = {"filter": {"status": 404}}
    status, dry = await api(daemon.app, "POST", f"{DEAD}/{action}", {**where, "dry_run": True})
    assert status == 200 and dry["matched"] == 30, dry
    await fail_more(daemon, 7)  # while the operator reads the dialog
    body = {**where, "confirm": dry["confirm"]}
    status, answer = await api(daemon.app, "POST", f"{DEAD}/{action}", body)
    assert (status, answer) == (200, {"matched": 30, DONE[action]: 30})
    arrived = [i for i in await daemon.dead_ids(7) if i not in counted]
    assert len(arrived) == 7 and await dead_now(daemon, arrived) == [True] * 7
    store = daemon.app.store
    assert store is not None
    if action == "delete":
        assert await daemon.depth() == {"ready": 0, "leased": 0, "dead": 7}
    else:
        assert (await store.stats("orders", "email")).replayed_total == 30


async def test_a_confirmation_of_jobs_that_changed_does_nothing(daemon: Daemon) -> None:
    await daemon.push(*[DIES] * 12)
    counted = await daemon.dead_ids(12)
    status, dry = await api(daemon.app, "POST", DEAD + "/delete", {"all": True, "dry_run": True})
    assert status == 200 and dry["matched"] == 12, dry
    # Another operator deletes one of them meanwhile.
    assert (await api(daemon.app, "POST", DEAD + "/delete", {"ids": counted[5:6]}))[0] == 200
    await fail_more(daemon, 3)
    status, answer = await api(
        daemon.app, "POST", DEAD + "/delete", {"all": True, "confirm": dry["confirm"]}
    )
    assert (status, answer["matched"], answer["deleted"]) == (409, 11, 0), answer
    assert "no longer the 12 the dry run counted" in answer["error"]
    assert await daemon.depth() == {"ready": 0, "leased": 0, "dead": 14}

    for body, message in [
        ({"all": True, "confirm": 7}, '"confirm" must be the token a dry run answered'),
        ({"all": True, "confirm": "12/abc"}, "confirm: invalid confirmation '12/abc'"),
        ({"all": True, "confirm": "1/" + "0" * 32 + "/nan/x"}, "confirm: invalid confirmation"),
        ({"ids": counted, "confirm": dry["confirm"]}, '"confirm" goes with the "filter" or'),
    ]:
        status, answer = await api(daemon.app, "POST", DEAD + "/delete", body)
        assert status == 400 and answer["error"].startswith(message), (body, answer)


# -- the CLI asks about what it acts on -------------------------------------------------------


async def asked(
    daemon: Daemon, *args: str, meanwhile: Callable[[], Awaitable[None]]
) -> tuple[int, str, str]:
    """Run ``busgate ARGS`` on a terminal; run ``meanwhile`` while its question is shown,
    then answer yes.  Its exit status, stdout and stderr."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BUSGATE_")}
    environ["PYTHONPATH"] = str(ROOT)
    controller, terminal = pty.openpty()
    command = [sys.executable, "-m", "gateway.cli", *args]
    command += ["--url", f"http://{daemon.app.http_address}", "--token-file"]
    command += [str(daemon.token_file)]
    try:
        process = await trio.lowlevel.open_process(
            command,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=environ,
        )
        assert process.stdout is not None and process.stderr is not None
        err = b""
        with trio.fail_after(30):
            while not err.endswith(b"[y/N] "):
                chunk = await process.stderr.receive_some()
                assert chunk, err
                err += chunk
            await meanwhile()
            os.write(controller, b"y\n")
            out = b""
            while chunk := await process.stdout.receive_some():
                out += chunk
            while chunk := await process.stderr.receive_some():
                err += chunk
            code = await process.wait()
    finally:
        os.close(terminal)
        os.close(controller)
    return code, out.decode(), err.decode()


@pytest.mark.parametrize("action", ["delete", "replay"])
async def test_the_cli_acts_on_the_jobs_it_asked_about(daemon: Daemon, action: str) -> None:
    await daemon.push(*[DIES] * 20)
    counted = await daemon.dead_ids(20)
    code, out, err = await asked(
        daemon,
        "dead",
        action,
        "orders/email",
        "--status",
        "404",
        meanwhile=lambda: fail_more(daemon, 6),
    )
    assert (code, err) == (0, f"{action.capitalize()} 20 dead jobs of orders/email? [y/N] "), out
    store = daemon.app.store
    assert store is not None
    if action == "delete":
        assert out == "deleted 20 dead jobs of orders/email\n"
        assert await daemon.depth() == {"ready": 0, "leased": 0, "dead": 6}
    else:
        assert out.startswith("replayed 20 of 20 dead jobs of orders/email in "), out
        assert (await store.stats("orders", "email")).replayed_total == 20
    arrived = [i for i in await daemon.dead_ids(6) if i not in counted]
    assert len(arrived) == 6 and await dead_now(daemon, arrived) == [True] * 6
