"""Memory: aligned, zeroed arenas freed exactly once by close, with, or garbage collection."""
import gc
import os
import weakref

import numpy as np
import pytest

import kvcache
from helpers import SHAPE, rows
from kvcache._arena import allocator_live


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


# --- resident memory over many create / store / get / close cycles ----------

RSS_SHAPE = dict(n_layers=2, n_kv_heads=8, head_dim=128, max_seq_len=1024)
RSS_TOKENS = 600  # more than a tiered cache's 512 hot tokens: blocks go to the cold tier
RSS_CONFIGS = [
    dict(dtype="float32"),
    dict(dtype="int8"),
    dict(dtype="float32", hot_tokens=512, block_tokens=16, cold=True),
    dict(dtype="int8", hot_tokens=512, block_tokens=16, cold=True),
]
RSS_WARMUP, RSS_CYCLES = 24, 300
RSS_LIMIT = 4 << 20  # bytes of growth allowed over RSS_CYCLES (measured: 0)


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def under_asan():
    # .ci/sanitize exports KVCACHE_SANITIZE; the runtime's mapping catches a manual run.
    with open("/proc/self/maps") as f:
        return "address" in os.environ.get("KVCACHE_SANITIZE", "") or "libasan" in f.read()


def rss_cycle(i, tmp_path, K, V):
    kw = dict(RSS_CONFIGS[i % len(RSS_CONFIGS)])
    if kw.pop("cold", False):
        kw["cold_dir"] = tmp_path / f"cold{i % len(RSS_CONFIGS)}"
    with kvcache.TieredKVCache(**RSS_SHAPE, **kw) as c:
        c.store_layers(K, V)
        c.store(1, K[1, 0], V[1, 0])
        for l in range(RSS_SHAPE["n_layers"]):
            k, v = c.get(l)
            assert k.shape[0] == RSS_TOKENS + (l == 1)
        arena = c.nbytes // (2 * RSS_SHAPE["n_layers"])
    assert c.closed
    return arena


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm")
def test_repeated_cycles_keep_resident_memory_flat(tmp_path):
    """Create, store (RAM and tiered, float32 and int8), get and close, many
    times: resident memory stays flat.  Every arena is prefaulted (committed),
    so one leaked arena costs its whole size; the smallest here is an int8
    tiered cache's 512 hot tokens, and leaking even one per 10 cycles would
    grow RSS by several times the bound (checked below)."""
    if under_asan():
        pytest.skip("ASan's allocator quarantines freed memory and maps shadow: RSS means nothing")
    L, H, D = RSS_SHAPE["n_layers"], RSS_SHAPE["n_kv_heads"], RSS_SHAPE["head_dim"]
    K = rows(RSS_TOKENS, layers=L, seed=3, heads=H, dim=D)
    V = rows(RSS_TOKENS, layers=L, seed=4, heads=H, dim=D)
    arenas = [rss_cycle(i, tmp_path, K, V) for i in range(len(RSS_CONFIGS))]
    assert (RSS_CYCLES // 10) * min(arenas) > 2 * RSS_LIMIT, arenas

    for i in range(RSS_WARMUP):  # the allocator's caches settle
        rss_cycle(i, tmp_path, K, V)
    gc.collect()
    rss, fds, blocks = resident_bytes(), open_fds(), live()
    for i in range(RSS_CYCLES):
        rss_cycle(i, tmp_path, K, V)
    gc.collect()
    growth = resident_bytes() - rss
    assert live() == blocks and open_fds() == fds
    if os.environ.get("KVCACHE_EMULATED"):  # set by .ci/aarch64
        pytest.skip("RSS under qemu-user is the emulator's, which grows with every large "
                    "mmap/munmap (plain numpy arrays too); fds and allocator blocks were checked")
    assert growth < RSS_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB over {RSS_CYCLES} cycles"
