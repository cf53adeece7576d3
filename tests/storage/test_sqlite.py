"""SQLite-only behaviour: durability across reopen, and clear errors for bad files."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import trio

from adapters.storage import sqlite as sqlite_module
from adapters.storage.errors import StoreCorrupt, StoreUnavailable
from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from adapters.storage.sqlite import SQLiteStore
from tests.support.sqlite import cap_pages

ROUTES = [("email", Filter())]


async def test_jobs_survive_a_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "db" / "busgate.db")  # the parent directory is created
    store = await SQLiteStore.open(path)
    pushed = await store.push("orders", ROUTES, [NewJob(b"kept", id="k1")])
    (leased,) = await store.reserve("orders", "email", 1, lease=0.0)  # lease already expired
    assert leased.id == "k1"
    await store.aclose()

    store = await SQLiteStore.open(path)
    try:
        assert (await store.recover_expired("orders", "email", 5)).count == 1
        (job,) = await store.reserve("orders", "email", 1, lease=30)
        assert (job.id, job.payload, job.attempt) == (pushed.ids[0], b"kept", 2)
        assert os.path.exists(path + "-wal")  # WAL mode
    finally:
        await store.aclose()


async def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "busgate.db"
    path.write_bytes(b"this is not a sqlite database at all" * 100)
    with pytest.raises(StoreCorrupt, match=rf"{path}: the SQLite file is corrupt"):
        await SQLiteStore.open(str(path))


async def test_unopenable_path_names_the_file(tmp_path: Path) -> None:
    # Fails for root as well as for a service user: a directory, or a file as parent.
    path = tmp_path / "is-a-directory"
    path.mkdir()
    with pytest.raises(StoreUnavailable, match=str(path)):
        await SQLiteStore.open(str(path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreUnavailable, match=str(blocker / "busgate.db")):
        await SQLiteStore.open(str(blocker / "busgate.db"))
    # Python refuses this path before SQLite sees it (ValueError): open() once waited for
    # the writer thread that exception had ended.
    with trio.fail_after(10), pytest.raises(StoreUnavailable, match="embedded null byte"):
        await SQLiteStore.open(str(tmp_path / "a\0b.db"))


async def test_read_only_file_rejects_writes_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    store = await SQLiteStore.open(str(path))
    await store.aclose()
    # Reopen through a read-only URI: every write fails, naming the file, and nothing is lost.
    store = await SQLiteStore.open(f"file:{path}?mode=ro")
    try:
        with pytest.raises(StoreUnavailable, match="readonly"):
            await store.push("orders", ROUTES, [NewJob(b"x")])
        with pytest.raises(StoreUnavailable, match="readonly"):
            await store.check()  # not ready: /readyz says so
    finally:
        await store.aclose()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_push_into_a_deleted_or_replaced_file_is_refused(tmp_path: Path, how: str) -> None:
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path))
    try:
        await store.push("orders", ROUTES, [NewJob(b"kept")])
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        if how == "replaced":
            path.write_bytes(b"")
        with pytest.raises(StoreUnavailable, match="deleted or replaced while busgate"):
            await store.push("orders", ROUTES, [NewJob(b"would be lost")])
    finally:
        await store.aclose()


async def _changes(store: SQLiteStore) -> int:
    return await store._writer.run(lambda conn: conn.total_changes)


async def test_not_ready_while_the_disk_is_full_and_ready_again_once_there_is_room(
    tmp_path: Path,
) -> None:
    store = await SQLiteStore.open(str(tmp_path / "busgate.db"))
    try:
        before = await _changes(store)
        await store.check()
        assert await _changes(store) == before  # a healthy store: no write per check

        await cap_pages(store, 0)
        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            await store.push("orders", ROUTES, [NewJob(b"x" * 20_000)])
        # An empty transaction would still succeed: the check writes, and is refused.
        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            await store.check()
        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            await store.check()

        await cap_pages(store, 1000)  # room again: found by the check, with no push
        await store.check()
        assert store._writer.write_failure is None
        changes = await _changes(store)
        await store.check()
        assert await _changes(store) == changes  # back to no write per check
        pushed = await store.push("orders", ROUTES, [NewJob(b"x" * 20_000)])
        (job,) = await store.reserve("orders", "email", 1, lease=30)
        assert job.id == pushed.ids[0]
        assert (
            await store._writer.run(
                lambda conn: conn.execute("SELECT count(*) FROM probe").fetchone()[0]
            )
            == 0
        )
    finally:
        await store.aclose()


async def test_every_push_is_written_under_synchronous_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A push is acknowledged once it is on disk (fsync): under NORMAL, a power cut could lose
    # it.  Reserves in between run under NORMAL, so the level switches back and forth.
    levels: list[str] = []  # the synchronous level each job insert ran under
    set_to = ["FULL"]  # the level as each PRAGMA set it

    def trace(statement: str) -> None:
        if statement.startswith("PRAGMA synchronous"):
            set_to.append(statement.rsplit("=", 1)[1].strip())
        elif statement.startswith("INSERT INTO jobs"):
            levels.append(set_to[-1])

    connect = sqlite_module._connect

    def traced(path: str) -> sqlite3.Connection:
        conn = connect(path)
        conn.set_trace_callback(trace)
        return conn

    monkeypatch.setattr(sqlite_module, "_connect", traced)
    store = await SQLiteStore.open(str(tmp_path / "busgate.db"))
    try:
        for n in range(3):
            await store.push("orders", [("email", Filter())], [NewJob(b"%d" % n)])
            await store.reserve("orders", "email", 1, lease=30)
    finally:
        await store.aclose()
    assert levels == ["FULL"] * 3
    assert "NORMAL" in set_to  # the reserves did switch it
