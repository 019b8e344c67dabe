"""The model worker settles its heap once its models are loaded (inference/worker.settle_heap): what lives as
long as the process is frozen out of the GC's reach, so a full collection no longer walks the models'
objects (~40 ms with e5 loaded: a c=1 request that met one waited for it)."""

from __future__ import annotations

import gc
import time

from xcstack.inference.worker import settle_heap


def test_settle_heap_freezes_what_is_loaded_and_full_collections_get_cheap() -> None:
    loaded = [[str(i), float(i)] for i in range(200_000)]  # a tokenizer-sized table (lists: GC-tracked)
    try:
        t0 = time.perf_counter()
        gc.collect()
        before = time.perf_counter() - t0
        settle_heap()
        assert gc.get_freeze_count() >= len(loaded)
        t0 = time.perf_counter()
        gc.collect()
        after = time.perf_counter() - t0
        assert after < before / 2, (before, after)
    finally:
        gc.unfreeze()
        del loaded
