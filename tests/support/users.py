"""Tests of permissions run their subject as a user who may not do everything: root may.

Run as root, that is nobody (``setpriv``); run as another user, that user itself, whom the
test's file modes shut out."""

from __future__ import annotations

import os

#: nobody's user and group id.
NOBODY = 65534


def unprivileged_uid() -> int:
    """The user id the subject runs as (``as_unprivileged``)."""
    return NOBODY if os.geteuid() == 0 else os.geteuid()


def as_unprivileged() -> list[str]:
    """The command prefix that runs what follows as ``unprivileged_uid()``."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
