"""`busgate run` with a store it cannot use: one line saying why, exit status 1, no traceback."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from adapters.storage.sqlite import SQLiteStore
from tests.support.daemon import read_received, running_daemon, write_config
from tests.support.phpfpm import PhpFpm
from tests.support.ports import free_port
from tests.support.redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, store: str) -> subprocess.CompletedProcess[str]:
    return busgate_run(write_config(tmp_path / "etc", {}, store=store))


def busgate_run(config: Path) -> subprocess.CompletedProcess[str]:
    return busgate("run", config)


def busgate(command: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", command, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def refused(
    done: subprocess.CompletedProcess[str],
    *words: str,
    prefix: str = "busgate: cannot start: ",
    status: int = 1,
) -> None:
    """``status`` 2: what restarting cannot mend (the unit's RestartPreventExitStatus)."""
    assert done.returncode == status, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith(prefix)]
    for word in words:
        assert word in line, line


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password="right")
    server.start()
    try:
        yield server
    finally:
        server.stop(hard=True)


def test_nothing_listening(tmp_path: Path) -> None:
    refused(run(tmp_path, f"redis://127.0.0.1:{free_port()}/0"), "Connection refused")


def test_wrong_password(tmp_path: Path, redis: RedisServer) -> None:
    refused(run(tmp_path, f"redis://:wrong@127.0.0.1:{redis.port}/0"), "WRONGPASS", status=2)


def test_acl_user_without_the_wake_up_channel(tmp_path: Path, redis: RedisServer) -> None:
    # Redis 7 gives a new ACL user no pub/sub channels unless granted (&*).
    redis.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "+@all", "resetchannels")
    # Found by the start-up check (PUBLISH on the channel), before the subscription's own
    # PSUBSCRIBE: a configuration matter, status 2.
    done = run(tmp_path, f"redis://app:s3cret@127.0.0.1:{redis.port}/0")
    refused(done, "PUBLISH: ", "channels bg:{*}:wake", status=2)


def test_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(8192))
    refused(run(tmp_path, f"sqlite:{junk}"), "not a database", status=2)


async def test_the_startup_line_does_not_show_the_store_password(
    tmp_path: Path, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path / "etc", {})
    config.write_text(
        config.read_text().replace(
            f"sqlite:{tmp_path / 'etc'}/busgate.db", f"redis://:right@127.0.0.1:{redis.port}/0"
        )
    )
    caplog.set_level(logging.INFO)
    async with running_daemon(config):
        pass
    (line,) = [r.getMessage() for r in caplog.records if "busgate running" in r.getMessage()]
    assert "right@" not in line and "********@127.0.0.1" in line


@pytest.mark.parametrize("listener", ["resp", "http"])
def test_a_port_in_use_is_named_with_its_setting(tmp_path: Path, listener: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "etc", {})
        text = config.read_text()
        assert f"{listener}: 127.0.0.1:0" in text
        config.write_text(text.replace(f"{listener}: 127.0.0.1:0", f"{listener}: 127.0.0.1:{port}"))
        done = busgate_run(config)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    # Which of busgate's ports, not only "[Errno 98] Address already in use".
    assert f"listen.{listener} 127.0.0.1:{port}: Address already in use" in done.stderr


async def test_a_port_in_use_fails_the_start_before_any_job_is_delivered(
    tmp_path: Path, recording_fpm: PhpFpm, record: Path
) -> None:
    # The dispatchers started before the ports were bound: jobs went to the backend, were cut
    # short when the bind failed, and every restart under systemd ran them again.
    config = write_config(
        tmp_path / "etc",
        {
            "q": f"""\
            queue: q
            topics:
              t:
                backend: fastcgi://127.0.0.1:{recording_fpm.address.port}
                script: {recording_fpm.script("record.php")}
            """
        },
    )
    store = await SQLiteStore.open(str(tmp_path / "etc" / "busgate.db"))
    await store.push("q", [("t", Filter())], [NewJob(b'{"sleep_ms": 300}')] * 3)
    await store.aclose()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(
            config.read_text().replace("http: 127.0.0.1:0", f"http: 127.0.0.1:{port}")
        )
        done = await trio.to_thread.run_sync(busgate_run, config)
    assert done.returncode == 1 and "Address already in use" in done.stderr, done.stderr[-3000:]
    # Nothing was even reserved (a reserve is released at the stop, logged so).
    assert "released queue=q" not in done.stderr and read_received(record) == []
    store = await SQLiteStore.open(str(tmp_path / "etc" / "busgate.db"))
    stats = await store.stats("q", "t")
    await store.aclose()
    assert (stats.ready, stats.leased) == (3, 0)


# -- check-config says what `run` would refuse ----------------------------------------------


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return busgate("check-config", config)


def with_token_file(tmp_path: Path, token: str | None) -> Path:
    token_file = tmp_path / "admin.token"
    if token is not None:
        token_file.write_text(token)
    return write_config(
        tmp_path / "etc", {"q": ONE_QUEUE}, main_extra=f"admin_token_file: {token_file}\n"
    )


ONE_QUEUE = "queue: q\ntopics:\n  t: {backend: 'http://127.0.0.1:9/', paused: true}\n"


def test_check_config_prints_the_effective_config_when_the_token_is_readable(
    tmp_path: Path,
) -> None:
    done = check_config(with_token_file(tmp_path, "t" * 24 + "\n"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert f"admin_token_file: {tmp_path / 'admin.token'}" in done.stdout


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (None, ("No such file or directory", "admin.token")),
        ("short\n", ("at least 16 characters", "admin.token")),
    ],
)
def test_check_config_refuses_a_token_file_the_daemon_would_refuse(
    tmp_path: Path, token: str | None, words: tuple[str, ...]
) -> None:
    config = with_token_file(tmp_path, token)
    check = check_config(config)
    refused(check, "admin_token_file", *words, prefix="busgate: check-config: ", status=2)
    refused(busgate_run(config), "admin_token_file", *words, status=2)  # the same from `run`


def test_check_config_only_warns_when_this_user_may_not_read_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As root (CI) file modes do not stop a read: the refusal is simulated at the one call.
    from gateway import cli

    def denied(path: str | None) -> str:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(cli, "read_token", denied)
    assert cli.main(["check-config", "-c", str(with_token_file(tmp_path, "t" * 24))]) == 0
    out, err = capsys.readouterr()
    assert "admin_token_file:" in out
    assert err.startswith("busgate: warning: admin_token_file: [Errno 13] Permission denied")
    assert "the daemon's user must be able to read it" in err


def test_a_config_without_queues_is_valid_but_warned_about(tmp_path: Path) -> None:
    """An empty conf.d may be on purpose (queues come with a reload), a mistyped include not."""
    config = write_config(tmp_path / "etc", {})  # conf.d/ is empty
    done = check_config(config)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"busgate: warning: include 'conf.d/*.yaml' (from {tmp_path / 'etc'}) matches no queue"
        " file: there is no queue, so every push is refused until a reload adds one\n"
    )
    assert "queues: []" in done.stdout


def test_a_password_written_like_a_shell_variable_is_warned_about(tmp_path: Path) -> None:
    # `password: $ORDERS_PASSWORD` was taken as those 16 characters without a word: only
    # ${ORDERS_PASSWORD} is substituted.  The warning does not repeat it (it may be meant).
    queue = "password: $ORDERS_PASSWORD\n" + ONE_QUEUE
    config = write_config(
        tmp_path / "etc", {"q": queue, "r": ONE_QUEUE.replace("queue: q", "queue: r")}
    )
    done = check_config(config)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"busgate: warning: {tmp_path / 'etc' / 'conf.d' / 'q.yaml'}: password: reads like a"
        " variable ($NAME), but only ${NAME} is taken from the environment: this one is the"
        " password as written\n"
    )
    assert "ORDERS_PASSWORD" not in done.stderr


async def test_the_daemon_logs_the_same_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_daemon(write_config(tmp_path / "etc", {})):
        pass
    (warning,) = [r for r in caplog.records if "matches no queue file" in r.getMessage()]
    assert warning.levelname == "WARNING"
