"""What `busgate` says, and the status it exits with, when the configuration names a file it
cannot use or the environment sets a log level it does not know.

Status 2 is a configuration error: the unit's RestartPreventExitStatus=2 leaves it failed
rather than restart it forever (status 1 is retried: a store that cannot be reached yet).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import write_config
from tests.support.users import as_unprivileged, unprivileged_uid

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "queue: q\ntopics:\n  t: {backend: 'http://127.0.0.1:9/', paused: true}\n"


def busgate(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **environ},
    )


def refused(done: subprocess.CompletedProcess[str], line: str) -> None:
    """Exit status 2, and ``line`` last on stderr (`run` may warn of its open files limit)."""
    assert (done.returncode, done.stdout) == (2, ""), done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == line, done.stderr[-3000:]


def with_token(tmp_path: Path, token: bytes | None) -> tuple[Path, Path]:
    token_file = tmp_path / "admin.token"
    if token is not None:
        token_file.write_bytes(token)
    main_extra = f"admin_token_file: {token_file}\n"
    return write_config(tmp_path / "etc", {"q": QUEUE}, main_extra=main_extra), token_file


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        (b"short\n", "{path}: the admin token must be at least 16 characters"),
        ("é" * 20, "{path}: the admin token must be printable ASCII"),
        (None, "[Errno 2] No such file or directory: '{path}'"),
        (
            b"\xff" * 20,
            "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte: '{path}'",
        ),
    ],
    ids=["short", "not ASCII", "missing", "not UTF-8"],
)
def test_an_admin_token_the_daemon_refuses_is_a_configuration_error(
    tmp_path: Path, token: bytes | str | None, problem: str
) -> None:
    if isinstance(token, str):
        token = token.encode()
    config, token_file = with_token(tmp_path, token)
    line = "admin_token_file: " + problem.format(path=token_file)
    for command, prefix in (("check-config", "check-config"), ("run", "cannot start")):
        done = busgate(command, "-c", str(config))
        assert (done.returncode, done.stdout) == (2, ""), done.stderr[-3000:]
        assert done.stderr.splitlines()[-1].startswith(f"busgate: {prefix}: {line}"), done.stderr


def test_a_missing_ca_file_is_a_configuration_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    queue = f"queue: q\ntopics:\n  t: {{backend: 'https://127.0.0.1:9/', ca_file: {missing}}}\n"
    config = write_config(tmp_path / "etc", {"q": queue})
    drop_in = tmp_path / "etc" / "conf.d" / "q.yaml"
    line = f"{drop_in}: topics.t.ca_file: [Errno 2] No such file or directory: '{missing}'"
    refused(busgate("check-config", "-c", str(config)), f"busgate: check-config: {line}")
    refused(busgate("run", "-c", str(config)), f"busgate: cannot start: {line}")


def test_a_ca_file_that_holds_no_certificate_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    queue = f"queue: q\ntopics:\n  t: {{backend: 'https://127.0.0.1:9/', ca_file: {junk}}}\n"
    done = busgate("check-config", "-c", str(write_config(tmp_path / "etc", {"q": queue})))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert "topics.t.ca_file: " in done.stderr and done.stderr.endswith(f": '{junk}'\n")


@pytest.mark.parametrize("level", ["notice", "loud", " "])
def test_an_unknown_log_level_in_the_environment_is_a_usage_error(
    tmp_path: Path, level: str
) -> None:
    # argparse checks the choices of a flag given, not of a default read from $BUSGATE_LOG_LEVEL.
    config = write_config(tmp_path, {"q": QUEUE})
    done = busgate("check-config", "-c", str(config), BUSGATE_LOG_LEVEL=level)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.endswith(
        f"busgate: error: BUSGATE_LOG_LEVEL: invalid choice: {level!r}"
        " (choose from debug, info, warning, error, critical)\n"
    )


@pytest.mark.parametrize("level", ["INFO", "Warning", "critical"])
def test_a_log_level_in_the_environment_is_read_in_any_case(tmp_path: Path, level: str) -> None:
    # Before the check, any case worked (`getattr(logging, level.upper())`): an env file
    # saying INFO must not stop the daemon after an upgrade.
    config = write_config(tmp_path, {"q": QUEUE})
    done = busgate("check-config", "-c", str(config), BUSGATE_LOG_LEVEL=level)
    assert done.returncode == 0, done.stderr


def test_an_empty_log_level_in_the_environment_is_the_default(tmp_path: Path) -> None:
    # ``BUSGATE_LOG_LEVEL=`` in /etc/busgate/env (the unit's EnvironmentFile) unsets it.
    config = write_config(tmp_path, {"q": QUEUE})
    done = busgate("check-config", "-c", str(config), BUSGATE_LOG_LEVEL="")
    assert done.returncode == 0, done.stderr
    assert "queue: q" in done.stdout


def test_the_log_level_flag_wins_over_the_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"q": QUEUE})
    done = busgate("--log-level", "debug", "check-config", "-c", str(config), BUSGATE_LOG_LEVEL="x")
    assert done.returncode == 0, done.stderr


def test_a_store_url_naming_a_directory_is_a_configuration_error(tmp_path: Path) -> None:
    # "unable to open database file", exit 1: systemd started it again every 5 s for ever.
    state = tmp_path / "state"
    state.mkdir()
    config = write_config(tmp_path / "etc", {"q": QUEUE}, store=f"sqlite://{state}")
    done = busgate("run", "-c", str(config))
    refused(
        done,
        f"busgate: cannot start: {state}: unable to open database file (it is a directory:"
        " the store URL names the database file in it)",
    )


@pytest.mark.parametrize("where", ["busgate.db", "state/busgate.db"], ids=["file", "directory"])
def test_a_store_the_daemon_may_not_create_is_a_configuration_error(
    shared_dir: Path, where: str
) -> None:
    # It exited 1, so Restart=on-failure started it again every 5s for ever; a systemd unit
    # whose ProtectSystem=strict lacks the store's ReadWritePaths= fails this way (read-only).
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o555)  # root's (or, not running as root, this user's): not writable
    path = locked / where
    config = write_config(shared_dir / "etc", {"q": QUEUE}, store=f"sqlite://{path}")
    done = subprocess.run(
        [*as_unprivileged(), sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    uid = unprivileged_uid()
    why = (
        f"unable to open database file (user id {uid} may not create files in {locked})"
        if where == "busgate.db"
        else f"[Errno 13] Permission denied: '{path.parent}'"
    )
    refused(done, f"busgate: cannot start: {path}: {why}")
