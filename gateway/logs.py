"""The daemon's log output: one line per event on stderr (journald under systemd).

With the default level, ``info``, that is a line per delivered job, so a line has to be
cheap.  Two settings from the logging documentation's "Optimization" advice skip what the
format never shows: the caller's file and line (a walk up the stack for every record) and
the thread and process names.  The timestamp's date and time part is formatted once per
second.  Together they take a job's line from 8.0 to 5.4 us here.

While the daemon runs (``flushing``), ``info`` lines are written in batches, at most
``FLUSH_INTERVAL`` after they were logged: one ``write()`` for many jobs' lines rather than
one each, which under systemd is also one wake-up of journald rather than one per job.  A
``warning`` or worse is written at once, after the lines logged before it, and whatever is
held is written on exit (``logging.shutdown``); only a ``kill -9`` can lose the last
``FLUSH_INTERVAL`` of ``info`` lines.

A line per job is still most of the cost of logging it: ``logger.log`` builds a ``LogRecord``
(twenty attributes, a clock read, two path splits) and goes through the logger's and the
handler's filters and locks to write three of its fields.  ``log_line`` writes the same text
without a record when the daemon's own handler is the only one the line reaches: a job's line
costs half the instructions it did (49k to 25k, callgrind).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import TextIO

import trio

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: The levels ``setup`` takes (``--log-level``, ``$BUSGATE_LOG_LEVEL``).
LEVELS = ("debug", "info", "warning", "error", "critical")
#: The longest an ``info`` line waits to be written while the daemon runs.
FLUSH_INTERVAL = 0.05
#: Held lines are written once there are this many, whatever the time.
MAX_HELD = 1000


class LineFormatter(logging.Formatter):
    """``logging.Formatter`` with its default timestamp, ``2026-11-23 20:53:43,816``, whose
    date and time part is computed once per second rather than once per line.

    A line without a traceback is formatted in one method: the stock ``format`` asks
    ``usesTime()`` of the style and formats through ``formatMessage`` and the style's
    ``format`` and ``_format``, five calls that cost as much as the line's own ``%``.
    """

    def __init__(self, fmt: str = FORMAT) -> None:
        super().__init__(fmt)
        self._second = -1
        self._date_time = ""
        self._line_format = self._style._fmt  # fmt, or the stock default when empty
        self._uses_time = self.usesTime()  # the format does not change
        #: Whether ``line`` writes what ``format`` would: the format is the daemon's own.
        self.plain = self._line_format == FORMAT

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        if self._uses_time:
            record.asctime = self.formatTime(record)
        try:
            return self._line_format % record.__dict__  # what the stock PercentStyle does
        except KeyError:  # a field the record lacks: the stock path words the error
            return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._date_time_of(int(record.created))},{int(record.msecs):03d}"

    def line(self, created: float, levelname: str, name: str, message: str) -> str:
        """What ``format`` writes for a record with these fields, when ``plain``."""
        second = int(created)
        msecs = int((created - second) * 1000)  # as LogRecord computes ``msecs``
        return f"{self._date_time_of(second)},{msecs:03d} {levelname} {name} {message}"

    def _date_time_of(self, second: int) -> str:
        if second != self._second:
            self._date_time = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self._date_time  # and then ",%03d" milliseconds, as default_msec_format does


#: What ``handleError`` is told failed when held lines could not be written.
_UNWRITTEN = logging.makeLogRecord({"msg": "held log lines could not be written"})


class LineHandler(logging.StreamHandler[TextIO]):
    """A ``StreamHandler`` that can hold ``info`` lines and write them together.

    It holds nothing unless ``holding`` is set (``flushing`` sets it), so a command that logs
    and exits, or a daemon that crashes before it runs, writes every line at once.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.holding = False
        self._held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._held.append(self.format(record))
            if not self.holding or record.levelno >= logging.WARNING or len(self._held) >= MAX_HELD:
                self._write()
        except Exception:
            self.handleError(record)

    def emit_line(self, levelno: int, line: str) -> None:
        """``emit`` of a line formatted already (``log_line``), under the lock that
        ``Handler.handle`` takes for ``emit``.  Raises what writing it raised."""
        self.acquire()
        try:
            self._held.append(line)
            if not self.holding or levelno >= logging.WARNING or len(self._held) >= MAX_HELD:
                self._write()
        finally:
            self.release()

    def flush(self) -> None:
        self.acquire()  # emit() runs under the same lock (Handler.handle)
        try:
            if self._held:
                self._write()
            super().flush()
        except Exception:
            # As emit does: a log that cannot be written (a full disk, a reader gone) loses
            # those lines, reported as logging reports such errors, and the daemon goes on.
            self.handleError(_UNWRITTEN)
        finally:
            self.release()

    def _write(self) -> None:
        self._held.append("")  # the last line's newline
        text = "\n".join(self._held)
        self._held.clear()
        self.stream.write(text)
        self.stream.flush()


#: What ``quoted`` escapes: the quote and the backslash, and every character that could end
#: a line or hide text for a reader (C0 and C1 controls, DEL, the Unicode line separators).
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    **{code: f"\\u{code:04x}" for code in (0x2028, 0x2029)},
    ord("\t"): "\\t",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord('"'): '\\"',
    ord("\\"): "\\\\",
}


def quoted(text: object) -> str:
    """``text`` as a logfmt value: in double quotes, with quotes, backslashes and control
    characters escaped.  For whatever a line carries from outside (a backend's message, an
    error): unquoted, ``Location: https://x/ outcome=done`` would read as a second field,
    and a newline as a second line."""
    return '"' + str(text).translate(_ESCAPES) + '"'


def log_line(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)``, for a line per job: the same text, written without
    a ``LogRecord`` when the line would reach only the daemon's ``LineHandler`` (``setup``).

    Anything else (another handler, a filter, a record factory, a test capturing records)
    gets the record, through ``logger.log``.
    """
    handler = _sole_line_handler(logger, level)
    # A lone mapping: LogRecord formats the message with it, not with args.
    if handler is None or (len(args) == 1 and isinstance(args[0], Mapping) and args[0]):
        logger.log(level, msg, *args)
        return
    created = time.time()
    try:
        message = msg % args if args else str(msg)  # as LogRecord.getMessage
    except Exception:
        logger.log(level, msg, *args)  # the stock path reports the error
        return
    formatter = handler.formatter
    assert isinstance(formatter, LineFormatter)  # checked by _sole_line_handler
    line = formatter.line(created, logging.getLevelName(level), logger.name, message)
    try:
        handler.emit_line(level, line)
    except Exception:
        # As Handler.emit reports a failed write: with the record it could not write.
        handler.handleError(
            logger.makeRecord(logger.name, level, "(unknown file)", 0, msg, args, None)
        )


def _sole_line_handler(logger: logging.Logger, level: int) -> LineHandler | None:
    """The handler a ``level`` line of ``logger`` reaches, if it is the only one, a
    ``LineHandler`` with the daemon's format, and nothing could filter or change the record
    on the way (what ``Logger.handle`` and ``callHandlers`` look at); else None."""
    if (
        not logger.isEnabledFor(level)
        or logger.disabled
        or logger.filters
        or type(logger) is not logging.Logger
        or logging.getLogRecordFactory() is not logging.LogRecord
    ):
        return None
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if type(found) is not LineHandler or found.filters or level < found.level:
        return None
    formatter = found.formatter
    if type(formatter) is not LineFormatter or not formatter.plain:
        return None
    return found


def setup(level: str, stream: TextIO | None = None) -> None:
    """Log at ``level`` (one of ``LEVELS``) to ``stream``, by default stderr."""
    logging._srcfile = None  # no caller lookup: the format shows no file or line
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


async def flushing(interval: float = FLUSH_INTERVAL) -> None:
    """Hold ``info`` lines and write them every ``interval`` until cancelled, then write the
    rest.  A no-op for handlers other than ``LineHandler`` (tests capturing records)."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, LineHandler)]
    for handler in handlers:
        handler.holding = True
    try:
        while True:
            await trio.sleep(interval)
            for handler in handlers:
                handler.flush()
    finally:
        for handler in handlers:
            handler.holding = False
            handler.flush()


class Repeating:
    """One failure that may repeat every second for as long as it lasts (the store down: each
    topic's reserve and scheduler fail once a second, fifty topics make a hundred lines a
    second).  Logged the first time, then at most once per ``interval`` with how many were
    not, and its end once (``recovered``), each line at its own level."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._log = logger
        self._interval = interval
        self._logged_at = -float("inf")
        self._unlogged = 0
        self.failing = False

    def failed(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        """Log this failure, unless one was logged within ``interval`` (then counted)."""
        self.failing = True
        now = time.monotonic()
        if now - self._logged_at < self._interval:
            self._unlogged += 1
            return
        if self._unlogged:
            msg += f" (and {self._unlogged} more like it in the last {self._interval:g}s)"
            self._unlogged = 0
        self._logged_at = now
        self._log.log(level, msg, *args, exc_info=exc_info)

    def recovered(self, msg: str, *args: object) -> None:
        """Log ``msg`` (at ``info``) if this was failing; a new failure is logged at once."""
        if not self.failing:
            return
        self.failing = False
        if self._unlogged:
            msg += f" ({self._unlogged} more failures since the last logged)"
        self._unlogged = 0
        self._logged_at = -float("inf")
        self._log.info(msg, *args)
