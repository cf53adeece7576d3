"""`busgate stats` says how many jobs matched no topic's filter (acknowledged and dropped),
which `/v1/stats` counts as `totals.unmatched`: the table alone showed nothing of them."""

from __future__ import annotations

import json
from pathlib import Path

import redis
import trio

from tests.gateway.test_admin_cli import busgate, ok
from tests.support.daemon import running_daemon, write_config

TOKEN = "a-stats-admin-token-long-enough"
ORDERS = """\
    queue: orders
    topics:
      fr:
        backend: fastcgi://127.0.0.1:9
        script: /srv/app/index.php
        paused: true
        filter: {country: fr}
    """


async def test_stats_names_the_jobs_that_matched_no_topic(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    config = write_config(
        tmp_path, {"orders": ORDERS}, main_extra="admin_token_file: admin.token\n"
    )
    async with running_daemon(config) as app:
        host, _, port = app.resp_address.rpartition(":")

        def push() -> None:
            with redis.Redis(host=host, port=int(port)) as client:
                client.lpush("orders", '{"country": "fr"}', '{"country": "de"}', "not json")

        await trio.to_thread.run_sync(push)
        cli = ("--url", f"http://{app.http_address}", "--token-file", str(tmp_path / "admin.token"))
        with trio.fail_after(10):  # the stats are sampled, not read at each request
            while True:
                document = json.loads(ok(await busgate("stats", "--json", *cli)).out)
                (queue,) = document["queues"]
                if queue["topics"][0]["totals"]["unmatched"] == 2:
                    break
                await trio.sleep(0.1)
        lines = ok(await busgate("stats", *cli)).out.splitlines()
        assert lines[1].split()[:2] == ["orders/fr", "1"]
        assert lines[2] == (
            "matched no topic's filter, acknowledged and dropped: 2 pushed to orders"
            " (totals.unmatched)"
        )
