"""The operator surface under abuse, on both stores: dead-letter replay and delete (API and
CLI), dead listings, the live feed's login and ``/metrics``, checked against what the store
really holds afterwards, not only against the HTTP answers.

A real daemon runs in-process on SQLite or on a real redis-server, delivering to the h11
recording backend; jobs are pushed with redis-py and made dead by the backend's 404.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from adapters.storage.jobs import State
from gateway.app import App
from gateway.config import load_config
from tests.gateway.test_admin import TOKEN, api
from tests.gateway.test_admin_cli import busgate
from tests.gateway.test_startup_errors import busgate_run, check_config, refused, with_token_file
from tests.support.daemon import running_daemon, write_config
from tests.support.http_server import RecordingServer
from tests.support.redis import RedisServer

DEAD = "/v1/queues/orders/topics/email/dead"
DIES = json.dumps({"respond_status": 404})  # in dead_on: dead at the first attempt


def orders_yaml(url: str, *, sms: bool = True) -> str:
    topics = f"""\
queue: orders
topics:
  email:
    backend: {url}
    retry: {{max_attempts: 1}}
"""
    if sms:
        topics += f"""\
  sms:
    backend: {url}
    retry: {{max_attempts: 1}}
"""
    return topics


@dataclass
class Daemon:
    app: App
    config: Path
    token_file: Path
    backend: RecordingServer

    async def push(self, *payloads: str, queue: str = "orders") -> None:
        host, _, port = self.app.resp_address.rpartition(":")

        def lpush() -> None:
            with redis.Redis(host=host, port=int(port)) as client:
                client.lpush(queue, *payloads)

        await trio.to_thread.run_sync(lpush)

    async def cli(self, *args: str) -> tuple[int, str, str]:
        run = await busgate(
            *args, "--url", f"http://{self.app.http_address}", "--token-file", str(self.token_file)
        )
        return run.code, run.out, run.err

    async def depth(self, topic: str = "email") -> dict[str, int]:
        stats = await self.app.store.stats("orders", topic)  # type: ignore[union-attr]
        return {"ready": stats.ready, "leased": stats.leased, "dead": stats.dead}

    async def states(self, ids: list[str], topic: str = "email") -> list[State]:
        """What the store holds for these jobs' copies in ``topic``."""
        assert self.app.store is not None
        out = []
        for job_id in ids:
            (copy,) = [c for c in await self.app.store.get_job(job_id) if c.topic == topic]
            out.append(copy.state)
        return out

    async def dead_ids(self, count: int, topic: str = "email") -> list[str]:
        """Wait until ``count`` jobs are dead in ``topic``; their ids, newest first."""
        with trio.fail_after(20):
            while (await self.depth(topic))["dead"] < count:
                await trio.sleep(0.02)
        ids: list[str] = []
        cursor = ""
        while True:
            path = f"/v1/queues/orders/topics/{topic}/dead?limit=500" + cursor
            status, page = await api(self.app, "GET", path)
            assert status == 200, page
            ids += [job["id"] for job in page["jobs"]]
            if not page["cursor"]:
                return ids
            cursor = f"&cursor={page['cursor']}"

    async def pause(self) -> None:
        assert (await api(self.app, "POST", "/v1/queues/orders/topics/email/pause", {}))[0] == 200


@pytest.fixture(params=["sqlite", "redis"])
async def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Daemon]:
    backend = RecordingServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        token_file = tmp_path / "admin.token"
        token_file.write_text(TOKEN + "\n")
        store = None
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            server.cli("FLUSHALL")
            store = f"redis://127.0.0.1:{server.port}/0"
        config = write_config(
            tmp_path,
            {"orders": orders_yaml(backend.url)},
            main_extra="admin_token_file: admin.token\n",
            store=store,
        )
        async with running_daemon(config) as app:
            yield Daemon(app, config, token_file, backend)
        nursery.cancel_scope.cancel()


# -- replay and delete ------------------------------------------------------------------------


async def test_a_replay_by_ids_does_not_list_the_dead_set(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaying N dead jobs in chunks of ids (as `busgate dead replay` does) used to list
    every dead job of the topic for each chunk: N²/100 reads, minutes for a full dead list."""
    await daemon.push(*[DIES] * 150)
    ids = await daemon.dead_ids(150)
    await daemon.pause()
    store = daemon.app.store
    assert store is not None
    listed: list[int] = []
    real_list_dead = store.list_dead

    async def counting_list_dead(*args: Any) -> Any:
        listed.append(1)
        return await real_list_dead(*args)

    monkeypatch.setattr(store, "list_dead", counting_list_dead)
    chosen = ids[:100] + ids[:3] + ["no-such-job"]  # duplicates and an unknown id too
    status, result = await api(daemon.app, "POST", DEAD + "/replay", {"ids": chosen})
    assert (status, result) == (200, {"matched": 100, "replayed": 100})
    status, result = await api(daemon.app, "POST", DEAD + "/delete", {"ids": ids[100:120]})
    assert (status, result) == (200, {"matched": 20, "deleted": 20})
    assert listed == []
    assert set(await daemon.states(ids[:100])) == {State.READY}  # paused: waiting
    assert set(await daemon.states(ids[120:])) == {State.DEAD}
    assert await daemon.depth() == {"ready": 100, "leased": 0, "dead": 30}
    assert [c.state for c in await store.get_job(ids[100])] == [State.DEAD]  # sms's copy only
    # the sms topic's copies of the same ids are untouched
    assert await daemon.depth("sms") == {"ready": 0, "leased": 0, "dead": 150}


async def test_concurrent_replays_replay_each_job_once(daemon: Daemon) -> None:
    await daemon.push(*[DIES] * 40)
    ids = await daemon.dead_ids(40)
    await daemon.pause()
    results: list[tuple[int, Any]] = []

    async def replay(body: dict[str, Any]) -> None:
        results.append(await api(daemon.app, "POST", DEAD + "/replay", body))

    async with trio.open_nursery() as nursery:
        for body in ({"ids": ids}, {"ids": ids[::-1]}, {"all": True}, {"filter": {"status": 404}}):
            nursery.start_soon(replay, body)
    assert sum(r[1].get("replayed", 0) for r in results) == 40, results
    assert all(status in (200, 404) for status, _ in results), results
    assert set(await daemon.states(ids)) == {State.READY}
    assert await daemon.depth() == {"ready": 40, "leased": 0, "dead": 0}
    stats = await daemon.app.store.stats("orders", "email")  # type: ignore[union-attr]
    assert stats.replayed_total == 40


async def test_the_cli_replay_goes_on_past_ids_that_are_not_dead(daemon: Daemon) -> None:
    """One chunk whose ids are no longer dead (another operator replayed them, or a typo)
    stopped `busgate dead replay` half-way with exit status 1."""
    await daemon.push(*[DIES] * 3)
    first, second, third = await daemon.dead_ids(3)
    await daemon.pause()
    # --rate 1: one id per call, so the unknown id is a chunk of its own
    code, out, err = await daemon.cli(
        "dead", "replay", "orders/email", "--ids", first, "nope", second, "--rate", "1", "--yes"
    )
    assert (code, err) == (0, ""), out
    assert out.startswith("replayed 2 of 3 dead jobs of orders/email"), out
    assert out.rstrip().endswith("; 1 were no longer dead"), out
    # the same id twice is one job, not one replayed and one "no longer dead"
    code, out, err = await daemon.cli(
        "dead", "replay", "orders/email", "--ids", third, third, "--yes"
    )
    assert (code, err) == (0, ""), out
    assert out.startswith("replayed 1 of 1 dead job of orders/email"), out
    assert "no longer dead" not in out
    assert await daemon.states([first, second, third]) == [State.READY] * 3
    # nothing to delete: said so at once, not "delete 0 dead jobs? add --yes"
    code, out, err = await daemon.cli("dead", "delete", "orders/email", "--ids", "nope")
    assert (code, out, err) == (1, "", "busgate: no dead job matches that filter\n")
    # an unknown topic still stops it, with the server's message
    code, out, err = await daemon.cli("dead", "replay", "orders/nope", "--ids", first, "--yes")
    assert (code, err) == (1, "busgate: unknown topic 'nope' in queue 'orders'\n")


async def test_two_cli_replays_of_one_filter_replay_each_job_once(daemon: Daemon) -> None:
    await daemon.push(*[DIES] * 250)
    ids = await daemon.dead_ids(250)
    await daemon.pause()
    runs: list[tuple[int, str, str]] = []

    async def replay() -> None:
        runs.append(await daemon.cli("dead", "replay", "orders/email", "--status", "404", "--yes"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replay)
        nursery.start_soon(replay)
    # Neither stops half-way; one that finds nothing left to replay says so (exit 1, as the
    # README has it for a filter that matches nothing).
    counts = []
    for code, out, err in runs:
        if code == 1:
            assert out == "" and err in (
                "busgate: no dead job matches that filter\n",  # at its count, or
                "busgate: no dead job matches any more: nothing replayed\n",  # after it
            )
            continue
        assert (code, err) == (0, ""), runs
        counts.append(int(out.split()[1]))  # "replayed N of M dead jobs …"
    assert sum(counts) == 250, runs
    assert set(await daemon.states(ids)) == {State.READY}


async def test_a_replay_while_paused_is_delivered_on_resume(daemon: Daemon) -> None:
    await daemon.push(json.dumps({"respond_status": 404, "n": 1}))
    (job_id,) = await daemon.dead_ids(1)
    await daemon.pause()
    delivered = len(daemon.backend.requests)
    assert await api(daemon.app, "POST", DEAD + "/replay", {"ids": [job_id]}) == (
        200,
        {"matched": 1, "replayed": 1},
    )
    await trio.sleep(0.3)
    assert len(daemon.backend.requests) == delivered
    assert await daemon.states([job_id]) == [State.READY]
    assert (await api(daemon.app, "POST", "/v1/queues/orders/topics/email/resume", {}))[0] == 200
    with trio.fail_after(10):
        while await daemon.states([job_id]) != [State.DEAD]:  # it answers 404 again
            await trio.sleep(0.02)
    status, job = await api(daemon.app, "GET", f"/v1/jobs/{job_id}")
    assert status == 200
    (copy,) = [c for c in job["copies"] if c["topic"] == "email"]
    assert [a["attempt"] for a in copy["attempts"]] == [1, 1]  # fresh attempts, history kept


async def test_numbers_that_are_not_numbers_are_refused(daemon: Daemon) -> None:
    """NaN and Infinity are valid to Python's json: a rate of NaN was a 500, and a filter
    `since: NaN` matched every dead job, so a delete by it deleted them all."""
    await daemon.push(*[DIES] * 3)
    await daemon.dead_ids(3)

    async def post(action: str, raw: str) -> tuple[int, Any]:
        return await api(daemon.app, "POST", f"{DEAD}/{action}", raw.encode())

    for body, message in [
        ('{"all": true, "rate": true}', '"rate" must be a positive number of jobs per second'),
        ('{"all": true, "dry_run": "no"}', '"dry_run" must be true or false'),
    ]:
        for action in ("replay", "delete"):
            if "rate" in body and action == "delete":
                continue
            assert await post(action, body) == (400, {"error": message}), body
    # Not JSON (RFC 8259), though Python's json reads them: refused as the body is read.
    for body in (
        '{"all": true, "rate": NaN}',
        '{"all": true, "rate": Infinity}',
        '{"filter": {"since": NaN}}',
        '{"filter": {"until": -Infinity}}',
        '{"filter": {"until": 1e400}}',
    ):
        for action in ("replay", "delete"):
            status, answer = await post(action, body)
            assert status == 400 and "the body is not valid JSON" in answer["error"], body
    for query in ("since=nan", "until=inf", "cursor=nan/x", "cursor=abc"):
        status, answer = await api(daemon.app, "GET", f"{DEAD}?{query}")
        assert status == 400, (query, answer)
    assert await daemon.depth() == {"ready": 0, "leased": 0, "dead": 3}


async def test_stats_show_a_replay_or_delete_at_once(daemon: Daemon) -> None:
    """As after a pause: `busgate stats` right after `busgate dead replay` showed the dead
    jobs still there, from the sample taken before it."""
    await daemon.push(*[DIES] * 4)
    ids = await daemon.dead_ids(4)
    await daemon.pause()
    await daemon.app.telemetry.sample()
    assert (await api(daemon.app, "POST", DEAD + "/replay", {"ids": ids[:3]}))[0] == 200
    assert (await api(daemon.app, "POST", DEAD + "/delete", {"all": True}))[0] == 200
    status, stats = await api(daemon.app, "GET", "/v1/stats")
    assert status == 200
    (email,) = [t for t in stats["queues"][0]["topics"] if t["topic"] == "email"]
    assert (email["depth"]["dead"], email["depth"]["ready"]) == (0, 3)


async def test_dead_pages_hold_every_dead_job_once(daemon: Daemon) -> None:
    await daemon.push(*[DIES] * 60)
    everyone = await daemon.dead_ids(60)
    seen: list[str] = []
    cursor = ""
    while True:
        status, page = await api(daemon.app, "GET", f"{DEAD}?limit=7{cursor}")
        assert status == 200 and len(page["jobs"]) <= 7
        seen += [job["id"] for job in page["jobs"]]
        if not page["cursor"]:
            break
        cursor = f"&cursor={page['cursor']}"
    assert sorted(seen) == sorted(everyone) and len(set(seen)) == 60
    for limit in ("0", "-1", "501", "1e2", "99999999999999999999", "%EF%BC%91"):
        assert (await api(daemon.app, "GET", f"{DEAD}?limit={limit}"))[0] == 400, limit
    for job_id in ("nope", "%00", "a%2Fb", "x" * 2000):
        assert (await api(daemon.app, "GET", f"/v1/jobs/{job_id}"))[0] == 404, job_id


# -- the live feed ----------------------------------------------------------------------------


async def test_a_live_login_of_deeply_nested_json_is_refused_politely(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """It raised RecursionError out of the handler: a traceback in the log for any
    unauthenticated client, and the connection dropped without a close frame (1006).
    (Nested 4,000 deep: the login message may be 4 KiB at most.)"""
    url = f"ws://{daemon.app.http_address}/v1/live"
    for message in ("[" * 4000, b"\xff\xfe", "null", '{"token": ["x"]}'):
        async with trio_websocket.open_websocket_url(url) as socket:
            await socket.send_message(message)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed, trio.fail_after(10):
                await socket.get_message()
        reason = closed.value.reason
        assert reason is not None and reason.code == 1008, (message[:10], reason)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    async with trio_websocket.open_websocket_url(url) as socket:
        await socket.send_message(json.dumps({"token": TOKEN}))
        assert json.loads(await socket.get_message())["type"] == "stats"


async def test_a_live_client_that_talks_can_still_close(daemon: Daemon) -> None:
    """The feed never read what a logged-in client sent: past one unread message its close
    frame went unanswered, and the daemon kept feeding it."""
    url = f"ws://{daemon.app.http_address}/v1/live"
    async with trio_websocket.open_websocket_url(url) as socket:
        await socket.send_message(json.dumps({"token": TOKEN}))
        assert json.loads(await socket.get_message())["type"] == "stats"
        for n in range(20):
            await socket.send_message(f"ping {n}")
        assert daemon.app.telemetry.subscribers == 1
        with trio.fail_after(3):
            await socket.aclose()
    with trio.fail_after(3):
        while daemon.app.telemetry.subscribers:
            await trio.sleep(0.02)


# -- /metrics ---------------------------------------------------------------------------------


async def scrape(app: App) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every series of /metrics, parsed by Prometheus' own parser; checks it is well formed."""
    await app.telemetry.sample()
    status, text = await api(app, "GET", "/metrics")
    assert status == 200
    series: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    families = list(text_string_to_metric_families(text))
    for family in families:
        assert family.documentation and family.type in ("counter", "gauge", "histogram")
        assert f"# TYPE {family.name}" in text
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in series, f"duplicate series {key}"
            series[key] = sample.value
    names = [family.name for family in families]
    assert len(names) == len(set(names))
    return series


async def test_metrics_stay_valid_and_monotonic_across_a_reload(daemon: Daemon) -> None:
    await daemon.push(DIES, json.dumps({"n": 1}))
    await daemon.dead_ids(1)
    with trio.fail_after(10):
        while len(daemon.backend.requests) < 4:
            await trio.sleep(0.02)
    before = await scrape(daemon.app)
    assert before["busgate_jobs_pushed_total", (("queue", "orders"), ("topic", "sms"))] == 2

    # a changed topic (email) and a removed one (sms)
    (daemon.config.parent / "conf.d" / "orders.yaml").write_text(
        orders_yaml(daemon.backend.url, sms=False).replace("max_attempts: 1", "max_attempts: 2")
    )
    await daemon.app.reload(load_config(daemon.config))
    await daemon.push(json.dumps({"n": 2}))
    with trio.fail_after(10):
        while len(daemon.backend.requests) < 5:
            await trio.sleep(0.02)
    after = await scrape(daemon.app)

    def cumulative(name: str) -> bool:
        return name.endswith(("_total", "_count", "_sum", "_bucket"))

    email = (("queue", "orders"), ("topic", "email"))
    assert after["busgate_jobs_pushed_total", email] == 3
    for key, value in before.items():
        if cumulative(key[0]) and key in after:
            assert after[key] >= value, key
    # the removed topic holds a dead job: it stays in /metrics whole, counters and histogram,
    # marked not configured, without the series of a dispatcher it no longer has
    sms = {key[0] for key in after if ("topic", "sms") in key[1]}
    assert {"busgate_jobs_dead_total", "busgate_delivery_duration_seconds_bucket"} <= sms
    assert "busgate_topic_unconfigured" in sms and "busgate_paused" not in sms
    assert any(("topic", "email") in key[1] for key in after if key[0].endswith("_bucket"))


# -- the admin token --------------------------------------------------------------------------


def test_a_token_outside_ascii_is_refused_at_start(tmp_path: Path) -> None:
    """Such a token was taken, then refused to curl (which sends the header as UTF-8) while
    Python's http.client (Latin-1) got in, and crashed the CLI outside Latin-1."""
    config = with_token_file(tmp_path, "jeton-d'administration-\u00e9t\u00e9\n")
    words = ("admin_token_file", "printable ASCII", "admin.token")
    refused(check_config(config), *words, prefix="busgate: check-config: ", status=2)
    refused(busgate_run(config), *words, status=2)
