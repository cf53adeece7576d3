"""Read readiness for many sockets through one edge-triggered epoll.

trio waits on a socket by arming it in its epoll with ``EPOLLONESHOT``, so every wait costs
an ``epoll_ctl`` system call.  A server whose clients each wait for a reply before sending
again (``redis-benchmark -P 1``) waits once per command, and on this project's VMs a system
call is several microseconds.  ``Readiness`` registers each socket once, edge-triggered, in an
epoll of its own, and only that epoll's descriptor goes through trio: one ``epoll_ctl`` per
wake-up, however many sockets it found ready.

Edge-triggered means an event is reported once per arrival.  It is remembered for a socket
nobody waits on, so the next wait returns at once; and ``wait_readable`` is only correct
after a read that drained the socket (one shorter than asked for) or that found nothing.
``receive`` does that.  The peer's end of the stream can come in the same event as its last
data, and a read returns the data only: a socket whose peer has hung up stays readable
from then on, so the read after finds the end.
"""

from __future__ import annotations

import select
import socket

import outcome
import trio

_FLAGS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class Readiness:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._waiters: dict[int, trio.lowlevel.Task] = {}
        self._ready: set[int] = set()
        self._hung_up: set[int] = set()  # no more events will come: always readable
        self._registered = 0

    async def run(self) -> None:
        """Wake the tasks whose sockets became readable, until cancelled."""
        epoll = self._epoll
        waiters = self._waiters
        ready = self._ready
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, flags in epoll.poll(0, max(1, self._registered)):
                    if flags & _HANGUP:
                        self._hung_up.add(fd)
                    task = waiters.pop(fd, None)
                    if task is None:
                        ready.add(fd)
                    else:
                        trio.lowlevel.reschedule(task)
        finally:
            epoll.close()

    def register(self, sock: socket.socket) -> None:
        self._epoll.register(sock.fileno(), _FLAGS)
        self._registered += 1

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        self._ready.discard(fd)
        self._hung_up.discard(fd)
        task = self._waiters.pop(fd, None)
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError("socket closed")))
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        else:
            self._registered -= 1

    async def wait_readable(self, fd: int) -> None:
        """A checkpoint that returns once ``fd`` had data (or EOF) since its last drain."""
        if fd in self._ready or fd in self._hung_up:
            self._ready.discard(fd)
            await trio.lowlevel.checkpoint()
            return
        self._waiters[fd] = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiters.pop(fd, None)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
