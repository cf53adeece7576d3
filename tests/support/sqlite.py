"""Faults of an SQLite store, made by SQLite itself."""

from __future__ import annotations

import sqlite3

from adapters.storage.sqlite import SQLiteStore


async def cap_pages(store: SQLiteStore, extra: int) -> None:
    """Let the file grow by ``extra`` pages at most: SQLite then fails writes as on a full
    disk (SQLITE_FULL, "database or disk is full")."""

    def cap(conn: sqlite3.Connection) -> None:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages + extra}")

    await store._writer.run(cap)
