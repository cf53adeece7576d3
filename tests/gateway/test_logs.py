"""The daemon's log lines (gateway.logs): the stock format, made cheaper."""

from __future__ import annotations

import logging

from gateway.logs import FORMAT, LineFormatter


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


def test_an_explicit_date_format_is_honoured() -> None:
    entry = record(1763931223.25)
    assert LineFormatter().formatTime(entry, "%Y") == logging.Formatter().formatTime(entry, "%Y")
