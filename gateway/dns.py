"""Host name lookups that one name whose DNS hangs cannot hold up for the others.

trio resolves a name in a worker thread under its default thread limiter (40 threads), which
every ``trio.to_thread`` call shares.  A lookup given up at its deadline leaves its thread
running, holding its token, until the resolver answers: a backend whose name does not
resolve (a partner's DNS down) and whose topic retries every few seconds fills all 40.  Then
every other backend, Redis node or php-fpm pool named by host name waits for a thread, and
so does every ``to_thread`` call (the SQLite store's shutdown joins its thread that way).

Installed by the daemon (``App.run``): each name gets a limiter of its own, ``PER_NAME``
threads, outside trio's default one; a stuck name holds up only its own lookups.  Numeric
addresses never get here (trio resolves them without a thread).
"""

from __future__ import annotations

import socket
from typing import Any

import trio

#: Lookups of one name running at once (threads, possibly abandoned and still waiting).
PER_NAME = 4


class Resolver(trio.abc.HostnameResolver):
    def __init__(self) -> None:
        # One per name ever looked up: the names in the configuration, a handful.
        self._limiters: dict[bytes | str | None, trio.CapacityLimiter] = {}

    def _limiter(self, name: bytes | str | None) -> trio.CapacityLimiter:
        limiter = self._limiters.get(name)
        if limiter is None:
            limiter = self._limiters[name] = trio.CapacityLimiter(PER_NAME)
        return limiter

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        return await trio.to_thread.run_sync(
            socket.getaddrinfo,
            host,
            port,
            family,
            type,
            proto,
            flags,
            abandon_on_cancel=True,
            limiter=self._limiter(host),
        )

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        return await trio.to_thread.run_sync(
            socket.getnameinfo,
            sockaddr,
            flags,
            abandon_on_cancel=True,
            limiter=self._limiter(sockaddr[0]),
        )
