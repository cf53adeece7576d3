"""The SQLite store against files it should not use, users it does not run as, and big jobs."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from adapters.storage import sqlite as sqlite_module
from adapters.storage.errors import StoreUnavailable, StoreUnsupported
from adapters.storage.fanout import Filter
from adapters.storage.jobs import DeadFilter, NewJob, State
from adapters.storage.sqlite import SQLiteStore
from tests.support.users import NOBODY, as_unprivileged, unprivileged_uid

ROUTES = [("email", Filter())]
ROOT = Path(__file__).resolve().parents[2]
BUSGATE_APPLICATION_ID = 0x62736774


def stamp(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        (application_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    return application_id, version


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    finally:
        conn.close()


async def test_a_new_store_is_stamped_as_busgate_schema_3(tmp_path: Path) -> None:
    store = await SQLiteStore.open(str(tmp_path / "busgate.db"))
    await store.aclose()
    assert stamp(tmp_path / "busgate.db") == (BUSGATE_APPLICATION_ID, 3)


async def test_a_store_from_before_the_stamp_keeps_its_jobs_and_is_stamped(tmp_path: Path) -> None:
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path))
    pushed = await store.push("orders", ROUTES, [NewJob(b"from an older busgate")])
    await store.aclose()
    conn = sqlite3.connect(path, isolation_level=None)
    # As every file was before the stamp: schema version 1's layout (payloads in jobs).
    conn.execute("ALTER TABLE jobs ADD COLUMN payload BLOB")
    conn.execute("UPDATE jobs SET payload = (SELECT payload FROM payloads WHERE seq = jobs.seq)")
    conn.execute("DROP TABLE payloads")
    conn.execute("PRAGMA application_id = 0")
    conn.execute("PRAGMA user_version = 0")
    conn.close()

    store = await SQLiteStore.open(str(path))
    try:
        (job,) = await store.reserve("orders", "email", 1, lease=30)
        assert (job.id, job.payload) == (pushed.ids[0], b"from an older busgate")
    finally:
        await store.aclose()
    assert stamp(path) == (BUSGATE_APPLICATION_ID, 3)


async def test_a_store_from_a_newer_busgate_is_refused_naming_both_versions(
    tmp_path: Path,
) -> None:
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path))
    await store.push("orders", ROUTES, [NewJob(b"kept")])
    await store.aclose()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE jobs ADD COLUMN tenant TEXT")  # what a newer busgate might do
    conn.execute("PRAGMA user_version = 4")
    conn.close()
    with pytest.raises(
        StoreUnsupported,
        match=rf"{path}: written by a newer busgate \(store schema version 4; this busgate"
        r" knows version 3",
    ):
        await SQLiteStore.open(str(path))
    assert stamp(path) == (BUSGATE_APPLICATION_ID, 4)  # left as it was


async def test_another_programs_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreUnsupported, match=rf"{path}: not a busgate store .*tables users"):
        await SQLiteStore.open(str(path))
    assert tables(path) == {"users"}  # no busgate table added to it

    other = tmp_path / "stamped.db"
    conn = sqlite3.connect(other)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(StoreUnsupported, match=rf"{other}: not a busgate store"):
        await SQLiteStore.open(str(other))


def open_as_other_user(path: Path) -> str:
    """Open the store and push one job in a subprocess as an unprivileged user (root may
    write anything): what it printed."""
    script = (
        "import sys, trio\n"
        "from adapters.storage.fanout import Filter\n"
        "from adapters.storage.jobs import NewJob\n"
        "from adapters.storage.sqlite import SQLiteStore\n"
        "from adapters.storage.errors import StoreError\n"
        "async def main():\n"
        "    try:\n"
        "        store = await SQLiteStore.open(sys.argv[1])\n"
        "    except StoreError as exc:\n"
        "        print('open:', exc); return\n"
        "    try:\n"
        "        await store.push('q', [('t', Filter())], [NewJob(b'x')])\n"
        "        print('pushed')\n"
        "    except StoreError as exc:\n"
        "        print('push:', exc)\n"
        "    finally:\n"
        "        await store.aclose()\n"
        "trio.run(main)\n"
    )
    result = subprocess.run(
        [*as_unprivileged(), sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    return result.stdout.strip()


def give_to_other_user(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)


async def test_a_read_only_directory_is_named_as_the_cause(shared_dir: Path) -> None:
    # The file itself is writable; SQLite cannot create busgate.db-wal and -shm beside it,
    # and says "attempt to write a readonly database".
    directory = shared_dir / "ro"
    directory.mkdir()
    path = directory / "busgate.db"
    store = await SQLiteStore.open(str(path))
    await store.aclose()
    give_to_other_user(directory)
    give_to_other_user(path)
    directory.chmod(0o555)
    said = open_as_other_user(path)
    assert said.startswith(f"open: {path}: attempt to write a readonly database"), said
    assert f"may not create files in {directory}: SQLite's WAL mode keeps busgate.db-wal" in said


async def test_a_read_only_file_stops_the_start_not_every_push(shared_dir: Path) -> None:
    path = shared_dir / "busgate.db"
    store = await SQLiteStore.open(str(path))
    await store.aclose()
    give_to_other_user(shared_dir)
    path.chmod(0o444)
    said = open_as_other_user(path)
    assert said.startswith(f"open: {path}: attempt to write a readonly database"), said
    assert f"may not read and write {path}" in said


async def test_a_directory_this_user_may_not_write_is_named(shared_dir: Path) -> None:
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o555)  # root's (or, not running as root, this user's): not writable
    said = open_as_other_user(locked / "busgate.db")
    user = unprivileged_uid()
    assert said == (
        f"open: {locked / 'busgate.db'}: unable to open database file"
        f" (user id {user} may not create files in {locked})"
    )


async def test_a_push_after_the_directory_was_replaced_by_a_file_is_refused(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    store = await SQLiteStore.open(str(directory / "busgate.db"))
    try:
        await store.push("orders", ROUTES, [NewJob(b"kept")])
        shutil.rmtree(directory)
        directory.write_text("a file where the store's directory was")
        with trio.fail_after(10):  # the writer thread died on ENOTDIR: this waited forever
            with pytest.raises(StoreUnavailable, match="deleted or replaced while busgate"):
                await store.push("orders", ROUTES, [NewJob(b"would be lost")])
            with pytest.raises(StoreUnavailable, match="deleted or replaced while busgate"):
                await store.check()
    finally:
        with trio.fail_after(10):
            await store.aclose()


async def test_an_error_around_a_group_answers_its_callers_and_the_writer_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a daemon not running as root meets when its directory loses its search
    # permission: os.stat() before a group fails, outside any operation.
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path))
    try:

        def denied(_path: str) -> tuple[int, int]:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(sqlite_module, "_identity", denied)
        with trio.fail_after(10):
            with pytest.raises(StoreUnavailable, match=rf"{path}: .*Permission denied"):
                await store.push("orders", ROUTES, [NewJob(b"x")])
        monkeypatch.undo()
        with trio.fail_after(10):
            pushed = await store.push("orders", ROUTES, [NewJob(b"y")])
            (job,) = await store.reserve("orders", "email", 1, lease=30)
        assert job.id == pushed.ids[0]
    finally:
        with trio.fail_after(10):
            await store.aclose()


async def test_the_wal_gives_its_room_back_after_a_large_push(tmp_path: Path) -> None:
    # SQLite reuses an emptied -wal from its start and never shrinks it: 64 MiB pushed in
    # one group kept a 64 MiB -wal for as long as the daemon ran.
    path = str(tmp_path / "busgate.db")
    store = await SQLiteStore.open(path)
    try:
        await store.push("q", [], [NewJob(os.urandom(1 << 20), topic="t") for _ in range(64)])
        for _ in range(3000):  # small groups: checkpoints run and the -wal starts over
            await store.push("q", [], [NewJob(b"x", topic="t")])
        wal = os.path.getsize(path + "-wal")
    finally:
        await store.aclose()
    assert wal <= sqlite_module.WAL_SIZE_LIMIT + (1 << 20), wal


async def test_a_page_of_dead_jobs_reads_about_the_rows_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every page fetched DEAD_SCAN_LIMIT rows (5,000) even when its first 100 matched:
    # `dead replay --all` over 100k dead jobs spent 20 s listing them.
    store = await SQLiteStore.open(str(tmp_path / "busgate.db"))
    try:
        await store.push("q", [], [NewJob(b"p", topic="t") for _ in range(20_000)])

        def kill_all(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE jobs SET state=?, finished_at=1e9 + seq", (State.DEAD,))

        await store._writer.run(kill_all)

        async def steps_for_a_page() -> int:
            """SQLite VM steps (in hundreds) to read one page of 100."""
            steps = 0

            def tick() -> int:
                nonlocal steps
                steps += 1
                return 0

            await store._writer.run(lambda conn: conn.set_progress_handler(tick, 100))
            page = await store.list_dead("q", "t", DeadFilter(), None, 100)
            await store._writer.run(lambda conn: conn.set_progress_handler(None, 0))
            assert len(page.jobs) == 100 and page.cursor is not None
            return steps

        scanning_5000 = await steps_for_a_page()
        monkeypatch.setattr(sqlite_module, "DEAD_SCAN_LIMIT", 200)
        scanning_200 = await steps_for_a_page()
    finally:
        await store.aclose()
    assert scanning_5000 < 3 * scanning_200, (scanning_5000, scanning_200)


@pytest.mark.parametrize(
    ("code", "text", "flag", "free_blocks", "cause"),
    [
        (sqlite3.SQLITE_IOERR_SHMSIZE, "disk I/O error", 0, 3, "is full (12 KiB free)"),
        (
            sqlite3.SQLITE_CANTOPEN,
            "unable to open database file",
            os.ST_RDONLY,
            10**6,
            "is mounted read-only",
        ),
        (sqlite3.SQLITE_IOERR_SHMSIZE, "disk I/O error", 0, 10**6, None),
    ],
    ids=["full", "read-only mount", "room left"],
)
def test_an_error_on_a_full_or_read_only_file_system_says_so(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    text: str,
    flag: int,
    free_blocks: int,
    cause: str | None,
) -> None:
    # Opening on a full disk said only "disk I/O error" (the -shm file cannot grow), and on
    # a read-only mount "user id 0 may not create files": the file system is the cause.
    path = tmp_path / "busgate.db"
    error = sqlite3.OperationalError(text)
    error.sqlite_errorcode = code
    real = os.statvfs(tmp_path)

    def statvfs(directory: str) -> os.statvfs_result:
        assert directory == str(tmp_path)
        fields = list(real)
        fields[0] = fields[1] = 4096  # f_bsize, f_frsize
        fields[3] = fields[4] = free_blocks  # f_bfree, f_bavail
        fields[8] = flag  # f_flag
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", statvfs)
    message = str(sqlite_module._store_error(str(path), error))
    if cause is None:
        assert message == f"{path}: {text}"
    else:
        assert message == f"{path}: {text} (the file system holding {tmp_path} {cause})"


@pytest.mark.parametrize("slashes", ["/", "//"])
async def test_an_operators_look_opens_the_path_the_daemon_opens(
    tmp_path: Path, slashes: str
) -> None:
    # POSIX lets a path start with "//" (store: sqlite:////srv/busgate.db gives one): the
    # daemon opened it, and the read-only look ``busgate curl`` takes read it as a URI
    # authority ("invalid uri authority", hunt 28).
    path = slashes + str(tmp_path / "busgate.db").lstrip("/")
    store = await SQLiteStore.open(path)
    try:
        pushed = await store.push("orders", ROUTES, [NewJob(b"seen")])
    finally:
        await store.aclose()
    look = await SQLiteStore.open(path, read_only=True)
    try:
        (record,) = await look.get_job(pushed.ids[0])
        assert record.state is State.READY
    finally:
        await look.aclose()


async def test_an_operators_look_through_a_link_reads_what_the_daemon_has_not_checkpointed(
    tmp_path: Path,
) -> None:
    # SQLite keeps the -wal beside the file a link names; looking for it beside the link, the
    # look opened the file as immutable and missed every write still in the WAL (review).
    (tmp_path / "data").mkdir()
    link = tmp_path / "busgate.db"
    link.symlink_to(tmp_path / "data" / "busgate.db")
    daemon = await SQLiteStore.open(str(link))
    try:
        pushed = await daemon.push("orders", ROUTES, [NewJob(b"in the WAL")])
        assert (tmp_path / "data" / "busgate.db-wal").exists()
        look = await SQLiteStore.open(str(link), read_only=True)
        try:
            (record,) = await look.get_job(pushed.ids[0])
            assert record.payload == b"in the WAL"
        finally:
            await look.aclose()
    finally:
        await daemon.aclose()
