"""Dead jobs of a topic (or a whole queue) removed from conf.d by a reload.

The jobs stay in the store; the admin API and the CLI used to answer 404 "unknown topic"
for them, so they could be neither seen nor cleaned up.  Now they can be listed and deleted
(the answer says the topic is not configured), and a replay, which would leave them waiting
with nothing to deliver them, is refused with a 409 that says what to do.

A real daemon runs in-process on SQLite or on a real redis-server, delivering to the h11
recording backend, which answers 500: with ``max_attempts: 1`` every job dies at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from adapters.storage.jobs import State
from gateway.config import load_config
from tests.gateway.test_admin import TOKEN, api
from tests.gateway.test_operator_review import Daemon
from tests.support.daemon import running_daemon, write_config
from tests.support.http_server import RecordingServer
from tests.support.redis import RedisServer

FAILS = json.dumps({"respond_status": 500})
REFUSED = (
    "topic orders/sms is not configured: replayed jobs would wait undelivered;"
    " add it back and reload first (or, with daemons sharing a Redis store, replay through"
    " one that has it)"
)
NOTE = (
    "busgate: orders/sms is not configured (removed by a reload?): its dead jobs can be"
    " listed and deleted, not replayed until the topic is added back\n"
)


def topic_yaml(name: str, url: str) -> str:
    return f"""\
  {name}:
    backend: {url}
    retry: {{max_attempts: 1}}
    circuit: {{failures: 1000}}  # the 500s are on purpose
"""


def orders_yaml(url: str, *topics: str) -> str:
    return "queue: orders\ntopics:\n" + "".join(topic_yaml(name, url) for name in topics)


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
            {
                "orders": orders_yaml(backend.url, "email", "sms"),
                "other": orders_yaml(backend.url, "audit").replace("orders", "other"),
            },
            main_extra="admin_token_file: admin.token\n",
            store=store,
        )
        async with running_daemon(config) as app:
            yield Daemon(app, config, token_file, backend)
        nursery.cancel_scope.cancel()


async def reload_with(daemon: Daemon, orders: str | None) -> None:
    """Rewrite conf.d/orders.yaml (None: remove it) and reload, as SIGHUP does."""
    drop_in = daemon.config.parent / "conf.d" / "orders.yaml"
    if orders is None:
        drop_in.unlink()
    else:
        drop_in.write_text(orders)
    await daemon.app.reload(load_config(daemon.config))


async def test_a_removed_topics_dead_jobs_are_listed_and_deleted_not_replayed(
    daemon: Daemon,
) -> None:
    await daemon.push(FAILS, FAILS, FAILS)
    ids = sorted(await daemon.dead_ids(3, "sms"))
    await daemon.dead_ids(3, "email")
    await reload_with(daemon, orders_yaml(daemon.backend.url, "email"))
    dead = "/v1/queues/orders/topics/sms/dead"

    # listed, saying the topic is not configured
    status, page = await api(daemon.app, "GET", dead)
    assert status == 200, page
    assert sorted(job["id"] for job in page["jobs"]) == ids
    assert (page["cursor"], page["configured"]) == (None, False)
    status, page = await api(daemon.app, "GET", dead + "?limit=1")
    assert (status, len(page["jobs"]), page["configured"]) == (200, 1, False)
    assert page["cursor"] is not None
    # a configured topic's answers are as they were
    status, page = await api(daemon.app, "GET", "/v1/queues/orders/topics/email/dead")
    assert status == 200 and "configured" not in page and len(page["jobs"]) == 3

    # a replay, of any selection, dry run or not, is refused: nothing would deliver them
    for body in ({"all": True}, {"ids": ids[:1]}, {"filter": {"status": 500}}):
        for extra in ({}, {"dry_run": True}, {"rate": 10}):
            status, answer = await api(daemon.app, "POST", dead + "/replay", {**body, **extra})
            assert (status, answer) == (409, {"error": REFUSED}), (body, extra)
    run = await daemon.cli("dead", "replay", "orders/sms", "--all", "--yes")
    assert run == (1, "", f"busgate: {REFUSED}\n")
    run = await daemon.cli("dead", "replay", "orders/sms", "--ids", ids[0], "--dry-run")
    assert run == (1, "", f"busgate: {REFUSED}\n")
    assert await daemon.states(ids, "sms") == [State.DEAD] * 3

    # the CLI lists them, and says why they cannot be replayed
    code, out, err = await daemon.cli("dead", "list", "orders/sms")
    assert (code, err) == (0, NOTE), out
    assert out.splitlines()[0].split()[:2] == ["ID", "DIED"]
    assert sorted(line.split()[0] for line in out.splitlines()[1:]) == ids
    code, out, err = await daemon.cli("dead", "list", "orders/sms", "--all-pages", "--json")
    assert (code, err) == (0, NOTE)
    listed = json.loads(out)
    assert (listed["configured"], sorted(job["id"] for job in listed["jobs"])) == (False, ids)
    code, out, err = await daemon.cli("dead", "list", "orders/sms", "--limit", "1", "--json")
    assert (code, err) == (0, NOTE)
    assert json.loads(out)["configured"] is False
    code, out, err = await daemon.cli("dead", "list", "orders/sms", "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 2
    assert err.startswith(NOTE) and "busgate: more dead jobs: --cursor" in err

    # deleted: over HTTP by id, then the rest with the CLI
    status, answer = await api(daemon.app, "POST", dead + "/delete", {"ids": [ids[0]]})
    assert (status, answer) == (200, {"matched": 1, "deleted": 1, "configured": False})
    assert await daemon.app.store.get_job(ids[0]) != []  # type: ignore[union-attr]
    assert (await daemon.depth("sms"))["dead"] == 2
    run = await daemon.cli("dead", "delete", "orders/sms", "--all", "--dry-run")
    assert run == (0, "2 dead jobs of orders/sms would be deleted (dry run)\n", NOTE)
    run = await daemon.cli("dead", "delete", "orders/sms", "--status", "500", "--yes")
    assert run == (0, "deleted 2 dead jobs of orders/sms\n", NOTE)
    assert (await daemon.depth("sms"))["dead"] == 0
    assert [c.topic for c in await daemon.app.store.get_job(ids[1])] == ["email"]  # type: ignore[union-attr]
    # the email copies are untouched
    assert await daemon.states(ids, "email") == [State.DEAD] * 3

    # once empty, it still lists (as empty), and nothing matches a delete
    status, page = await api(daemon.app, "GET", dead)
    assert (status, page) == (200, {"jobs": [], "cursor": None, "configured": False})
    status, answer = await api(daemon.app, "POST", dead + "/delete", {"all": True})
    assert status == 404 and answer["matched"] == 0
    run = await daemon.cli("dead", "list", "orders/sms")
    assert run == (0, "no dead jobs match\n", NOTE)


async def test_names_the_store_has_never_seen_are_still_unknown(daemon: Daemon) -> None:
    await daemon.push(FAILS)
    await daemon.dead_ids(1, "sms")
    await reload_with(daemon, orders_yaml(daemon.backend.url, "email"))
    for path, message in (
        ("/v1/queues/orders/topics/nope", "unknown topic 'nope' in queue 'orders'"),
        ("/v1/queues/nowhere/topics/sms", "unknown queue 'nowhere'"),
        # not a name a queue can have: never configured, the store is not asked
        ("/v1/queues/a%7Db/topics/sms", "unknown queue 'a}b'"),
        ("/v1/queues/orders/topics/a%20b", "unknown topic 'a b' in queue 'orders'"),
    ):
        for method, action, body in (
            ("GET", "/dead", None),
            ("POST", "/dead/delete", {"all": True}),
            ("POST", "/dead/replay", {"all": True}),
        ):
            status, answer = await api(daemon.app, method, path + action, body)
            assert (status, answer) == (404, {"error": message}), (path, action)
    run = await daemon.cli("dead", "list", "orders/nope")
    assert run == (1, "", "busgate: unknown topic 'nope' in queue 'orders'\n")
    # what needs a running topic still does: a removed topic cannot be paused or probed
    for action in ("/pause", "/resume", "/test-delivery"):
        status, answer = await api(
            daemon.app, "POST", "/v1/queues/orders/topics/sms" + action, {"payload": "x"}
        )
        assert (status, answer) == (404, {"error": "unknown topic 'sms' in queue 'orders'"})


async def test_a_removed_queues_dead_jobs_are_listed_and_deleted_and_replayed_once_back(
    daemon: Daemon,
) -> None:
    await daemon.push(FAILS, FAILS)
    ids = sorted(await daemon.dead_ids(2, "sms"))
    await reload_with(daemon, None)  # the whole queue's drop-in is gone
    dead = "/v1/queues/orders/topics/sms/dead"
    status, page = await api(daemon.app, "GET", dead)
    assert (status, page["configured"]) == (200, False)
    assert sorted(job["id"] for job in page["jobs"]) == ids
    status, answer = await api(daemon.app, "POST", dead + "/replay", {"all": True})
    assert (status, answer) == (409, {"error": REFUSED})
    run = await daemon.cli("dead", "delete", "orders/sms", "--ids", ids[0], "--yes")
    assert run == (0, "deleted 1 dead job of orders/sms\n", NOTE)

    # added back (with a backend that now succeeds): replayed and delivered as before
    daemon.backend.requests.clear()
    await reload_with(daemon, orders_yaml(daemon.backend.url, "email", "sms"))
    status, page = await api(daemon.app, "GET", dead)
    assert (status, [job["id"] for job in page["jobs"]]) == (200, ids[1:])
    assert "configured" not in page
    status, answer = await api(daemon.app, "POST", dead + "/replay", {"all": True})
    assert (status, answer) == (200, {"matched": 1, "replayed": 1})
    with trio.fail_after(20):  # the backend still answers 500: it is tried, and dies again
        while (await daemon.depth("sms"))["dead"] != 1 or not daemon.backend.requests:
            await trio.sleep(0.02)
    (request,) = daemon.backend.requests
    assert request.headers["x-busgate-job-id"] == ids[1]
    assert request.headers["x-busgate-topic"] == "sms"
