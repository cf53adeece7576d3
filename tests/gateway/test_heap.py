"""The daemon's collector settings (gateway.heap)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from gateway import heap


class Node:
    def __init__(self) -> None:
        self.self = self  # a reference cycle: only the collector frees it


@pytest.fixture(autouse=True)
def restore_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_what_is_alive_and_raises_the_young_threshold() -> None:
    heap.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD


def test_settle_collects_garbage_before_freezing_it() -> None:
    garbage = Node()
    ref = weakref.ref(garbage)
    del garbage
    heap.settle()
    assert ref() is None


def test_settle_after_a_reload_frees_what_the_old_configuration_held() -> None:
    held = Node()
    ref = weakref.ref(held)
    heap.settle()  # alive: frozen
    del held  # dropped by a reload: garbage, but in the permanent generation
    gc.collect()
    assert ref() is not None  # ordinary collections never look at frozen objects
    heap.settle()
    assert ref() is None
