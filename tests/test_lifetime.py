"""Memory: aligned, zeroed arenas freed exactly once by close, with, or garbage collection."""
import gc
import weakref

import numpy as np
import pytest

import kvcache
from kvcache._hot import allocator_live
from conftest import SHAPE, rows


def live():
    gc.collect()
    return allocator_live()


def test_arenas_are_64_byte_aligned_and_zeroed():
    for prefault in (True, False):
        # head_dim 5: rows of 40 bytes, so only the arena base can be aligned
        with kvcache.TieredKVCache(max_seq_len=9000, prefault=prefault, **SHAPE) as c:
            info = c._hot_tier()._debug_arenas()
            assert len(info) == SHAPE["n_layers"]
            for k_addr, v_addr, nonzero in info:
                assert k_addr % 64 == 0 and v_addr % 64 == 0
                assert nonzero == 0
            c.store(1, rows(3, seed=1) + 1, rows(3, seed=2) + 1)
            assert all(nz == 0 for _, _, nz in c._hot_tier()._debug_arenas())


def test_close_frees_once_and_is_idempotent():
    before = live()
    c = kvcache.TieredKVCache(max_seq_len=4096, **SHAPE)
    arena = 2 * SHAPE["n_layers"] * 4096 * SHAPE["n_kv_heads"] * SHAPE["head_dim"] * 4
    assert c.nbytes == arena
    assert live() == (before[0] + arena, before[1] + 2 * SHAPE["n_layers"])
    c.close()
    assert live() == before and c.closed
    c.close()
    del c
    assert live() == before


def test_context_manager_and_garbage_collection_free():
    before = live()
    with kvcache.TieredKVCache(max_seq_len=64, **SHAPE) as c:
        c.store(0, rows(2), rows(2))
    assert c.closed and live() == before
    c2 = kvcache.TieredKVCache(max_seq_len=64, **SHAPE)
    ref = weakref.ref(c2)
    del c2
    assert ref() is None and live() == before
    # a cache dropped mid-use, inside a reference cycle
    c3 = kvcache.TieredKVCache(max_seq_len=64, **SHAPE)
    c3.store(1, rows(1)[0], rows(1)[0])
    cycle = [c3]
    cycle.append(cycle)
    del c3, cycle
    assert live() == before


def test_every_method_raises_after_close():
    c = kvcache.TieredKVCache(max_seq_len=16, **SHAPE)
    c.store(0, rows(1), rows(1))
    c.close()
    k = rows(1)
    calls = {
        "store": lambda: c.store(0, k, k),
        "store_batch": lambda: c.store_batch(0, k, k),
        "store_layers": lambda: c.store_layers(rows(1, layers=3), rows(1, layers=3)),
        "get": lambda: c.get(0),
        "get_out": lambda: c.get(0, out=(np.empty((1, 2, 5), np.float32),) * 2),
        "seq_len": lambda: c.seq_len,
        "layer_len": lambda: c.layer_len(0),
        "truncate": lambda: c.truncate(0),
        "reset": lambda: c.reset(),
        "stats": lambda: c.stats(),
        "nbytes": lambda: c.nbytes,
        "enter": lambda: c.__enter__(),
        "threads": lambda: c.threads,
    }
    for name, call in calls.items():
        with pytest.raises(kvcache.CacheClosedError, match="closed"):
            call()
    assert issubclass(kvcache.CacheClosedError, ValueError)
    assert "closed" in repr(c)


def test_repeated_create_close_does_not_leak():
    before = live()
    for i in range(200):
        with kvcache.TieredKVCache(max_seq_len=300 + i, **SHAPE) as c:
            c.store_layers(rows(3, layers=3), rows(3, layers=3))
    assert live() == before
