"""sd_notify and the watchdog against a real unix datagram socket standing in for systemd,
and the shipped unit file read the way an operator's tools would."""

from __future__ import annotations

import configparser
import contextlib
import itertools
import logging
import os
import shlex
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.systemd import (
    Notifier,
    encode_message,
    monotonic_usec,
    run_watchdog,
    watchdog_interval,
)
from gateway.units import parse_duration
from tests.gateway.test_startup_errors import busgate_run, run

REPO = Path(__file__).resolve().parents[2]


class Manager:
    """The service manager's end of NOTIFY_SOCKET: a bound datagram socket."""

    def __init__(self, address: str | bytes, notify_socket: str) -> None:
        self._stdlib = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._stdlib.bind(address)
        self.sock = trio.socket.from_stdlib_socket(self._stdlib)  # and non-blocking now
        self.notify_socket = notify_socket

    def close(self) -> None:
        self.sock.close()

    def notifier(self) -> Notifier:
        return Notifier.from_environ({"NOTIFY_SOCKET": self.notify_socket})

    async def receive(self, timeout: float = 2.0) -> dict[str, str]:
        with trio.fail_after(timeout):
            data = await self.sock.recv(4096)
        assert data.endswith(b"\n")
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        # Each field exactly once: a repeated key would mean a malformed datagram.
        assert len(fields) == len(data.decode().splitlines())
        return fields

    def drain(self) -> list[bytes]:
        received = []
        while True:
            try:
                received.append(self._stdlib.recv(4096))
            except BlockingIOError:
                return received


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    path = str(tmp_path / "notify.sock")
    manager = Manager(path, path)
    yield manager
    manager.close()


@pytest.fixture
async def abstract_manager() -> AsyncIterator[Manager]:
    name = f"busgate-test-{uuid.uuid4().hex}"
    manager = Manager(b"\0" + name.encode(), "@" + name)
    yield manager
    manager.close()


async def test_ready_sends_ready_and_status_in_one_datagram(manager: Manager) -> None:
    notifier = manager.notifier()
    assert notifier.enabled
    assert await notifier.ready("running: 2 queues, 3 topics")
    assert await manager.receive() == {"READY": "1", "STATUS": "running: 2 queues, 3 topics"}
    stats = notifier.statistics()
    assert (stats.enabled, stats.sent_total, stats.errors_total) == (True, 1, 0)


async def test_abstract_socket_name(abstract_manager: Manager) -> None:
    notifier = abstract_manager.notifier()
    assert await notifier.ready()
    assert await abstract_manager.receive() == {"READY": "1"}


async def test_reloading_carries_the_monotonic_clock(manager: Manager) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert await manager.notifier().reloading("reloading configuration")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = await manager.receive()
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC", "STATUS"}
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    assert fields["STATUS"] == "reloading configuration"


async def test_stopping_status_watchdog_and_mainpid(manager: Manager) -> None:
    notifier = manager.notifier()
    assert await notifier.stopping("draining 3 deliveries")
    assert await manager.receive() == {"STOPPING": "1", "STATUS": "draining 3 deliveries"}
    assert await notifier.status("line one\nline two")
    assert await manager.receive() == {"STATUS": "line one line two"}
    assert await notifier.watchdog()
    assert await manager.receive() == {"WATCHDOG": "1"}
    assert await notifier.main_pid(4242)
    assert await manager.receive() == {"MAINPID": "4242"}
    assert await notifier.send(STATUS="custom", ERRNO=5)
    assert await manager.receive() == {"STATUS": "custom", "ERRNO": "5"}
    assert notifier.statistics().sent_total == 5


def test_encode_message_is_exact_and_refuses_injection() -> None:
    assert encode_message({"READY": 1, "STATUS": "up"}) == b"READY=1\nSTATUS=up\n"
    with pytest.raises(ValueError, match="newline"):
        encode_message({"STATUS": "a\nREADY=1"})
    with pytest.raises(ValueError, match="field name"):
        encode_message({"ready": 1})
    with pytest.raises(ValueError, match="at least one"):
        encode_message({})


def test_monotonic_usec_is_clock_monotonic() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= monotonic_usec() <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative"}])
async def test_no_notify_socket_is_a_no_op(environ: dict[str, str]) -> None:
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    assert not await notifier.ready("running")
    assert not await notifier.reloading()
    assert not await notifier.stopping()
    assert not await notifier.status("x")
    assert not await notifier.watchdog()
    stats = notifier.statistics()
    assert (stats.enabled, stats.sent_total, stats.errors_total) == (False, 0, 0)
    # The watchdog task has nothing to do and says so by returning at once.
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_watchdog, notifier, 0.01)


async def test_vanished_socket_is_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "notify.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(path))
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    assert await notifier.ready()
    sock.close()  # bound but nobody reading: ECONNREFUSED
    with caplog.at_level(logging.DEBUG, logger="busgate.systemd"):
        assert not await notifier.watchdog()
        path.unlink()  # gone altogether: ENOENT
        assert not await notifier.watchdog()
        assert not await notifier.stopping()
    stats = notifier.statistics()
    assert (stats.sent_total, stats.errors_total) == (1, 3)
    assert stats.last_error is not None and "FileNotFoundError" in stats.last_error
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()


async def test_recovery_is_logged_and_a_new_outage_warns_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "notify.sock"
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.INFO, logger="busgate.systemd"):
        assert not await notifier.watchdog()
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            await sock.bind(str(path))
            assert await notifier.watchdog()
        path.unlink()
        assert not await notifier.watchdog()
    messages = [(r.levelno, r.getMessage().split(" ")[0]) for r in caplog.records]
    assert messages == [
        (logging.WARNING, "cannot"),
        (logging.INFO, "systemd"),
        (logging.WARNING, "cannot"),
    ]


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}) == 0.1
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "77"}, pid=77) == 0.1


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "not-a-pid"},
        # Inherited from the process systemd actually watches: not ours to ping for.
        {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)},
        {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"},
    ],
)
def test_no_watchdog(environ: dict[str, str]) -> None:
    assert watchdog_interval(environ) is None


async def test_watchdog_pings_at_half_of_watchdog_usec_in_real_time(manager: Manager) -> None:
    interval = watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert interval == 0.1
    notifier = manager.notifier()
    pings: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_watchdog, notifier, interval)
        started = time.monotonic()
        with trio.move_on_after(0.35):
            while True:
                assert await manager.receive() == {"WATCHDOG": "1"}
                pings.append(time.monotonic() - started)
        nursery.cancel_scope.cancel()
    # Expected at 0 (before started()), 0.1, 0.2, 0.3: the first is already queued.
    assert 3 <= len(pings) <= 5, pings
    gaps = [b - a for a, b in itertools.pairwise(pings[1:])]
    assert all(0.03 < gap < 0.25 for gap in gaps), gaps


async def test_watchdog_schedule_is_exact_and_does_not_drift(
    manager: Manager, autojump_clock: trio.testing.MockClock
) -> None:
    notifier = manager.notifier()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_watchdog, notifier, 0.1)
        await trio.sleep(1.05)
        nursery.cancel_scope.cancel()
    # Pings at 0, 0.1, ..., 1.0 of virtual time; the datagrams wait in the socket buffer.
    assert manager.drain() == [b"WATCHDOG=1\n"] * 11
    assert notifier.statistics().sent_total == 11


async def test_watchdog_interval_must_be_positive(manager: Manager) -> None:
    with pytest.raises(ValueError, match="positive"):
        await run_watchdog(manager.notifier(), 0)


def read_unit() -> configparser.ConfigParser:
    # systemd allows repeated keys (SystemCallFilter=, ExecStart=) and uses %-specifiers and
    # $VARS, so: not strict, no interpolation, keys case-sensitive, "=" only.
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(REPO / "systemd" / "busgate.service")
    return unit


def test_unit_file() -> None:
    unit = read_unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == "/opt/busgate/.venv/bin/busgate run -c /etc/busgate/busgate.yaml"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert parse_duration(service["WatchdogSec"]) == 30
    assert service["Restart"] == "on-failure"
    # Must outlast the drain (shutdown_timeout, 30s by default) or systemd SIGKILLs it.
    assert parse_duration(service["TimeoutStopSec"]) > 30
    # Opening a large SQLite store checks the whole file: more than the default 90s.
    assert parse_duration(service["TimeoutStartSec"]) >= 300
    assert service["StateDirectory"] == "busgate"
    assert service["ConfigurationDirectory"] == "busgate"
    assert (service["User"], service["Group"]) == ("busgate", "busgate")
    assert service["EnvironmentFile"] == "-/etc/busgate/env"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # Above its backends' workers, which would otherwise preempt it (see the unit's comment).
    assert int(service["Nice"]) == -10


def test_a_configuration_error_is_not_restarted_but_an_unreachable_store_is(
    tmp_path: Path,
) -> None:
    """Restart=on-failure would start a daemon whose file is broken every 5 s for ever: the
    unit names busgate's exit status for a configuration error as not to be restarted."""
    prevented = read_unit()["Service"]["RestartPreventExitStatus"]
    broken = tmp_path / "busgate.yaml"
    broken.write_text("store: sqlite:busgate.db\nlisten: {resp: 127.0.0.1:0, http: 127.0.0.1:0\n")
    foreign = tmp_path / "foreign.db"  # another program's database: not busgate's store
    with contextlib.closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    statuses = [
        busgate_run(broken).returncode,
        run(tmp_path / "foreign", f"sqlite:{foreign}").returncode,
        run(tmp_path / "down", "redis://127.0.0.1:1/0?timeout=1s").returncode,
    ]
    assert statuses[:2] == [int(prevented)] * 2 and int(prevented) == 2, statuses
    assert statuses[2] not in (0, int(prevented)), statuses


def test_the_benchmarks_run_the_daemon_at_the_units_nice() -> None:
    from bench.daemon import unit_nice

    assert unit_nice() == int(read_unit()["Service"]["Nice"])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
    ],
)
def test_unit_file_hardening(key: str, value: str) -> None:
    assert read_unit()["Service"][key] == value


def test_unit_file_syscall_filter_starts_from_system_service() -> None:
    text = (REPO / "systemd" / "busgate.service").read_text()
    filters = [line for line in text.splitlines() if line.startswith("SystemCallFilter=")]
    assert filters[0] == "SystemCallFilter=@system-service"


def test_sysusers_and_tmpfiles_snippets() -> None:
    def entries(name: str) -> list[list[str]]:
        lines = (REPO / "systemd" / name).read_text().splitlines()
        return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]

    assert entries("busgate.sysusers") == [
        ["u", "busgate", "-", "busgate job gateway", "/var/lib/busgate"]
    ]
    assert entries("busgate.tmpfiles") == [
        ["d", "/var/lib/busgate", "0750", "busgate", "busgate", "-", "-"]
    ]
