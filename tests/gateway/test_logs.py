"""The daemon's log lines (gateway.logs): the stock format, made cheaper."""

from __future__ import annotations

import io
import logging
import sys
import weakref

import pytest
import trio
import trio.testing

from gateway.logs import FORMAT, MAX_HELD, LineFormatter, LineHandler, flushing


def record(created: float) -> logging.LogRecord:
    entry = logging.LogRecord("busgate.dispatch", logging.INFO, "", 0, "job=%s", ("a",), None)
    entry.created = created
    entry.msecs = (created - int(created)) * 1000
    return entry


def test_lines_read_exactly_as_the_stock_formatter_writes_them() -> None:
    stock = logging.Formatter(FORMAT)
    ours = LineFormatter()
    # Within one second, across a second and across a day: the cached part follows.
    for created in (1763931223.0, 1763931223.8167, 1763931224.001, 1764017623.999, 5.5):
        assert ours.format(record(created)) == stock.format(record(created))


def test_every_kind_of_line_reads_as_the_stock_formatter_writes_it() -> None:
    # LineFormatter formats a plain line itself: tracebacks, stacks, mapping arguments and
    # other formats must still come out as logging.Formatter writes them.
    def entry(**extra: object) -> logging.LogRecord:
        line = record(1763931223.25)
        line.__dict__.update(extra)
        return line

    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    cases = [
        entry(),
        entry(exc_info=exc_info),
        entry(stack_info="Stack (most recent call last):\n  here"),
        entry(msg="job=%(id)s", args={"id": "a"}),  # as LogRecord keeps a lone mapping
    ]
    for fmt in (FORMAT, "%(levelname)s:%(message)s", ""):
        stock, ours = logging.Formatter(fmt or None), LineFormatter(fmt)
        for line in cases:
            assert ours.format(line) == stock.format(line), fmt
    missing = "%(message)s %(job)s"
    with pytest.raises(ValueError, match="job") as stock_error:
        logging.Formatter(missing).format(entry())
    with pytest.raises(ValueError) as our_error:
        LineFormatter(missing).format(entry())
    assert str(our_error.value) == str(stock_error.value)


def test_an_explicit_date_format_is_honoured() -> None:
    entry = record(1763931223.25)
    assert LineFormatter().formatTime(entry, "%Y") == logging.Formatter().formatTime(entry, "%Y")


class Writes(io.StringIO):
    """A stream that remembers each write, as each is a write() to journald's socket."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def handler() -> tuple[LineHandler, Writes]:
    stream = Writes()
    line_handler = LineHandler(stream)
    line_handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return line_handler, stream


def emit(line_handler: LineHandler, level: int, text: str) -> None:
    line_handler.handle(logging.LogRecord("busgate", level, "", 0, text, (), None))


def test_without_holding_every_line_is_written_at_once() -> None:
    line_handler, stream = handler()
    emit(line_handler, logging.INFO, "one")
    emit(line_handler, logging.INFO, "two")
    assert stream.writes == ["INFO one\n", "INFO two\n"]


def test_held_info_lines_go_out_together_and_before_a_warning() -> None:
    line_handler, stream = handler()
    line_handler.holding = True
    emit(line_handler, logging.INFO, "one")
    emit(line_handler, logging.INFO, "two")
    assert stream.writes == []
    line_handler.flush()
    assert stream.writes == ["INFO one\nINFO two\n"]
    emit(line_handler, logging.INFO, "three")
    emit(line_handler, logging.WARNING, "four")  # at once, after what came before it
    assert stream.writes[1:] == ["INFO three\nWARNING four\n"]
    assert stream.getvalue() == "INFO one\nINFO two\nINFO three\nWARNING four\n"


def test_a_full_hold_is_written_without_waiting() -> None:
    line_handler, stream = handler()
    line_handler.holding = True
    for n in range(MAX_HELD):
        emit(line_handler, logging.INFO, str(n))
    assert len(stream.writes) == 1 and stream.getvalue().count("\n") == MAX_HELD


async def test_flushing_writes_within_its_interval_and_everything_when_stopped() -> None:
    line_handler, stream = handler()
    root = logging.getLogger()
    root.addHandler(line_handler)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flushing, 0.05)
            await trio.testing.wait_all_tasks_blocked()
            assert line_handler.holding
            emit(line_handler, logging.INFO, "one")
            emit(line_handler, logging.INFO, "two")
            assert stream.writes == []
            with trio.fail_after(1):
                while not stream.writes:
                    await trio.sleep(0.01)
            assert stream.writes == ["INFO one\nINFO two\n"]
            emit(line_handler, logging.INFO, "last")
            nursery.cancel_scope.cancel()
        assert stream.writes[-1] == "INFO last\n" and not line_handler.holding
    finally:
        root.removeHandler(line_handler)


def test_logging_shutdown_writes_what_is_held() -> None:
    line_handler, stream = handler()
    line_handler.holding = True
    emit(line_handler, logging.INFO, "held")
    logging.shutdown([weakref.ref(line_handler)])  # what atexit runs, for this handler
    assert stream.getvalue() == "INFO held\n"
