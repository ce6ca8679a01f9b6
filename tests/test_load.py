"""A persisted, tiered cache under concurrent load, then closed under load.

Writer threads own groups of layers, readers read any range (copies and
views), a maintenance thread flushes and feeds attention scores, while blocks
move between RAM and disk on almost every call.  Every token encodes its
position (keys) and its layer (values), so a reader can tell a torn or
misplaced row whatever the interleaving.  Nothing is timed.
"""
import threading

import numpy as np
import pytest

import kvcache
from helpers import run_threads
from kvcache import CacheClosedError

L, H, D = 6, 2, 8
GROUPS = [(0, 1, 2), (3, 4, 5)]  # one writer thread per group of layers
PER_LAYER = 240  # positions each layer receives in the bounded phase


def tokens(layer, start, n):
    """Keys and values of positions [start, start + n) of a layer (exact in float16)."""
    keys = np.repeat(np.arange(start + 1, start + n + 1, dtype=np.float32), H * D).reshape(n, H, D)
    return keys, np.full((n, H, D), layer + 1, np.float32)


def check(layer, start, k, v):
    want_k, want_v = tokens(layer, start, len(k))
    assert np.array_equal(k, want_k), f"layer {layer} rows {start}..: torn or misplaced keys"
    assert np.array_equal(v, want_v), f"layer {layer} rows {start}..: another layer's values"


def open_cache(d, policy, dtype, create=False):
    shape = dict(n_layers=L, n_kv_heads=H, head_dim=D)
    run_time = dict(max_seq_len=100_000, hot_tokens=24, sink_tokens=2, eviction_policy=policy, threads=2)
    if create:
        return kvcache.TieredKVCache(block_tokens=4, dtype=dtype,
                                     cold_dir=d, persist=True, **shape, **run_time)
    return kvcache.TieredKVCache.open(d, **run_time)


def writer(cache, group, seed, lengths, stop_after=None):
    """Append to each layer of ``group`` in turn; ``lengths`` counts what was stored."""
    def run():
        rng = np.random.default_rng(seed)
        while stop_after is None or min(lengths[l] for l in group) < stop_after:
            for l in group:
                n = int(rng.integers(1, 9))
                if stop_after is not None:
                    n = min(n, stop_after - lengths[l])
                if n <= 0:
                    continue
                k, v = tokens(l, lengths[l], n)
                (cache.store if rng.integers(2) else cache.store_batch)(l, k, v)
                lengths[l] += n  # only once the call returned: stored, all of it
        return 0
    return run


def reader(cache, seed, n_reads):
    def run():
        rng = np.random.default_rng(seed)
        read = 0
        for _ in range(n_reads):
            l = int(rng.integers(L))
            n = cache.layer_len(l)
            a = int(rng.integers(0, n + 1))
            b = int(rng.integers(a, n + 1))
            view = bool(rng.integers(2))  # views show the stored dtype: raw
            k, v = cache.get(l, a, b, copy=not view, raw=view)
            check(l, a, np.asarray(k, np.float32), np.asarray(v, np.float32))
            read += b - a
        return read
    return run


def maintenance(cache, seed):
    """Flush and feed h2o scores until the workers are done (``done`` is set)."""
    def run(done):
        rng = np.random.default_rng(seed)
        flushes = 0
        while done is None or not done.is_set():
            cache.flush()
            flushes += 1
            l = int(rng.integers(L))
            cache.update_scores(l, rng.random(cache.layer_len(l), dtype=np.float32))
        return flushes
    return run


@pytest.mark.parametrize("policy,dtype", [("lru", "float32"), ("adaptive", "float16"), ("h2o", "float32")])
def test_bounded_load_is_exact_then_survives_reopen(tmp_path, policy, dtype):
    d = tmp_path / "c"
    cache = open_cache(d, policy, dtype, create=True)
    lengths = [0] * L
    results = run_threads(
        [writer(cache, g, i, lengths, PER_LAYER) for i, g in enumerate(GROUPS)]
        + [reader(cache, 10 + i, 150) for i in range(2)],
        watchers=[maintenance(cache, 20)])
    read = sum(results[len(GROUPS):len(GROUPS) + 2])
    assert lengths == [PER_LAYER] * L
    for l in range(L):
        check(l, 0, *cache.get(l))
    read += L * PER_LAYER
    s = cache.stats()
    # counters exact: nothing lost, nothing counted twice
    assert s["tokens_stored"] == L * PER_LAYER and s["tokens_read"] == read
    assert s["hot_hits"] + s["cold_hits"] == read
    assert s["eviction_blocks"] > 0 and s["cold_hits"] > 0
    cache.close()
    with open_cache(d, policy, dtype) as cache:
        assert [cache.layer_len(l) for l in range(L)] == lengths
        for l in range(L):
            check(l, 0, *cache.get(l))


@pytest.mark.parametrize("policy", ["lru", "h2o"])
def test_close_under_load_keeps_every_store_that_returned(tmp_path, policy):
    """close() while writers, readers and a flusher run: each call completes or
    raises CacheClosedError; the directory then holds every token whose store
    returned, and nothing else.  Repeated to cover many interleavings."""
    d = tmp_path / "c"
    open_cache(d, policy, "float32", create=True).close()
    lengths = [0] * L
    for rnd in range(6):
        cache = open_cache(d, policy, "float32")
        started = threading.Barrier(len(GROUPS) + 4)

        def guarded(fn):
            def run():
                started.wait()
                try:
                    fn()
                except CacheClosedError:
                    pass
                return 0
            return run

        def closer():
            started.wait()
            threading.Event().wait(0.002 * rnd)  # let the traffic run a moment
            cache.close()
            return 0

        # writers stop at a bound (never CacheFullError), likely after close
        workers = [guarded(writer(cache, g, 100 * rnd + i, lengths, 4000 * (rnd + 1)))
                   for i, g in enumerate(GROUPS)]
        workers += [guarded(reader(cache, 100 * rnd + 10 + i, 10**9)) for i in range(2)]
        workers += [guarded(lambda: maintenance(cache, rnd)(None))]
        run_threads(workers + [closer], barrier=started)
        assert cache.closed
        with open_cache(d, policy, "float32") as reopened:
            assert [reopened.layer_len(l) for l in range(L)] == lengths, rnd
            for l in range(L):
                check(l, 0, *reopened.get(l))


def truncate_or_append(cache, rng):
    """One rollback or one store_layers of a few tokens, at the cache's end."""
    n = cache.layer_len(L - 1)  # the last layer a persisted close() closes
    if rng.integers(3) == 0:
        cache.truncate(int(rng.integers(0, n + 1)))
        return
    t = int(rng.integers(1, 6))
    k, v = zip(*(tokens(l, n, t) for l in range(L)))
    cache.store_layers(np.stack(k), np.stack(v))


def test_close_racing_truncate_and_store_layers_keeps_layers_in_step(tmp_path):
    """store_layers and truncate are all-or-nothing over the layers, also against
    a persisted close(), which closes layer after layer: the directory never
    holds layers of different lengths.  Repeated over many interleavings."""
    d = tmp_path / "c"
    open_cache(d, "lru", "float32", create=True).close()
    for rnd in range(24):
        cache = open_cache(d, "lru", "float32")
        started = threading.Barrier(3)
        turn = threading.Lock()  # the two churners take turns: positions stay known

        def churn(cache=cache, started=started, rnd=rnd, turn=turn):
            started.wait()
            rng = np.random.default_rng(rnd)
            try:
                while True:
                    with turn:
                        truncate_or_append(cache, rng)
            except CacheClosedError:
                return 0

        def closer(cache=cache, started=started):
            started.wait()
            threading.Event().wait(0.001 * (rnd % 4))
            cache.close()
            return 0

        run_threads([churn, churn, closer], barrier=started)
        with open_cache(d, "lru", "float32") as reopened:
            n = reopened.layer_len(0)
            assert [reopened.layer_len(l) for l in range(L)] == [n] * L, rnd
            for l in range(L):
                check(l, 0, *reopened.get(l))
