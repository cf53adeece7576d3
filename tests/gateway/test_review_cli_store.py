"""The CLI commands that read the configuration or the store themselves, as an operator runs
them: ``busgate curl`` only reads the SQLite store (a user who may not write it can run it,
and it neither locks nor checks the whole file), and ``busgate push`` needs only the target
queue's drop-in to be complete."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import trio

from adapters.storage.errors import StoreCorrupt
from adapters.storage.jobs import NewJob
from adapters.storage.sqlite import SQLiteStore
from tests.support.daemon import running_daemon, write_config
from tests.support.ports import free_port
from tests.support.users import as_unprivileged, unprivileged_uid

ROOT = Path(__file__).resolve().parents[2]

#: Nothing listens there: the job stays in the store, retried, while the daemon runs.
ORDERS = """\
queue: orders
topics:
  email:
    backend: http://127.0.0.1:9/hooks/order
    retry: {max_attempts: 1000, backoff: 50ms, max_backoff: 100ms}
"""


def may_only_read(directory: Path) -> None:
    """The store's directory and files readable, not writable: what the unit's 0750
    directory and UMask=0027 give the daemon's group (root, which may write anything, runs
    the command as another user: see busgate_curl)."""
    for name in directory.glob("busgate.db*"):
        name.chmod(0o444)
    directory.chmod(0o555)


async def busgate_curl(
    config: Path, job_id: str, *, unprivileged: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """``busgate curl`` in a subprocess; ``unprivileged``: as another user than root."""
    return await trio.run_process(
        [
            *(as_unprivileged() if unprivileged else []),
            sys.executable,
            *("-m", "gateway.cli", "curl", job_id, "-c", str(config)),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


def printed_ok(done: subprocess.CompletedProcess[bytes], job_id: str) -> None:
    assert done.returncode == 0, done.stderr.decode()
    assert b"-X POST http://127.0.0.1:9/hooks/order" in done.stdout
    assert f"-H 'X-Busgate-Job-Id: {job_id}'".encode() in done.stdout


async def xadd(resp_address: str, job_id: str) -> None:
    port = int(resp_address.rpartition(":")[2])

    def produce() -> None:
        client = redis.Redis(port=port)
        client.xadd("orders", {"payload": b'{"order": 42}'}, id=job_id)
        client.close()

    await trio.to_thread.run_sync(produce)


# -- busgate curl -------------------------------------------------------------------------------


async def test_curl_reads_the_store_as_a_user_who_may_only_read_it(shared_dir: Path) -> None:
    directory = shared_dir / "busgate"
    reader = unprivileged_uid()
    config = write_config(directory, {"orders": ORDERS})
    async with running_daemon(config) as app:
        await xadd(app.resp_address, "1-1")  # acknowledged once stored: in the -wal for now
        may_only_read(directory)
        # The daemon is writing (a retry every 50 ms): SQLite reads the -wal and -shm
        # it keeps, with read permission only.  This was "attempt to write a readonly
        # database": the store was opened the daemon's way, to write.
        printed_ok(await busgate_curl(config, "1-1", unprivileged=True), "1-1")
        # A file it may not read is named (not the database, which it need not write).
        (directory / "busgate.db-shm").chmod(0)
        done = await busgate_curl(config, "1-1", unprivileged=True)
        assert done.returncode == 2  # a permission: trying again will not help
        assert done.stderr.decode() == (
            f"busgate: curl: {directory / 'busgate.db'}: unable to open database file"
            f" (user id {reader} may not read {directory / 'busgate.db-shm'})\n"
        )
    # Stopped: SQLite checkpointed the -wal into the file and deleted it and the -shm, which
    # this user may not create again.  The file is read as it is, and nothing is left behind.
    assert sorted(p.name for p in directory.glob("busgate.db*")) == ["busgate.db"]
    printed_ok(await busgate_curl(config, "1-1", unprivileged=True), "1-1")
    assert sorted(p.name for p in directory.glob("busgate.db*")) == ["busgate.db"]


async def test_curl_waits_for_no_write_lock(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"orders": ORDERS})
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path))
    try:
        await store.push("orders", [], [NewJob(b"{}", id="order-1", topic="email")])
        # A writer in the middle of a long transaction (a daemon's upgrade, a big group).
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO probe (data) VALUES (x'00')")
        try:
            # This was "database is locked", once the 5 s busy timeout had run out.
            done = await busgate_curl(config, "order-1")
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    finally:
        await store.aclose()
    printed_ok(done, "order-1")


async def test_curl_does_not_check_the_whole_file(tmp_path: Path) -> None:
    # The daemon checks the file when it opens it (about 20 s per 1.5 GB): curl, reading
    # one job, reads that job's pages only, and a damaged page elsewhere does not stop it.
    config = write_config(tmp_path, {"orders": ORDERS})
    path = tmp_path / "busgate.db"
    store = await SQLiteStore.open(str(path))
    try:
        jobs = [
            NewJob(letter * 20000, id=f"order-{letter.decode()}", topic="email")
            for letter in (b"a", b"b")
        ]
        await store.push("orders", [], jobs)
    finally:
        await store.aclose()  # everything in the file, the -wal gone
    cut_overflow_chain(path, b"b" * 64)
    with pytest.raises(StoreCorrupt, match="integrity check failed"):
        await SQLiteStore.open(str(path))

    done = await busgate_curl(config, "order-a")
    printed_ok(done, "order-a")


async def test_curl_leaves_a_store_it_would_have_to_write_to_the_daemon(tmp_path: Path) -> None:
    # A file busgate has not made a store yet (or one of an older layout): the daemon creates
    # or upgrades its tables; curl used to do so itself, writing to it.
    config = write_config(tmp_path, {"orders": ORDERS})
    path = tmp_path / "busgate.db"
    sqlite3.connect(path).execute("PRAGMA journal_mode = WAL").fetchone()
    done = await busgate_curl(config, "order-1")
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr.decode() == (
        f"busgate: curl: {path}: store schema version 0, not yet this busgate's 3: the daemon"
        " creates or upgrades the tables when it starts on the file; start it, then look"
        " again\n"
    )
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == []


def cut_overflow_chain(path: Path, content: bytes) -> None:
    """End the overflow chain of the payload made of ``content`` after its first page."""
    data = bytearray(path.read_bytes())
    (page_size,) = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()
    first = next(
        start
        for start in range(0, len(data), page_size)
        if data[start + 4 : start + 4 + len(content)] == content
    )
    data[first : first + 4] = bytes(4)  # the next page's number: none
    path.write_bytes(bytes(data))


# -- busgate push -------------------------------------------------------------------------------

AUDIT = """\
queue: audit
topics:
  log: {backend: "http://127.0.0.1:9/audit"}
"""
#: Secrets the daemon's environment has (an EnvironmentFile) and the operator's shell not.
ORDERS_WITH_SECRET = """\
queue: orders
password: ${ORDERS_PASSWORD}
topics:
  email: {backend: "http://127.0.0.1:9/hooks/order"}
"""
BILLING_WITH_SECRETS = """\
queue: billing
password: ${BILLING_PASSWORD}
topics:
  invoice: {backend: "http://127.0.0.1:9/invoice", timeout: "${BILLING_TIMEOUT}"}
"""


async def busgate_push(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``busgate push`` from a shell that has none of the queues' secrets."""
    secrets = ("ORDERS_PASSWORD", "BILLING_PASSWORD", "BILLING_TIMEOUT", "BUSGATE_QUEUE_PASSWORD")
    environ = {k: v for k, v in os.environ.items() if k not in secrets}
    return await trio.run_process(
        [sys.executable, "-m", "gateway.cli", "push", *args, "-c", str(config)],
        cwd=ROOT,
        env={**environ, "PYTHONPATH": str(ROOT)},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_push_needs_only_the_target_queues_drop_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDERS_PASSWORD", "s3cret")
    monkeypatch.setenv("BILLING_PASSWORD", "b1lling")
    monkeypatch.setenv("BILLING_TIMEOUT", "5s")
    config = write_config(
        tmp_path,
        {"audit": AUDIT, "billing": BILLING_WITH_SECRETS, "orders": ORDERS_WITH_SECRET},
    )
    # A fixed port, so the CLI finds the daemon through listen.http.
    text = config.read_text()
    config.write_text(text.replace("http: 127.0.0.1:0", f"http: 127.0.0.1:{free_port()}"))
    async with running_daemon(config) as app:
        # Before and after audit.yaml come drop-ins whose secrets this shell lacks, one in
        # a field that must be a duration: this was "conf.d/billing.yaml:2: password: …
        # BILLING_PASSWORD is not set".
        done = await busgate_push(config, "audit", "x")
        assert done.returncode == 0, done.stderr.decode()
        job_id = done.stdout.decode().strip()
        assert app.store is not None
        (record,) = await app.store.get_job(job_id)
        assert (record.queue, record.payload) == ("audit", b"x")

        # The target queue's own secret is still needed, and said so.
        done = await busgate_push(config, "orders", "x")
        assert done.returncode == 2
        assert done.stderr.decode() == (
            f"busgate: configuration error: {tmp_path / 'conf.d' / 'orders.yaml'}:2:"
            " password: environment variable ORDERS_PASSWORD is not set (write"
            " ${ORDERS_PASSWORD:-default} to give a default) (or give the queue's password"
            " with --password or $BUSGATE_QUEUE_PASSWORD)\n"
        )
        done = await busgate_push(config, "orders", "x", "--password", "s3cret")
        assert done.returncode == 0, done.stderr.decode()


async def test_push_reports_a_drop_in_it_cannot_read_when_no_other_is_the_queues(
    tmp_path: Path,
) -> None:
    # Which queue a broken file is for cannot be known: it may be the one pushed to.
    config = write_config(tmp_path, {"audit": AUDIT, "broken": "queue: [unclosed\n"})
    done = await busgate_push(config, "orders", "x", "--url", "127.0.0.1:9")
    assert done.returncode == 2
    assert f"configuration error: {tmp_path / 'conf.d' / 'broken.yaml'}:" in done.stderr.decode()
