"""The pool against backends that lie, hang or crash: a scripted trio server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from fastcgi.address import Address
from fastcgi.errors import (
    ConnectionLost,
    ReadTimeout,
    RemoteProtocolError,
    RequestRejected,
    WriteTimeout,
)
from fastcgi.pool import ConnectionPool, PoolLimits, Timeouts
from fastcgi.records import RecordReader, encode_record, end_request_body
from fastcgi.spec import ProtocolStatus, RecordType

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def read_request(stream: trio.SocketStream) -> None:
    """Consume one request, up to its empty STDIN record."""
    reader = RecordReader()
    while True:
        while (record := reader.next_record()) is not None:
            if record.type == RecordType.STDIN and not record.content:
                return
        data = await stream.receive_some(65536)
        if not data:
            return
        reader.feed(data)


def ok_response(body: bytes = b"ok") -> bytes:
    return (
        encode_record(RecordType.STDOUT, 1, b"Status: 200\r\n\r\n" + body)
        + encode_record(RecordType.STDOUT, 1)
        + encode_record(RecordType.END_REQUEST, 1, end_request_body(0, 0))
    )


async def serve(nursery: trio.Nursery, handler: Handler) -> Address:
    async def tolerant(stream: trio.SocketStream) -> None:
        # The pool hangs up on a lying backend; that must not crash the test server.
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(partial(trio.serve_tcp, tolerant, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return Address(host="127.0.0.1", port=port)


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [
        (b"\x02" + ok_response()[1:], RemoteProtocolError, "version 2"),
        (encode_record(RecordType.END_REQUEST, 1, b"xyz"), RemoteProtocolError, "content length"),
        (ok_response()[:20], ConnectionLost, "response ended: connection closed inside a rec"),
        (b"", ConnectionLost, "response ended: connection closed before END_REQUEST"),
        (b"HTTP/1.1 200 OK\r\n\r\n", RemoteProtocolError, "version 72"),
        (
            encode_record(RecordType.STDOUT, 1, b"no headers at all")
            + encode_record(RecordType.END_REQUEST, 1, end_request_body(0, 0)),
            RemoteProtocolError,
            "no end of headers",
        ),
        (
            encode_record(
                RecordType.END_REQUEST, 1, end_request_body(0, ProtocolStatus.OVERLOADED)
            ),
            RequestRejected,
            "OVERLOADED",
        ),
    ],
)
async def test_broken_backends_give_typed_errors_and_lose_the_connection(
    reply: bytes, error: type[Exception], message: str
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(reply)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        async with ConnectionPool(address) as pool:
            with pytest.raises(error, match=message) as caught:
                await pool.request({}, b"job")
            assert str(address) in str(caught.value)
            stats = pool.statistics()
            assert (stats.open, stats.in_use, stats.failures_total) == (0, 0, 1)
        nursery.cancel_scope.cancel()


async def test_overloaded_is_flagged() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        body = end_request_body(0, ProtocolStatus.OVERLOADED)
        await stream.send_all(encode_record(RecordType.END_REQUEST, 1, body))

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        async with ConnectionPool(address) as pool:
            with pytest.raises(RequestRejected) as caught:
                await pool.request({})
            assert caught.value.overloaded
        nursery.cancel_scope.cancel()


async def test_idle_connection_closed_by_the_server_is_not_reused() -> None:
    served = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal served
        await read_request(stream)
        served += 1
        await stream.send_all(ok_response())
        await stream.aclose()  # ignores FCGI_KEEP_CONN, as a recycled worker would

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        async with ConnectionPool(address) as pool:
            for _ in range(5):
                assert (await pool.request({})).body == b"ok"
                await trio.sleep(0.01)  # let the FIN arrive before the next reuse check
            stats = pool.statistics()
            assert stats.failures_total == 0 and stats.opened_total == 5
        nursery.cancel_scope.cancel()
    assert served == 5


async def test_a_reused_connection_lost_while_the_backend_works_is_not_sent_again() -> None:
    # A worker killed while it ran the request (php-fpm's request_terminate_timeout): the
    # request went out again at once on a new connection, so the job ran twice as one try.
    served = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal served
        await read_request(stream)
        served += 1
        await stream.send_all(ok_response())
        await read_request(stream)
        served += 1
        await trio.sleep(0.5)  # works on it, then the worker is gone

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        async with ConnectionPool(address) as pool:
            assert (await pool.request({})).body == b"ok"
            with pytest.raises(ConnectionLost):
                await pool.request({})
        nursery.cancel_scope.cancel()
    assert served == 2


async def test_bytes_after_end_request_discard_the_connection() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        while True:
            await read_request(stream)
            await stream.send_all(ok_response() + b"junk")

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        async with ConnectionPool(address) as pool:
            await pool.request({})
            await pool.request({})
            assert pool.statistics().opened_total == 2
        nursery.cancel_scope.cancel()


async def test_backend_that_never_reads_gives_a_write_timeout() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        timeouts = Timeouts(write=0.2)
        async with ConnectionPool(address, timeouts=timeouts) as pool:
            with pytest.raises(WriteTimeout):
                await pool.request({}, b"x" * 50_000_000)
            assert pool.statistics().open == 0
        nursery.cancel_scope.cancel()


async def test_reset_mid_response_is_connection_lost_or_protocol_error() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(ok_response()[:12])
        # SO_LINGER 0 turns close() into a TCP RST.
        stream.socket.setsockopt(
            trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
        )
        stream.socket.close()

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        async with ConnectionPool(address) as pool:
            with pytest.raises((ConnectionLost, RemoteProtocolError)):
                await pool.request({})
            assert pool.statistics().open == 0
        nursery.cancel_scope.cancel()


async def test_a_close_mid_response_is_connection_lost_not_a_protocol_error() -> None:
    """A worker that dies mid-answer closes cleanly (EOF): the failure says so."""

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(ok_response()[:20])
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        async with ConnectionPool(address) as pool:
            with pytest.raises(ConnectionLost, match="closed the connection before the response"):
                await pool.request({})
            assert pool.statistics().open == 0
        nursery.cancel_scope.cancel()


async def test_pool_timeout_when_every_connection_is_busy() -> None:
    from fastcgi.errors import PoolTimeout

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await trio.sleep(1)
        await stream.send_all(ok_response())

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        limits = PoolLimits(max_connections=1)
        async with ConnectionPool(address, limits=limits, timeouts=Timeouts(pool=0.1)) as pool:
            nursery.start_soon(pool.request, {})
            await trio.sleep(0.05)
            with pytest.raises(PoolTimeout, match="1 in use"):
                await pool.request({})
        nursery.cancel_scope.cancel()


async def test_the_read_limit_runs_from_the_end_of_the_write() -> None:
    # A backend with no worker free leaves a large body in the socket buffers for a while,
    # then answers at once: the wait belongs to the write limit, not to the read limit.
    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep(0.6)
        await read_request(stream)
        await stream.send_all(ok_response())

    async with trio.open_nursery() as nursery:
        address = await serve(nursery, handler)
        async with ConnectionPool(address, timeouts=Timeouts(write=10, read=0.3)) as pool:
            response = await pool.request({}, b"x" * 20_000_000)
            assert response.status == 200
        nursery.cancel_scope.cancel()


def flooding_backend() -> tuple[Address, threading.Event]:
    """A backend in a thread that answers a request with empty STDOUT records, endlessly
    and faster than they can be read (empty records count against no size limit)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    flood = encode_record(RecordType.STDOUT, 1) * (1 << 17)  # 1 MiB

    def run() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(0.2)
            conn.recv(1 << 20)
            while not stop.is_set():
                try:
                    conn.sendall(flood)
                except TimeoutError:
                    continue
                except OSError:
                    return

    threading.Thread(target=run, daemon=True).start()
    return Address(host="127.0.0.1", port=listener.getsockname()[1]), stop


async def test_a_flooding_backend_neither_stalls_the_loop_nor_outlives_its_deadline() -> None:
    address, stop = flooding_backend()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await trio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    started = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            async with ConnectionPool(address, timeouts=Timeouts(read=0.5)) as pool:
                with pytest.raises(ReadTimeout):
                    await pool.request({})
            nursery.cancel_scope.cancel()
    finally:
        stop.set()
    assert time.monotonic() - started < 2
    assert max(gaps) < 0.3, f"the event loop stalled for {max(gaps):.2f}s"
