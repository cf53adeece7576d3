"""Store errors.  A producer seeing any of these was told nothing was acknowledged."""

from __future__ import annotations


class StoreError(Exception):
    """Base of store failures."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or written now (Redis down, SQLite file unwritable)."""


class StoreRefused(StoreUnavailable):
    """The store turned our login down (wrong password, no such database): trying again
    will not help until the configuration changes."""


class StoreCorrupt(StoreError):
    """The store's data cannot be read (a corrupt SQLite file, unexpected Redis types)."""


class StoreUnsupported(StoreError):
    """The store's server cannot run busgate (a Redis older than the scripts need)."""
