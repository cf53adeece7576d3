"""Fan-out filters: which topics of a queue receive a pushed job.

A topic's filter is a set of conditions on top-level fields of the JSON payload, all of which
must hold: equality with one value, membership in a list of values (any-of), or presence /
absence of the field.  A topic without a filter receives every job.  A payload that is not a
JSON object matches only topics without a filter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

JSONScalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class FieldCondition:
    """``field`` equals one of ``any_of``; or, when ``present`` is set, exists (or not)."""

    field: str
    any_of: tuple[JSONScalar, ...] = ()
    present: bool | None = None

    def __post_init__(self) -> None:
        if (self.present is not None) == bool(self.any_of):
            raise ValueError(f"condition on {self.field!r} needs values or present, not both")

    def holds(self, document: Mapping[str, Any]) -> bool:
        if self.present is not None:
            return (self.field in document) is self.present
        if self.field not in document:
            return False
        value = document[self.field]
        return any(_json_equal(value, wanted) for wanted in self.any_of)


def _json_equal(a: object, b: object) -> bool:
    # bool is an int in Python; JSON keeps them apart, and so do we (true != 1).
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


@dataclass(frozen=True, slots=True)
class Filter:
    conditions: tuple[FieldCondition, ...] = ()

    @property
    def accepts_all(self) -> bool:
        return not self.conditions

    def matches(self, document: Mapping[str, Any] | None) -> bool:
        if not self.conditions:
            return True
        if document is None:
            return False
        return all(condition.holds(document) for condition in self.conditions)


def parse_document(payload: bytes) -> Mapping[str, Any] | None:
    """The payload as a JSON object, or None when it is not one (never an error)."""
    if not payload or payload[:1] not in (b"{", b" ", b"\n", b"\t", b"\r"):
        return None
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) else None


def route(payload: bytes, topics: Sequence[tuple[str, Filter]]) -> list[str]:
    """Names of the topics whose filter matches ``payload``, in configuration order."""
    if all(f.accepts_all for _, f in topics):
        return [name for name, _ in topics]
    document = parse_document(payload)
    return [name for name, f in topics if f.matches(document)]
