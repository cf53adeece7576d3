"""Real redis-server processes for the tests: a standalone server and a 3-master cluster.

The cluster is built the way an operator builds one: three ``redis-server --cluster-enabled
yes`` nodes (and optionally replicas of each) joined by ``redis-cli --cluster create``.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from adapters.storage.redis_client import RedisAddress
from tests.support.ports import free_port, free_port_pair, wait_connectable


class PortTaken(RuntimeError):
    """redis-server could not bind its port (or its cluster bus port)."""


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        *,
        cluster: bool = False,
        appendonly: bool = False,
        password: str | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
    ) -> None:
        """``args``: more redis-server options, given at every start."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A cluster node also listens on port + 10000 and must stay at or below 55535.
        self.port = port or (free_port_pair(10000) if cluster else free_port())
        #: Until its first start, a port we chose may be taken by another process between
        #: our look and redis's bind: start() then takes another (``_first_start``).
        self._chosen_port = port is None
        self.cluster = cluster
        self.appendonly = appendonly
        self.password = password
        self.args = tuple(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> RedisAddress:
        return RedisAddress("127.0.0.1", self.port)

    def start(self, *more: str) -> None:
        """Start the server; ``more``: redis-server options for this start only."""
        for _ in range(3):
            if not self._chosen_port:
                break
            try:
                self._start(*more)
            except PortTaken:
                self.port = free_port_pair(10000) if self.cluster else free_port()
                continue
            self._chosen_port = False  # restarts keep the port: clients and peers know it
            return
        self._start(*more)
        self._chosen_port = False

    def _start(self, *more: str) -> None:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.workdir / "redis.log"),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        args += [*self.args, *more]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
            ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        try:
            wait_connectable("127.0.0.1", self.port, timeout=30)
        except TimeoutError:
            log = self.workdir / "redis.log"
            self.stop()
            text = log.read_text()[-2000:] if log.exists() else "(no log)"
            if "Address already in use" in text:
                raise PortTaken(text) from None
            raise RuntimeError(f"redis-server on port {self.port} did not start:\n{text}") from None

    def stop(self, *, hard: bool = False) -> None:
        if self.process is None:
            return
        if hard:  # even a frozen one (SIGSTOP), which must not run another command first
            self.process.send_signal(signal.SIGKILL)
        else:  # a frozen process does not act on SIGTERM until it is woken
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)
        self.process = None

    def cli(self, *args: str) -> str:
        command = ["redis-cli", "-p", str(self.port)]
        if self.password is not None:
            command += ["--no-auth-warning", "-a", self.password]
        return subprocess.run([*command, *args], check=True, capture_output=True, text=True).stdout


class RedisCluster:
    def __init__(self, workdir: Path, masters: int = 3, *, replicas: int = 0) -> None:
        """``masters`` masters, each with ``replicas`` replicas (``redis-cli`` decides which
        node is which: see ``masters()``)."""
        self.replicas = replicas
        self.nodes = [
            RedisServer(workdir / f"node{i}", cluster=True) for i in range(masters * (1 + replicas))
        ]

    @property
    def seeds(self) -> list[RedisAddress]:
        return [node.address for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 20
        while not all("cluster_state:ok" in node.cli("CLUSTER", "INFO") for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        # A replica serves a failover only once it holds its master's data.
        while self.replicas and not all(
            "master_link_status:up" in node.cli("INFO", "replication")
            for node in self.replicas_now()
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis cluster's replicas did not sync")
            time.sleep(0.1)

    def masters(self) -> list[RedisServer]:
        """The running nodes that are masters now (a failover changes which)."""
        return [
            node
            for node in self.nodes
            if node.process is not None and node.cli("ROLE").startswith("master")
        ]

    def replicas_now(self) -> list[RedisServer]:
        """The running nodes that are replicas now."""
        masters = self.masters()
        return [node for node in self.nodes if node.process is not None and node not in masters]

    def flush(self) -> None:
        # Replicas refuse writes, and follow their masters.
        for node in self.masters() if self.replicas else self.nodes:
            node.cli("FLUSHALL")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_replica(master: RedisServer, workdir: Path) -> RedisServer:
    """A replica of a standalone ``master`` (``--replicaof``), started and in sync."""
    replica = RedisServer(workdir, args=("--replicaof", "127.0.0.1", str(master.port)))
    replica.start()
    deadline = time.monotonic() + 20
    while "master_link_status:up" not in replica.cli("INFO", "replication"):
        if time.monotonic() > deadline:
            replica.stop()
            raise RuntimeError(f"the replica of {master.address} did not sync")
        time.sleep(0.05)
    return replica


#: Microseconds redis-server sleeps per key it loads (its hidden test option key-load-delay).
_KEY_LOAD_DELAY_US = 1000


def restart_loading(server: RedisServer, seconds: float, *, prefix: str = "loading:") -> None:
    """Restart ``server`` on its port so that it spends about ``seconds`` loading its data,
    answering every command but a few (AUTH, INFO, ...) with ``-LOADING`` meanwhile, as a
    Redis restarted with a large dataset does.

    Filler keys (``{prefix}filler:N``; on a cluster node, give a prefix with a hash tag of
    its slots) are saved with the data, and the server started again
    with ``key-load-delay`` (a pause per key loaded) and the smallest
    ``loading-process-events-interval-bytes``, so that it serves connections while loading.
    Returns once the server is loading (it is, as soon as it accepts connections).
    """
    keys = max(1, round(seconds * 1_000_000 / _KEY_LOAD_DELAY_US))
    # Values of 200 bytes: the server serves its connections every 1 KiB loaded, so every
    # few keys, every few ms.
    server.cli(
        "EVAL",
        "for i = 1, tonumber(ARGV[2]) do"
        " redis.call('SET', ARGV[1] .. 'filler:' .. i, string.rep('x', 200)) end",
        "0",
        prefix,
        str(keys),
    )
    server.cli("SAVE")
    server.stop()
    server.start(
        "--key-load-delay",
        str(_KEY_LOAD_DELAY_US),
        "--loading-process-events-interval-bytes",
        "1024",
    )
    if "loading:1" not in server.cli("INFO", "persistence"):
        raise RuntimeError(f"{server.address} was not loading once restarted: too few keys?")


def loading(server: RedisServer) -> bool:
    """Whether ``server`` is still loading its dataset."""
    return "loading:1" in server.cli("INFO", "persistence")
