"""`saga.heap.freeze_startup_heap`: start-up objects leave the collector's generations, later ones do not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from saga.heap import freeze_startup_heap


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test run collects as usual


def tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_objects_alive_at_the_call_are_frozen_and_later_ones_are_not() -> None:
    before: list[object] = [object()]
    assert tracked(before)
    frozen = freeze_startup_heap()
    after: list[object] = [object()]
    assert frozen == gc.get_freeze_count() > 0
    assert not tracked(before)  # in the permanent generation: full collections skip it
    assert tracked(after)


class Node:
    def __init__(self) -> None:
        self.peer: object = self


def test_garbage_is_collected_before_freezing() -> None:
    """Cyclic garbage present at the call is freed, not frozen for the life of the process."""
    gc.disable()  # no automatic collection in between
    try:
        node = Node()
        ref = weakref.ref(node)
        del node
        assert ref() is not None  # only the cycle keeps it
        freeze_startup_heap()
        assert ref() is None
    finally:
        gc.enable()
