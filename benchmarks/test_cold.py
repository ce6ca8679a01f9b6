"""Cold-tier benchmarks: stores that spill to disk, and reads of cold blocks.

One tiered cache of CONTEXT positions a layer keeps HOT of them (a quarter)
in RAM; older blocks of BLOCK positions are written to per-layer files in a
private temporary directory (``cold_dir=None``: under /tmp) and read back
from their memory mappings.  See _bench.py and kvcache/_benchkit.py for the harness
and the baselines.
"""
import ctypes
import mmap
import os

import numpy as np
import pytest

import kvcache
from _bench import (HEAD_DIM, MAX_SEQ_LEN, N_HEADS, N_LAYERS, NUMPY_COPY, ROW_BYTES, TOKEN_BYTES,
                    CacheArena, check_stored, measure, whole_context_sides)
from kvcache._benchkit import LIMIT, Side

CONTEXT = MAX_SEQ_LEN  # positions a layer holds: 1 GiB of keys and values over all layers
HOT = CONTEXT // 4  # positions a layer keeps in RAM (256 MiB of arenas)
BLOCK = 256  # positions moved to the cold tier at a time
COLD = CONTEXT - HOT  # positions 0..COLD of a full layer are in the cold tier
HEADER_BYTES = 4096  # a cold file's header; row p is at HEADER_BYTES + p * ROW_BYTES


@pytest.fixture(scope="module")
def tiered_cache(kv_inputs):
    """The tiered cache, with the cold tier's file pages written once (768 MiB).

    The first write of a file page allocates it (and on a VM may fault in host
    memory: several times slower); the benchmarks measure the steady state.
    """
    c = kvcache.TieredKVCache(n_layers=N_LAYERS, n_kv_heads=N_HEADS, head_dim=HEAD_DIM,
                              max_seq_len=CONTEXT, hot_tokens=HOT, block_tokens=BLOCK)
    k, v = kv_inputs(BLOCK)
    for _ in range(CONTEXT // BLOCK):
        c.store_layers(k, v)
    assert c.stats()["eviction_blocks"] == N_LAYERS * COLD // BLOCK
    yield c
    c.close()


class SpillArena(CacheArena):
    """The tiered cache, which a reset leaves holding HOT positions (stored
    outside the timing): every timed step then runs where a long generation
    does, with a full hot tier, each new block pushing the oldest one of every
    layer to the cold tier."""

    def __init__(self, cache, k, v):
        super().__init__(cache)
        self.k, self.v = k, v  # [n_layers, BLOCK, H, D]

    def reset(self):
        self.cache.reset()
        for _ in range(HOT // BLOCK):
            self.cache.store_layers(self.k, self.v)


def _check_spilled(cache, k, v, tokens):
    """The last tokens stored read back; then, storing the step's input up to
    the end (untimed) pushes the first block the timed steps filled
    (positions HOT..HOT+BLOCK) to the cold tier, and its rows in the cold files
    and from get() are the inputs."""
    check_stored(cache, k, v, tokens)
    while cache.seq_len + tokens <= CONTEXT:
        cache.store_layers(k, v)
    l = N_LAYERS - 1
    expect_k, expect_v = k[l, np.arange(BLOCK) % tokens], v[l, np.arange(BLOCK) % tokens]
    with open(os.path.join(cache._cold_dir(), f"layer{l:04d}.keys"), "rb") as f:
        f.seek(HEADER_BYTES + HOT * ROW_BYTES)
        on_disk = np.frombuffer(f.read(BLOCK * ROW_BYTES), np.float32)
    np.testing.assert_array_equal(on_disk.reshape(expect_k.shape), expect_k)
    ko, vo = cache.get(l, HOT, HOT + BLOCK)
    np.testing.assert_array_equal(ko, expect_k)
    np.testing.assert_array_equal(vo, expect_v)


@pytest.mark.parametrize("phase,tokens", [("prefill", BLOCK), ("decode", 1)], ids=["prefill", "decode"])
def test_spill_store_layers(benchmark, tiered_cache, limit_buffer, kv_inputs, phase, tokens):
    """store_layers (default threads) with 3/4 of the context spilling to the cold
    tier, vs the in-RAM copy limit.  Mean step times: a decode step evicts a
    block of every layer once in BLOCK steps, and that is the cost compared."""
    cache = tiered_cache
    k, v = kv_inputs(tokens)
    before = cache.stats()
    res = measure(
        benchmark, name=f"spill {phase} store_layers T={tokens}, hot {HOT}/{CONTEXT} (mean)",
        proj=Side("kvcache", lambda: cache.store_layers(k, v), tokens,
                  SpillArena(cache, *kv_inputs(BLOCK))),
        baselines=[limit_buffer.side(k, v)],
        # The issue's spill target, read like #2's store_layers target: prefill
        # steps.  Decode is reported beside it (README: what bounds it).
        targets={LIMIT: 0.6} if tokens == BLOCK else {}, stat="mean",
        # decode: one refill cycle of steps (COLD, a multiple of BLOCK: one evicting
        # step in BLOCK whatever the phase)
        rounds=COLD if tokens < BLOCK else None)
    after = cache.stats()
    moved = {name: after[name] - before[name] for name in ("eviction_blocks", "bytes_to_cold")}
    rounds = res["rows"][0]["rounds"] if res else 0  # none under --benchmark-disable
    # Each BLOCK positions stored in the timed steps pushed a block of every layer out,
    # and each eviction wrote a whole block of keys and values.
    assert moved["eviction_blocks"] > 0
    assert moved["eviction_blocks"] >= rounds * tokens // BLOCK * N_LAYERS
    assert moved["bytes_to_cold"] == moved["eviction_blocks"] * BLOCK * 2 * ROW_BYTES
    _check_spilled(cache, k, v, tokens)


def _fill_context(cache, numpy_cache, kv_inputs):
    """Both caches hold the same CONTEXT positions per layer, a different chunk
    each block (position p holds token p // BLOCK + p % BLOCK of the inputs)."""
    k, v = kv_inputs(BLOCK + CONTEXT // BLOCK - 1)
    cache.reset()
    numpy_cache.reset()
    for i in range(CONTEXT // BLOCK):
        kc, vc = k[:, i:i + BLOCK], v[:, i:i + BLOCK]
        cache.store_layers(kc, vc)
        numpy_cache.store_batch(list(kc), list(vc), BLOCK)
    assert cache.seq_len == CONTEXT and numpy_cache.pos == CONTEXT


# -- page-cache state of the cold files ------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _pages(a):
    """(address, length) of the pages under ``a``, a page-aligned view of a cold file."""
    assert a.ctypes.data % mmap.PAGESIZE == 0 and a.nbytes % mmap.PAGESIZE == 0
    return a.ctypes.data, a.nbytes


def _resident(views):
    """Fraction of the file pages under ``views`` that are in the page cache."""
    held = total = 0
    for a in views:
        addr, n = _pages(a)
        vec = np.zeros(n // mmap.PAGESIZE, np.uint8)
        if _libc.mincore(addr, n, vec.ctypes.data) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        held += int(np.count_nonzero(vec & 1))
        total += vec.size
    return held / total


def _drop_pages(paths, views):
    """Evict the files' pages from the page cache, as memory pressure would.

    fadvise(DONTNEED) skips pages mapped into a process, so the cache's own
    mapping of the range (which ``views``, from get(copy=False), share) is
    unmapped first: read-only and shared, it faults the bytes back in from the
    file on the next access.  Dirty pages are written first (fsync), else they
    would stay."""
    for a in views:
        if _libc.madvise(*_pages(a), mmap.MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise failed")
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- reads -------------------------------------------------------------------------

def test_cold_get_whole_context(benchmark, tiered_cache, numpy_cache, kv_inputs):
    """A step reads every layer's whole context (32 get calls, CONTEXT tokens),
    3/4 of it from the cold files, whose pages are in the page cache."""
    cache = tiered_cache
    _fill_context(cache, numpy_cache, kv_inputs)
    views = [a for l in range(N_LAYERS) for a in cache.get(l, 0, COLD, copy=False)]
    assert _resident(views) > 0.99, "the cold files' pages are not in the page cache"
    del views
    proj, numpy_copy, out = whole_context_sides(cache, numpy_cache, CONTEXT)
    before = cache.stats()
    try:
        measure(benchmark, name=f"get whole context ({CONTEXT} pos, 3/4 cold, cached) x32 layers",
                proj=proj, baselines=[numpy_copy], targets={NUMPY_COPY: 0.8})
        after = cache.stats()
        assert after["cold_hits"] - before["cold_hits"] >= COLD * N_LAYERS
        assert after["promotions"] == before["promotions"]  # a scan brings nothing back to RAM
        for l in (0, N_LAYERS - 1):
            cache.get(l, 0, None, out=out)
            np.testing.assert_array_equal(out[0], numpy_cache.k[l])
            np.testing.assert_array_equal(out[1], numpy_cache.v[l])
    finally:
        numpy_cache.reset()


def test_cold_get_views(benchmark, tiered_cache, numpy_cache, kv_inputs):
    """get(copy=False) of every layer's whole context: the time to obtain the
    read-only views onto the cold files (nothing is copied; the GB/s column
    counts the bytes made visible), vs slicing numpy arrays."""
    cache = tiered_cache
    _fill_context(cache, numpy_cache, kv_inputs)
    get = cache.get
    kc, vc = numpy_cache.k, numpy_cache.v

    def proj():
        for l in range(N_LAYERS):
            get(l, 0, None, copy=False)

    proj()  # the first views of the hot blocks write them to the files; later ones only map

    def numpy_views():
        for l in range(N_LAYERS):
            kc[l][:CONTEXT], vc[l][:CONTEXT]  # noqa: B018 (the slicing is the work)

    try:
        measure(benchmark, name=f"get(copy=False) whole context ({CONTEXT} pos) x32 layers",
                proj=Side("kvcache", proj, CONTEXT),
                baselines=[Side("numpy views", numpy_views, CONTEXT)])
        for l in (0, N_LAYERS - 1):
            kv, vv = get(l, 0, None, copy=False)
            assert not kv.flags.writeable
            np.testing.assert_array_equal(kv, kc[l])
            np.testing.assert_array_equal(vv, vc[l])
    finally:
        numpy_cache.reset()


DROP_LAYER = N_LAYERS // 2


def test_cold_get_after_drop(benchmark, tiered_cache, numpy_cache, kv_inputs):
    """get() of one layer's cold positions (0..COLD, keys and values: 24 MiB) right
    after their file pages were dropped from the page cache (outside the timing),
    vs os.preadv of the same byte ranges of the same files, after the same drop.
    Both read the storage device (or whatever caches it below this machine)."""
    cache = tiered_cache
    _fill_context(cache, numpy_cache, kv_inputs)
    l = DROP_LAYER
    paths = [os.path.join(cache._cold_dir(), f"layer{l:04d}.{kind}") for kind in ("keys", "values")]
    ko = np.empty((COLD, N_HEADS, HEAD_DIM), np.float32)
    vo = np.empty_like(ko)
    before = cache.stats()["cold_hits"]
    cache.get(l, 0, COLD, out=(ko, vo))
    assert cache.stats()["cold_hits"] - before == COLD  # the range is all in the cold tier
    views = cache.get(l, 0, COLD, copy=False)  # the cache's mapping of the range
    _drop_pages(paths, views)
    if _resident(views) > 0.05:
        pytest.skip("cannot drop the cold files' pages from the page cache (tmpfs?)")
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    bufs = [memoryview(a).cast("B") for a in (ko, vo)]
    get = cache.get

    def proj():
        get(l, 0, COLD, out=(ko, vo))

    def pread():
        for fd, buf in zip(fds, bufs):
            done = 0
            while done < len(buf):
                n = os.preadv(fd, [buf[done:]], HEADER_BYTES + done)
                assert n > 0, "short cold file"
                done += n

    def drop():
        _drop_pages(paths, views)

    tokens = COLD * 2 * ROW_BYTES // TOKEN_BYTES
    assert tokens * TOKEN_BYTES == COLD * 2 * ROW_BYTES
    try:
        measure(benchmark, name=f"get {COLD} cold pos x1 layer, pages dropped",
                proj=Side("kvcache", proj, tokens, enter=drop),
                baselines=[Side("os.preadv", pread, tokens, enter=drop)])
        for side in (proj, pread):
            ko.fill(0)
            vo.fill(0)
            side()
            np.testing.assert_array_equal(ko, numpy_cache.k[l][:COLD])
            np.testing.assert_array_equal(vo, numpy_cache.v[l][:COLD])
        drop()
        assert _resident(views) < 0.05
    finally:
        for fd in fds:
            os.close(fd)
        numpy_cache.reset()
