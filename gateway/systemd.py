"""systemd service notifications (sd_notify) and the watchdog, for trio, without libsystemd.

The protocol: one datagram of newline-separated ``KEY=value`` lines, sent to the unix socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket).  systemd identifies
the sender from the kernel-attached credentials, so nothing else needs to be in the message.
Outside systemd ``$NOTIFY_SOCKET`` is unset and every method here does nothing.

Typical use by the daemon::

    notifier = Notifier.from_environ()
    await notifier.ready("running: 2 queues, 3 topics")
    interval = watchdog_interval()
    if interval is not None:
        await nursery.start(run_watchdog, notifier, interval)
    ...
    await notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import trio

log = logging.getLogger("busgate.systemd")

# systemd reads the notify socket continuously; if a datagram still cannot be queued after
# this long the manager is gone or wedged, and the daemon must not wait on it.
SEND_TIMEOUT = 1.0

_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class NotifierStatistics:
    enabled: bool
    sent_total: int  # datagrams the manager's socket accepted
    errors_total: int  # datagrams that could not be sent (socket gone, refused, timed out)
    last_error: str | None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs: the clock systemd compares ``MONOTONIC_USEC=`` against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(text: str) -> str:
    # A newline in free text would start a new field in the datagram.
    return " ".join(text.split())


def encode_message(fields: Mapping[str, str | int]) -> bytes:
    """The datagram for ``fields``, in order; ValueError for what systemd would misread."""
    if not fields:
        raise ValueError("a notification needs at least one field")
    lines = []
    for name, value in fields.items():
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a notification field name")
        text = str(value)
        if "\n" in text:
            raise ValueError(f"the value of {name} contains a newline")
        lines.append(f"{name}={text}\n")
    return "".join(lines).encode()


def _socket_address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends state changes to the service manager; a no-op when not run by systemd."""

    def __init__(self, socket_name: str | None) -> None:
        # Only absolute paths and abstract names are valid, as in libsystemd; anything else
        # (a relative path, an empty string) is treated as "not under systemd".
        if socket_name and socket_name[0] in "/@":
            self._address: str | bytes | None = _socket_address(socket_name)
        else:
            self._address = None
        self._name = socket_name
        self._sent = 0
        self._errors = 0
        self._last_error: str | None = None
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def statistics(self) -> NotifierStatistics:
        return NotifierStatistics(
            enabled=self.enabled,
            sent_total=self._sent,
            errors_total=self._errors,
            last_error=self._last_error,
        )

    async def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``FIELD=value`` lines; True if the manager's socket took it.

        Failures are counted and logged once per outage, never raised: losing the manager
        must not take the daemon down with it.
        """
        message = encode_message(fields)
        if self._address is None:
            return False
        try:
            # A fresh socket per message, as libsystemd does: nothing to keep open or to
            # reconnect when the manager re-executes, and a watchdog ping every few seconds
            # costs nothing.
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                with trio.move_on_after(SEND_TIMEOUT) as deadline:
                    await sock.sendto(message, self._address)
            if deadline.cancelled_caught:
                raise TimeoutError(f"notify socket did not accept a message in {SEND_TIMEOUT}s")
        except OSError as exc:
            self._record_failure(exc)
            return False
        self._sent += 1
        if self._failing:
            log.info("systemd notify socket is reachable again")
            self._failing = False
        return True

    def _record_failure(self, exc: OSError) -> None:
        self._errors += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        if not self._failing:
            self._failing = True
            log.warning(
                "cannot notify systemd at %s (%s); continuing without notifications",
                self._name,
                self._last_error,
            )

    async def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete."""
        if status is None:
            return await self.send(READY=1)
        return await self.send(READY=1, STATUS=_one_line(status))

    async def reloading(self, status: str | None = None) -> bool:
        """A reload starts; ``ready()`` must follow when it is done.

        ``MONOTONIC_USEC`` goes in the same datagram: systemd ≥ 253 uses it to tell this
        reload from an earlier one, and older versions ignore it.
        """
        if status is None:
            return await self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec())
        return await self.send(
            RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=_one_line(status)
        )

    async def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (draining deliveries); the unit shows "deactivating"."""
        if status is None:
            return await self.send(STOPPING=1)
        return await self.send(STOPPING=1, STATUS=_one_line(status))

    async def status(self, text: str) -> bool:
        """Free text shown by ``systemctl status``."""
        return await self.send(STATUS=_one_line(text))

    async def watchdog(self) -> bool:
        """Keep-alive: the event loop is running."""
        return await self.send(WATCHDOG=1)

    async def main_pid(self, pid: int) -> bool:
        return await self.send(MAINPID=pid)


def watchdog_interval(
    environ: Mapping[str, str] = os.environ, *, pid: int | None = None
) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, as systemd advises.

    None when no watchdog is configured, when ``$WATCHDOG_PID`` names another process (the
    variables were inherited from a parent that is the one being watched), or when the
    values are not numbers.
    """
    raw_usec = environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            watched = int(raw_pid)
        except ValueError:
            log.warning("ignoring the systemd watchdog: WATCHDOG_PID=%r is not a pid", raw_pid)
            return None
        if watched != (os.getpid() if pid is None else pid):
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring the systemd watchdog: WATCHDOG_USEC=%r is not a number", raw_usec)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2


async def run_watchdog(
    notifier: Notifier,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping every ``interval`` seconds until cancelled, starting at once.

    The pings come from a task in the daemon's own event loop, so a loop blocked by a
    runaway synchronous call stops them and systemd restarts the daemon.  The schedule is
    absolute (next = previous + interval), so slow sends do not make the pings drift late.
    """
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, not {interval!r}")
    if not notifier.enabled:
        task_status.started()
        return
    await notifier.watchdog()
    task_status.started()
    due = trio.current_time()
    while True:
        # After a stall longer than the interval, ping once now rather than in a burst.
        due = max(due + interval, trio.current_time())
        await trio.sleep_until(due)
        await notifier.watchdog()
