"""The daemon's log lines (gateway.logs): the stock format, made cheaper."""

from __future__ import annotations

import contextlib
import io
import logging
import random
import sys
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from adapters.delivery.base import Delivery
from adapters.storage.jobs import Attempt, Job, Outcome, Priority
from gateway import dispatcher
from gateway.logs import FORMAT, MAX_HELD, LineFormatter, LineHandler, flushing, log_line
from gateway.policy import Backoff, Decision, decide


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


# -- log_line: a job's line without a LogRecord ----------------------------------------------


@pytest.fixture
def own_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[logging.Logger, Writes]]:
    """A logger whose lines reach one LineHandler only, as ``setup`` leaves the daemon's, at a
    fixed time.  It does not propagate (the root logger has pytest's handlers), and the
    pytest handlers added to it for the test are set aside (``alone``)."""
    monkeypatch.setattr(time, "time", lambda: 1763931223.8167)
    logger = logging.getLogger("busgate.test_log_line")
    stream = Writes()
    line_handler = LineHandler(stream)
    line_handler.setFormatter(LineFormatter())
    logger.addHandler(line_handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(line_handler)
        logger.filters.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


@contextlib.contextmanager
def alone(logger: logging.Logger) -> Iterator[None]:
    """Only the fixture's handler on ``logger`` for the block."""
    saved = logger.handlers[:]
    logger.handlers[:] = [h for h in saved if isinstance(h, LineHandler)]
    try:
        yield
    finally:
        logger.handlers[:] = saved


LINES = [
    (logging.INFO, "job=%s attempt=%d duration_ms=%.1f%s", ("a", 2, 12.345, "")),
    (logging.WARNING, "job=%s outcome=%s reason=%r", ("b", "retry", "status 500: 'x'")),
    (logging.INFO, "100%% done, %s", ("c",)),
    (logging.INFO, "100% done, no arguments", ()),
    (logging.INFO, "job=%(id)s", ({"id": "d"},)),  # a lone mapping, as LogRecord keeps it
    (logging.DEBUG, "below the level %s", ("e",)),
]


def test_log_line_writes_what_logger_log_writes(
    own_logger: tuple[logging.Logger, Writes],
) -> None:
    logger, stream = own_logger
    with alone(logger):
        for level, msg, args in LINES:
            logger.log(level, msg, *args)
        stock = stream.getvalue()
        stream.seek(0)
        stream.truncate()
        for level, msg, args in LINES:
            log_line(logger, level, msg, *args)
    assert stream.getvalue() == stock
    assert stock.startswith(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(1763931223))}")
    assert stock.splitlines()[0].endswith(
        ",816 INFO busgate.test_log_line job=a attempt=2 duration_ms=12.3"
    )


def test_a_jobs_line_builds_no_log_record(
    own_logger: tuple[logging.Logger, Writes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A LogRecord costs more than the rest of the line: log_line writes the same text without
    # one when the daemon's handler is the only one that would see it.
    logger, stream = own_logger
    built: list[logging.LogRecord] = []
    stock_init = logging.LogRecord.__init__

    def counted(record: logging.LogRecord, *args: Any, **kwargs: Any) -> None:
        built.append(record)
        stock_init(record, *args, **kwargs)

    monkeypatch.setattr(logging.LogRecord, "__init__", counted)
    monkeypatch.setattr(dispatcher, "log", logger)
    job = Job("j1", "q", "t", b"{}", {}, Priority.NORMAL, 1, 0.0, 0.0, "ab" * 16)
    attempt = Attempt(1, 0.0, 0.0123, Outcome.DONE, 200)
    delivery = Delivery(0.0123, 200)
    with alone(logger):
        dispatcher._log_attempt(job, attempt, decide_done(delivery), delivery, recorded=True)
    assert built == []
    assert stream.getvalue().endswith(
        " INFO busgate.test_log_line job=j1 queue=q topic=t attempt=1 outcome=done status=200"
        f" duration_ms=12.3 trace={'ab' * 16}\n"
    )


def decide_done(delivery: Delivery) -> Decision:
    return decide(
        delivery,
        attempt=1,
        max_attempts=3,
        backoff=Backoff(1.0, 10.0),
        dead_on=frozenset(),
        now=0.0,
        rng=random.Random(0),
    )


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_line_anything_else_would_see_goes_through_logging(
    own_logger: tuple[logging.Logger, Writes], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, stream = own_logger
    with alone(logger):
        # Another handler, before or after the line handler: it gets the record, and the
        # line handler the same line as ever.
        for where in (0, 1):
            capture = Capture()
            logger.handlers.insert(where, capture)
            log_line(logger, logging.INFO, "job=%s", f"a{where}")
            logger.removeHandler(capture)
            assert [r.getMessage() for r in capture.records] == [f"job=a{where}"]
            assert stream.getvalue().endswith(f" INFO busgate.test_log_line job=a{where}\n")
        # A filter on the logger decides, as logger.log lets it.
        logger.addFilter(lambda record: record.args != ("dropped",))
        log_line(logger, logging.INFO, "job=%s", "dropped")
        assert "dropped" not in stream.getvalue()
        logger.filters.clear()
    # A record factory sees every record.
    made: list[str] = []
    stock_factory = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = stock_factory(*args, **kwargs)
        made.append(record.getMessage())
        return record

    monkeypatch.setattr(logging, "_logRecordFactory", factory)
    with alone(logger):
        log_line(logger, logging.INFO, "job=%s", "made")
    assert made == ["job=made"]
    assert stream.getvalue().endswith(" INFO busgate.test_log_line job=made\n")


def test_a_line_that_fails_to_format_is_reported_as_logging_reports_it(
    own_logger: tuple[logging.Logger, Writes], capsys: pytest.CaptureFixture[str]
) -> None:
    logger, stream = own_logger
    with alone(logger):
        log_line(logger, logging.INFO, "attempt=%d", "not a number")
    assert stream.getvalue() == ""
    assert "--- Logging error ---" in capsys.readouterr().err


def test_a_repeating_failure_is_logged_once_then_with_a_count_and_its_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gateway.logs import Repeating

    caplog.set_level("INFO", logger="busgate.test")
    repeating = Repeating(logging.getLogger("busgate.test"), interval=0.2)
    repeating.recovered("never failed: not logged")
    for _ in range(5):
        repeating.failed(logging.ERROR, "down %s", "x")
    time.sleep(0.25)
    repeating.failed(logging.ERROR, "down %s", "y")
    repeating.failed(logging.ERROR, "down %s", "z")
    repeating.recovered("up again")
    repeating.recovered("up again")  # once
    repeating.failed(logging.WARNING, "down %s", "w")  # a new failure: at once
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "down x"),
        ("ERROR", "down y (and 4 more like it in the last 0.2s)"),
        ("INFO", "up again (1 more failures since the last logged)"),
        ("WARNING", "down w"),
    ]


async def test_a_log_that_cannot_be_written_loses_lines_not_the_daemon(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The log on a full disk (or a pipe whose reader has gone): held lines written every
    # 50 ms raised out of flushing(), which ended the daemon.  emit() reported such errors
    # and went on; now so does the flush.
    full = open("/dev/full", "w")  # noqa: SIM115 (closing it fails too: see the end)
    line_handler = LineHandler(full)
    line_handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(line_handler)
    try:
        with trio.move_on_after(0.3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flushing, 0.05)
                await trio.testing.wait_all_tasks_blocked()
                for n in range(3):
                    emit(line_handler, logging.INFO, f"line {n}")
                    await trio.sleep(0.06)
        emit(line_handler, logging.INFO, "after")  # holding no more: written at once
    finally:
        root.removeHandler(line_handler)
        with contextlib.suppress(OSError):
            full.close()  # flushes what the buffer holds: no space for it either
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err and "No space left on device" in err
