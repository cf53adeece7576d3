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

A socket may also be registered with a handler, which the readiness task calls in place of
waking the task waiting on that socket: when it can deal with what arrived itself (a
producer's push, ``gateway.resp_server``), the task waiting stays parked, and a hundred
sockets found ready in one wake-up cost one task step instead of a hundred.  It is called
only while a task waits on the socket, so it never runs alongside that task; and not for
the event that reports the peer's end, which wakes the task (no later event would).
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

import outcome
import trio

_FLAGS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR

#: Called when a socket a task waits on becomes readable, instead of waking the task: True
#: if it dealt with what arrived (the task goes on waiting), False to wake the task.  It runs
#: in the readiness task, so it must not raise (nor block).
Handler = Callable[[], bool]


class Readiness:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._waiters: dict[int, trio.lowlevel.Task] = {}
        self._handlers: dict[int, Handler] = {}
        self._ready: set[int] = set()
        self._hung_up: set[int] = set()  # no more events will come: always readable
        self._registered = 0

    async def run(self) -> None:
        """Wake the tasks whose sockets became readable, until cancelled."""
        epoll = self._epoll
        waiters = self._waiters
        handlers = self._handlers
        ready = self._ready
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, flags in epoll.poll(0, max(1, self._registered)):
                    hung_up = flags & _HANGUP
                    if hung_up:
                        self._hung_up.add(fd)
                    task = waiters.pop(fd, None)
                    if task is None:
                        ready.add(fd)
                    elif not hung_up and (handler := handlers.get(fd)) is not None and handler():
                        waiters[fd] = task  # dealt with: the task goes on waiting
                    else:
                        trio.lowlevel.reschedule(task)
        finally:
            epoll.close()

    def register(self, sock: socket.socket, handler: Handler | None = None) -> None:
        fd = sock.fileno()
        self._epoll.register(fd, _FLAGS)
        self._registered += 1
        if handler is not None:
            self._handlers[fd] = handler

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        self._handlers.pop(fd, None)
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
