"""Backend health for FastCGI topics with ``status_path``: php-fpm's own status page.

Every ``INTERVAL`` seconds each such topic's pool is asked for ``<status_path>?json`` on a
connection of its own, opened and closed per probe (a kept connection would pin a worker).
The dashboard shows active and idle processes, the listen queue and how often
``pm.max_children`` was reached: the numbers that say whether a pool is too small.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from fastcgi.address import parse_address
from fastcgi.errors import BackendError, RemoteProtocolError
from fastcgi.pool import ConnectionPool, PoolLimits, Timeouts
from gateway.config import TopicConfig

log = logging.getLogger("busgate.health")

INTERVAL = 5.0
PROBE_TIMEOUT = 2.0

#: php-fpm's JSON keys -> ours.
_FIELDS = {
    "active processes": "active_processes",
    "idle processes": "idle_processes",
    "total processes": "total_processes",
    "listen queue": "listen_queue",
    "max listen queue": "max_listen_queue",
    "listen queue len": "listen_queue_len",
    "max children reached": "max_children_reached",
    "accepted conn": "accepted_conn",
    "slow requests": "slow_requests",
}


async def probe(topic: TopicConfig) -> dict[str, Any]:
    """php-fpm's status for a topic's pool; ``{"error": …}`` when it cannot be read."""
    assert topic.status_path is not None
    path = topic.status_path.encode()
    params = {
        b"SCRIPT_NAME": path,
        b"SCRIPT_FILENAME": path,
        b"REQUEST_URI": path + b"?json",
        b"QUERY_STRING": b"json",
        b"REQUEST_METHOD": b"GET",
        b"SERVER_PROTOCOL": b"HTTP/1.1",
    }
    try:
        async with ConnectionPool(
            parse_address(topic.backend),
            limits=PoolLimits(max_connections=1),
            timeouts=Timeouts(connect=PROBE_TIMEOUT, write=PROBE_TIMEOUT, read=PROBE_TIMEOUT),
        ) as pool:
            response = await pool.request(params)
    except (BackendError, RemoteProtocolError) as exc:
        return {"error": str(exc)}
    if response.status != 200:
        return {"error": f"{topic.status_path} answered {response.status}: is pm.status_path set?"}
    try:
        status = json.loads(response.body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can go
        status = None
    if not isinstance(status, dict):
        # Some other script at that path (a front controller answering every URI, say):
        # what it says is no count of ours.
        return {"error": f"{topic.status_path} did not answer php-fpm's JSON status"}
    name = status.get("pool")
    return {ours: _count(status.get(theirs)) for theirs, ours in _FIELDS.items()} | {
        "pool": name if isinstance(name, str) else None
    }


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class BackendHealth:
    def __init__(self, topics: Callable[[], Sequence[TopicConfig]]) -> None:
        self._topics = topics
        self._current: dict[tuple[str, str], dict[str, Any]] = {}

    def current(self) -> dict[tuple[str, str], dict[str, Any] | None]:
        return dict(self._current)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.check()
            await trio.sleep(INTERVAL)

    async def check(self) -> None:
        watched = [t for t in self._topics() if t.kind == "fastcgi" and t.status_path]
        results: dict[tuple[str, str], dict[str, Any]] = {}

        async def one(topic: TopicConfig) -> None:
            results[topic.queue, topic.name] = await probe(topic)

        async with trio.open_nursery() as nursery:
            for topic in watched:
                nursery.start_soon(one, topic)
        self._current = results
