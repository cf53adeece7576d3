"""Store errors.  A producer seeing any of these was told its push was not acknowledged:
nothing was stored, but for ``StoreUncertain``, where it may have been."""

from __future__ import annotations


class StoreError(Exception):
    """Base of store failures."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or written now (Redis down, SQLite file unwritable)."""


class StoreUncertain(StoreUnavailable):
    """The request went out and no answer came back in time: it may still be carried out
    (Redis runs a script it has read; SQLite's writer commits what it has queued)."""


class StoreLoading(StoreUnavailable):
    """The store is loading its data (a Redis that restarted reads its dataset into memory)
    and runs no command until it is done: nothing was stored.  Calls wait for it within
    their timeout; this is what one that ran out of time, or a health check (which does not
    wait), is told."""


class StoreRefused(StoreUnavailable):
    """The store turned our login down (wrong password, no such database), or busgate's
    user may not write its SQLite file: trying again will not help until an operator acts."""


class StoreCorrupt(StoreError):
    """The store's data cannot be read (a corrupt SQLite file, unexpected Redis types)."""


class StoreUnsupported(StoreError):
    """The store's server cannot run busgate (a Redis older than the scripts need)."""


def store_error_text(exc: StoreError) -> str:
    """What a producer is told of a push the store failed: whether it may be stored."""
    if isinstance(exc, StoreUncertain):
        return f"not acknowledged; it may have been stored: {exc}"
    return f"store unavailable, nothing was acknowledged: {exc}"
