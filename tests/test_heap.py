"""The serving process's garbage-collector policy: frozen start-up heap, pause records."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from greenroom.heap import GCPauses, freeze_startup_heap, gc_pauses, thaw_heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def _unfrozen():
    gc.unfreeze()
    yield
    while gc.get_freeze_count():
        gc.unfreeze()
    import greenroom.heap as heap

    heap._freezes = 0


def test_frozen_cycle_survives_collection_until_thawed():
    obj = _Cycle()
    ref = weakref.ref(obj)
    assert freeze_startup_heap() > 0
    del obj
    gc.collect()
    assert ref() is not None, "a frozen object is never walked by a collection"
    thaw_heap()
    gc.collect()
    assert ref() is None


def test_thaw_waits_for_every_freezer():
    freeze_startup_heap()
    freeze_startup_heap()
    thaw_heap()
    assert gc.get_freeze_count() > 0, "one node still runs: its heap stays frozen"
    thaw_heap()
    assert gc.get_freeze_count() == 0
    thaw_heap()  # more thaws than freezes: nothing to do
    assert gc.get_freeze_count() == 0


def test_pauses_count_collections_by_generation_and_time():
    pauses = GCPauses()
    try:
        before = time.perf_counter()
        gc.collect(0)
        gc.collect()
        s = pauses.summary(before)
        assert s["collections_gen0"] >= 1
        assert s["collections_gen2"] >= 1
        assert s["pause_ms_total"] >= s["pause_ms_gen2"] > 0
        assert s["pause_ms_max"] <= s["pause_ms_total"]
        assert pauses.summary(time.perf_counter())["collections_gen2"] == 0
    finally:
        gc.callbacks.remove(pauses._on_gc)


def test_one_recorder_per_process():
    assert gc_pauses() is gc_pauses()
