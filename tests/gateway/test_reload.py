"""SIGHUP reload: topics added, removed and changed under a steady stream of pushes, with no
failed push and no lost delivery; a broken or unappliable config leaves the old one running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.app import App, ReloadRefused
from gateway.config import load_config
from gateway.resp import encode_command
from tests.support.daemon import (
    Received,
    read_received,
    running_daemon,
    wait_received,
    write_config,
)
from tests.support.phpfpm import PhpFpm
from tests.support.ports import free_port, wait_connectable


def queue(fpm: PhpFpm, topics: dict[str, str]) -> str:
    body = "".join(
        f"""\
  {name}:
    backend: fastcgi://127.0.0.1:{fpm.address.port}
    script: {fpm.script("record.php")}
    uri: {uri}
    concurrency: 4
    timeout: 5s
"""
        for name, uri in topics.items()
    )
    return "queue: q\ntopics:\n" + body


def set_topics(directory: Path, fpm: PhpFpm, topics: dict[str, str]) -> None:
    (directory / "conf.d" / "q.yaml").write_text(queue(fpm, topics))


async def producer(app: App, count: int, replies: list[bytes]) -> None:
    host, _, port = app.resp_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    for i in range(count):
        await stream.send_all(encode_command("LPUSH", "q", b'{"n": %d}' % i))
        replies.append(await stream.receive_some(100))
        await trio.sleep(0.002)
    await stream.aclose()


async def test_topics_come_and_go_without_a_failed_push(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"q": queue(recording_fpm, {"a": "/a"})})
    async with running_daemon(config) as app:
        replies: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer, app, 300, replies)
            await trio.sleep(0.1)
            set_topics(tmp_path, recording_fpm, {"a": "/a", "b": "/b"})
            report = await app.reload(load_config(config))
            assert (report.added, report.removed, report.changed) == ((("q", "b"),), (), ())
            await trio.sleep(0.1)
            set_topics(tmp_path, recording_fpm, {"a": "/a-v2", "b": "/b"})  # a changes
            report = await app.reload(load_config(config))
            assert report.changed == (("q", "a"),)
            await trio.sleep(0.1)
            set_topics(tmp_path, recording_fpm, {"a": "/a-v2"})  # b goes
            report = await app.reload(load_config(config))
            assert report.removed == (("q", "b"),)
        assert replies == [b":1\r\n"] * 300  # every push acknowledged, across three reloads
        assert app.store is not None
        with trio.fail_after(20):
            while (await app.store.stats("q", "a")).done_total < 300:
                await trio.sleep(0.05)
    received = read_received(record)
    uris = {r.server["REQUEST_URI"] for r in received}
    assert uris == {"/a", "/a-v2", "/b"}
    by_topic: dict[str, set[bytes]] = {}
    for r in received:
        by_topic.setdefault(r.server["HTTP_X_BUSGATE_TOPIC"], set()).add(r.body)
    assert len(by_topic["a"]) == 300  # topic a got every job, before and after its change


async def sleeping(app: App, record: Path, ms: int) -> tuple[trio.SocketStream, Received]:
    """A connection to ``app`` that pushed a job to q now sleeping ``ms`` in php, and it."""
    host, _, port = app.resp_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(encode_command("LPUSH", "q", b'{"sleep_ms": %d}' % ms))
    await stream.receive_some(100)
    (slow,) = await wait_received(record, 1)  # recorded, now sleeping in php
    return stream, slow


async def test_in_flight_delivery_finishes_when_its_topic_changes(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"q": queue(recording_fpm, {"a": "/old"})})
    async with running_daemon(config) as app:
        stream, slow = await sleeping(app, record, 500)
        set_topics(tmp_path, recording_fpm, {"a": "/new"})
        await app.reload(load_config(config))  # waits for the old dispatcher to drain
        assert app.store is not None
        (job,) = await app.store.get_job(slow.job_id)
        assert job.state.name == "DONE" and len(job.attempts) == 1
        await stream.send_all(encode_command("LPUSH", "q", b"after"))
        await stream.receive_some(100)
        received = await wait_received(record, 2)
    assert received[1].server["REQUEST_URI"] == "/new"


async def test_a_reload_during_a_slow_drain_takes_effect_at_once(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    # A reload waited for every topic it changed to drain, and the next SIGHUP waited behind
    # it: a new queue, or a rotated password, took a slow delivery's timeout (hunt 31).
    config = write_config(tmp_path, {"q": queue(recording_fpm, {"a": "/old"})})
    async with running_daemon(config) as app:
        stream, slow = await sleeping(app, record, 1500)
        with trio.fail_after(0.5):
            set_topics(tmp_path, recording_fpm, {"a": "/v2"})
            assert (await app.apply(load_config(config))).changed == (("q", "a"),)
            # While /old drains: a new queue, a, changed again, then removed and back.
            (tmp_path / "conf.d" / "n.yaml").write_text(
                queue(recording_fpm, {"n": "/n"}).replace("queue: q", "queue: n")
            )
            set_topics(tmp_path, recording_fpm, {"a": "/v3"})
            assert (await app.apply(load_config(config))).changed == (("q", "a"),)
            set_topics(tmp_path, recording_fpm, {"b": "/b"})
            assert (await app.apply(load_config(config))).removed == (("q", "a"),)
            set_topics(tmp_path, recording_fpm, {"a": "/v4"})
            assert (await app.apply(load_config(config))).added == (("q", "a"),)
            await stream.send_all(encode_command("LPUSH", "n", b"new queue"))
            assert await stream.receive_some(100) == b":1\r\n"
        (new_queue,) = [r for r in await wait_received(record, 2) if r.body == b"new queue"]
        assert new_queue.server["REQUEST_URI"] == "/n"
        with trio.fail_after(5):
            await app.settled()
        assert app.store is not None
        (job,) = await app.store.get_job(slow.job_id)
        assert job.state.name == "DONE" and len(job.attempts) == 1  # drained, not cut
        await stream.send_all(encode_command("LPUSH", "q", b"after"))
        await stream.receive_some(100)
        received = await wait_received(record, 3)
        await stream.aclose()
    # One dispatcher for a, with what the last reload said.
    assert [r.server["REQUEST_URI"] for r in received if r.body == b"after"] == ["/v4"]
    assert app.dispatcher("q", "a").topic.uri == "/v4"


async def test_pausing_by_reload_keeps_jobs_and_resuming_delivers(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"q": queue(recording_fpm, {"a": "/a"})})
    async with running_daemon(config) as app:
        text = queue(recording_fpm, {"a": "/a"}) + "    paused: true\n"
        (tmp_path / "conf.d" / "q.yaml").write_text(text)
        report = await app.reload(load_config(config))
        assert report.toggled == (("q", "a"),) and report.changed == ()
        host, _, port = app.resp_address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(encode_command("LPUSH", "q", b"held"))
        await stream.receive_some(100)
        await trio.sleep(0.3)
        assert read_received(record) == []
        set_topics(tmp_path, recording_fpm, {"a": "/a"})
        await app.reload(load_config(config))
        (received,) = await wait_received(record, 1)
    assert received.body == b"held"


async def test_store_or_listen_changes_are_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    async with running_daemon(config) as app:
        text = config.read_text().replace("resp: 127.0.0.1:0", "resp: 127.0.0.1:1")
        config.write_text(text)
        with pytest.raises(ReloadRefused, match=r"listen\.resp changed: restart"):
            await app.reload(load_config(config))


async def test_a_backend_that_cannot_be_set_up_refuses_the_reload_before_anything_changes(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    """A missing ca_file is found only when the topic's backend is built: the whole reload
    is refused then, with the old topics running on, and a later good reload applies."""
    config = write_config(tmp_path, {"q": queue(recording_fpm, {"a": "/a"})})
    missing = tmp_path / "missing-ca.pem"
    async with running_daemon(config) as app:
        good = queue(recording_fpm, {"a": "/a-v2"})
        bad = good + f"  b: {{backend: 'https://127.0.0.1:9/b', ca_file: {missing}}}\n"
        (tmp_path / "conf.d" / "q.yaml").write_text(bad)
        with pytest.raises(ReloadRefused) as refused:
            await app.reload(load_config(config))
        assert str(refused.value).startswith(
            f"{tmp_path / 'conf.d' / 'q.yaml'}: topics.b.ca_file: [Errno 2]"
        )
        assert set(app._dispatchers) == {("q", "a")}
        assert app.config.queues["q"].topics[0].uri == "/a"  # the old config runs on
        host, _, port = app.resp_address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(encode_command("LPUSH", "q", b"one"))
        await stream.receive_some(100)
        (first,) = await wait_received(record, 1)
        assert first.server["REQUEST_URI"] == "/a"
        (tmp_path / "conf.d" / "q.yaml").write_text(good)
        report = await app.reload(load_config(config))
        assert report.changed == (("q", "a"),)
        await stream.send_all(encode_command("LPUSH", "q", b"two"))
        await stream.receive_some(100)
        received = await wait_received(record, 2)
        assert received[1].server["REQUEST_URI"] == "/a-v2"
        await stream.aclose()
    # check-config reads the ca_file too, so it refuses the bad one as `run` would.
    (tmp_path / "conf.d" / "q.yaml").write_text(bad)
    done = await trio.run_process(
        [sys.executable, "-m", "gateway.cli", "check-config", "-c", str(config)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 2  # a configuration error: RestartPreventExitStatus=2
    assert b"topics.b.ca_file: [Errno 2] No such file or directory" in done.stderr


async def test_removing_a_topic_with_jobs_waiting_says_how_many_are_left(
    recording_fpm: PhpFpm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    both = (
        queue(recording_fpm, {"a": "/a"}) + "  b: {backend: 'http://127.0.0.1:9/', paused: true}\n"
    )
    config = write_config(tmp_path, {"q": both})
    async with running_daemon(config) as app:
        host, _, port = app.resp_address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(encode_command("LPUSH", "q", b"1", b"2", b"3"))
        assert await stream.receive_some(100) == b":3\r\n"
        await stream.aclose()
        set_topics(tmp_path, recording_fpm, {"a": "/a"})
        report = await app.reload(load_config(config))
        assert report.removed == (("q", "b"),)
    (warning,) = [r for r in caplog.records if "was removed with" in r.getMessage()]
    assert warning.levelname == "WARNING"
    assert warning.getMessage().startswith(
        "topic q/b was removed with 3 jobs waiting (3 ready, 0 delayed, 0 leased) and 0 dead"
    )


async def test_a_changed_password_shuts_out_connections_already_logged_in(
    recording_fpm: PhpFpm, tmp_path: Path
) -> None:
    def with_password(password: str) -> str:
        return queue(recording_fpm, {"a": "/a"}).replace(
            "topics:", f"password: {password}\ntopics:"
        )

    config = write_config(tmp_path, {"q": with_password("old-one")})
    async with running_daemon(config) as app:
        host, _, port = app.resp_address.rpartition(":")
        by_queue = await trio.open_tcp_stream(host, int(port))
        by_password = await trio.open_tcp_stream(host, int(port))
        await by_queue.send_all(encode_command("AUTH", "q", "old-one"))
        await by_password.send_all(encode_command("AUTH", "old-one"))
        for stream in (by_queue, by_password):
            assert await stream.receive_some(100) == b"+OK\r\n"
            await stream.send_all(encode_command("LPUSH", "q", b"before"))
            assert await stream.receive_some(100) == b":1\r\n"
        (tmp_path / "conf.d" / "q.yaml").write_text(with_password("new-one"))
        await app.reload(load_config(config))
        for stream in (by_queue, by_password):
            await stream.send_all(encode_command("LPUSH", "q", b"after"))
            assert await stream.receive_some(100) == b"-NOAUTH Authentication required.\r\n"
        await by_queue.send_all(encode_command("AUTH", "q", "new-one"))
        assert await by_queue.receive_some(100) == b"+OK\r\n"
        await by_queue.send_all(encode_command("LPUSH", "q", b"after"))
        assert await by_queue.receive_some(100) == b":1\r\n"
        # A reload that leaves the password as it was keeps the login.
        await app.reload(load_config(config))
        await by_queue.send_all(encode_command("LPUSH", "q", b"again"))
        assert await by_queue.receive_some(100) == b":1\r\n"
        for stream in (by_queue, by_password):
            await stream.aclose()


def start_daemon(tmp_path: Path, fpm: PhpFpm) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``busgate run`` with topic a of queue q: the process, its RESP port and its log."""
    port = free_port()
    config = write_config(tmp_path, {"q": queue(fpm, {"a": "/a"})})
    config.write_text(config.read_text().replace("resp: 127.0.0.1:0", f"resp: 127.0.0.1:{port}"))
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
        stderr=log.open("wb"),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    return daemon, port, log


async def test_sighup_with_broken_yaml_keeps_the_old_config(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    daemon, port, log = start_daemon(tmp_path, recording_fpm)
    try:
        await trio.to_thread.run_sync(wait_connectable, "127.0.0.1", port)
        (tmp_path / "conf.d" / "q.yaml").write_text("queue: q\ntopics:\n  a: [broken\n")
        daemon.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while "reload rejected" not in log.read_text():
                await trio.sleep(0.05)
        done = await trio.run_process(
            ["redis-cli", "-p", str(port), "LPUSH", "q", "still running"], capture_stdout=True
        )
        assert done.stdout.strip() == b"1"
        (received,) = await wait_received(record, 1)
        assert received.body == b"still running"
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
    text = log.read_text()
    assert f"{tmp_path / 'conf.d' / 'q.yaml'}:4" in text  # file and line of the YAML error
    assert daemon.returncode == 0
    assert "shutting down" in textwrap.shorten(text, 100_000)


#: A queue of 1 KiB payloads whose topic only holds them.
HELD = """\
    queue: q
    max_payload: 1KiB
    topics:
      t: {backend: "fastcgi://127.0.0.1:9", script: /srv/app.php, paused: true}
    """


async def test_producer_limits_and_payload_size_change_on_reload(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"q": HELD})
    big = b"x" * 3000
    async with running_daemon(config) as app:
        host, _, port = app.resp_address.rpartition(":")

        async def ask(stream: trio.SocketStream, *command: str | bytes) -> bytes:
            await stream.send_all(encode_command(*command))
            with trio.fail_after(5):
                return await stream.receive_some(1000)

        first = await trio.open_tcp_stream(host, int(port))
        assert (await ask(first, "LPUSH", "q", big)).startswith(b"-ERR payload of 3000 bytes")

        (tmp_path / "conf.d" / "q.yaml").write_text(textwrap.dedent(HELD).replace("1KiB", "8KiB"))
        config.write_text(config.read_text() + "producer: {max_connections: 1}\n")
        await app.reload(load_config(config))

        # The connection opened before the reload takes the larger payload...
        assert await ask(first, "LPUSH", "q", big) == b":1\r\n"
        # ...and is the one connection now allowed.
        second = await trio.open_tcp_stream(host, int(port))
        assert await ask(second, "PING") == b"-ERR max number of clients reached\r\n"
        await second.aclose()
        await first.aclose()


async def test_http_push_size_limit_follows_a_reloaded_max_payload(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"q": HELD})
    # Five 1.9 MiB payloads: over the 8 MiB body limit of 1 KiB queues, under that of 2 MiB.
    body = b'{"jobs": [%s]}' % b",".join([b'{"payload": "%s"}' % (b"x" * 1_990_000)] * 5)

    def post(address: str) -> int:
        request = urllib.request.Request(
            f"http://{address}/v1/queues/q/jobs",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code

    async with running_daemon(config) as app:
        assert await trio.to_thread.run_sync(post, app.http_address) == 413
        (tmp_path / "conf.d" / "q.yaml").write_text(textwrap.dedent(HELD).replace("1KiB", "2MiB"))
        await app.reload(load_config(config))
        assert await trio.to_thread.run_sync(post, app.http_address) == 202


async def test_sigterm_during_a_reload_is_acted_on_at_once(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    daemon, port, log = start_daemon(tmp_path, recording_fpm)
    try:
        await trio.to_thread.run_sync(wait_connectable, "127.0.0.1", port)
        await trio.run_process(["redis-cli", "-p", str(port), "RPUSH", "q", '{"sleep_ms": 2500}'])
        await wait_received(record, 1)  # in flight: a reload changing topic a waits for it
        set_topics(tmp_path, recording_fpm, {"a": "/changed"})
        daemon.send_signal(signal.SIGHUP)
        with trio.fail_after(5):
            while "SIGHUP: reloading" not in log.read_text():
                await trio.sleep(0.02)
        daemon.send_signal(signal.SIGTERM)
        sent = trio.current_time()
        with trio.fail_after(5):
            while "shutting down" not in log.read_text():
                await trio.sleep(0.02)
        assert trio.current_time() - sent < 1.0  # not after the reload's drain (2.5 s)
        assert await trio.to_thread.run_sync(daemon.wait, 20) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert "configuration reloaded" in log.read_text()
    assert len(read_received(record)) == 1  # the changed topic did not start again


async def test_a_slow_drain_holds_back_no_other_topic_and_a_shutdown_cuts_it_short(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    # A reload changes topics slow and fast while slow has a 3 s delivery in flight.  Fast's
    # new dispatcher used to wait for slow's drain; the stats counted nothing in flight for
    # the draining topic; and a shutdown then left the drain its reload deadline (here 6 s),
    # not the shutdown's.
    config = write_config(tmp_path, {"q": queue(recording_fpm, {"slow": "/s", "fast": "/f"})})
    async with running_daemon(config) as app:
        host, _, port = app.resp_address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(encode_command("LPUSH", "q/slow", b'{"sleep_ms": 3000}'))
        assert await stream.receive_some(100) == b":1\r\n"
        await wait_received(record, 1)
        set_topics(tmp_path, recording_fpm, {"slow": "/s2", "fast": "/f2"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.reload, load_config(config))
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert app.dispatcher_statistics()["q", "slow"].in_flight == 1
            await stream.send_all(encode_command("LPUSH", "q/fast", b"quick"))
            assert await stream.receive_some(100) == b":1\r\n"
            with trio.fail_after(2):  # not after slow's 3 s
                received = await wait_received(record, 2)
            assert received[1].server["REQUEST_URI"] == "/f2"
            began = trio.current_time()
            app.shutdown(timeout=0.5)
        assert trio.current_time() - began < 2
    assert [r.server["REQUEST_URI"] for r in read_received(record)] == ["/s", "/f2"]


async def test_the_reload_line_names_the_settings_that_changed(
    recording_fpm: PhpFpm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="busgate")
    config = write_config(tmp_path, {"q": queue(recording_fpm, {"a": "/a"})})
    async with running_daemon(config) as app:
        text = queue(recording_fpm, {"a": "/a"}).replace(
            "queue: q\n", "queue: q\npassword: s3cret\nmax_payload: 2KiB\n"
        )
        (tmp_path / "conf.d" / "q.yaml").write_text(text)
        report = await app.reload(load_config(config))
    assert report.settings == ("q.max_payload", "q.password")
    (line,) = [r.getMessage() for r in caplog.records if "configuration reloaded" in r.getMessage()]
    assert line.endswith("settings=q.max_payload,q.password")
    assert "s3cret" not in line


async def test_what_a_reload_removes_leaves_no_state_behind(
    recording_fpm: PhpFpm, record: Path, tmp_path: Path
) -> None:
    # A removed topic's durations and recent failures (about 100 KB with their excerpts)
    # and a removed queue's push batcher stayed for good: a daemon whose topics come and go
    # by reload (generated names) grew without bound.
    other = queue(recording_fpm, {"a": "/r"}).replace("queue: q", "queue: r")
    config = write_config(tmp_path, {"q": queue(recording_fpm, {"a": "/a", "b": "/b"}), "r": other})
    async with running_daemon(config) as app:
        host, _, port = app.resp_address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        for name in ("q", "r"):
            await stream.send_all(encode_command("LPUSH", name, b"{}"))
            assert await stream.receive_some(100) == b":1\r\n"
        await stream.aclose()
        await wait_received(record, 3)
        assert app.store is not None and app.service is not None
        with trio.fail_after(10):
            while (await app.store.stats("r", "a")).done_total < 1:
                await trio.sleep(0.05)
        await app.telemetry.sample()
        assert set(app.telemetry._topics) == {("q", "a"), ("q", "b"), ("r", "a")}
        set_topics(tmp_path, recording_fpm, {"a": "/a"})
        (tmp_path / "conf.d" / "r.yaml").unlink()
        await app.reload(load_config(config))
        await app.telemetry.sample()
        assert set(app.telemetry._topics) == {("q", "a")}
        assert set(app.service._batchers) == {"q"}
