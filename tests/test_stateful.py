"""TieredKVCache against a plain-numpy model, driven by a hypothesis state machine.

The model is one ``[n, H, D]`` float32 array of keys and one of values per
layer, plus the counters ``stats()`` must report, plus (for ``persist=True``
caches) the prefix of every layer the last flush made durable.  Every rule does the same
thing to the cache and to the model; after every step the invariants compare
every stored byte, the lengths and the counters.  Token data are random
32-bit patterns viewed as float32 (NaN payloads, infinities, -0.0,
subnormals), so "equal" means bit-for-bit equal.

Runs in a few seconds by default.  Set ``CI=1`` (or ``KVCACHE_DERANDOMIZE=1``)
for a derandomized, database-free run whose outcome never varies.
"""
import gc
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import kvcache
from kvcache import CacheFullError
from helpers import DETERMINISTIC, bits, random_bits
from reference import roundtrip, widened

N_LAYERS = 3
N_HEADS = 2

layers = st.integers(0, N_LAYERS - 1)
seeds = st.integers(0, 2**32 - 1)
counts = st.integers(1, 6)
# How the [T, H, D] input is laid out in memory (inner [H, D] always C-contiguous).
layouts = st.sampled_from(["contiguous", "strided", "reversed", "broadcast"])
positions = st.one_of(st.none(), st.integers(-30, 30))


def laid_out(seed, shape, layout, axis):
    """(array passed to the cache, the dense data it denotes) in a given layout.

    ``axis`` is the token axis of ``shape`` (0 for [T,H,D], 1 for [L,T,H,D]).
    """
    dense = random_bits(seed, shape)
    if layout == "contiguous":
        return dense, dense
    if layout == "strided":  # every other token of a twice-as-long buffer
        big_shape = list(shape)
        big_shape[axis] *= 2
        big = random_bits(seed + 1, big_shape)
        idx = [slice(None)] * len(shape)
        idx[axis] = slice(None, None, 2)
        big[tuple(idx)] = dense
        arg = big[tuple(idx)]
        assert not arg.flags.c_contiguous or shape[axis] == 1
        return arg, dense
    if layout == "reversed":  # negative stride on the token axis
        idx = [slice(None)] * len(shape)
        idx[axis] = slice(None, None, -1)
        return dense[tuple(idx)].copy()[tuple(idx)], dense
    if layout == "broadcast":  # stride 0: the same token T times, read-only
        one_shape = list(shape)
        one_shape[axis] = 1
        one = random_bits(seed, one_shape)
        arg = np.broadcast_to(one, shape)
        return arg, np.ascontiguousarray(arg)
    raise AssertionError(layout)


class KVCacheMachine(RuleBasedStateMachine):
    """The cache and its model; every rule keeps them in step."""

    @initialize(head_dim=st.integers(3, 5), capacity=st.integers(4, 24),
                threads=st.integers(1, 3), tiered=st.booleans(), block=st.integers(1, 4),
                slots=st.integers(2, 4), sinks=st.integers(0, 2),
                policy=st.sampled_from(["lru", "adaptive", "h2o"]),
                dtype=st.sampled_from(["float32", "float32", "float16", "bfloat16", "int8"]),
                persist=st.booleans())
    def make_cache(self, head_dim, capacity, threads, tiered, block, slots, sinks, policy, dtype,
                   persist):
        # tiered: a RAM budget of a few tiny blocks, so that evictions and
        # promotions happen on almost every step.
        self.D = head_dim
        self.cap = capacity  # max_seq_len
        hot = None
        if tiered and (slots + -(-sinks // block)) * block < capacity:
            hot = (slots + -(-sinks // block)) * block
        self.max_seq_len = capacity
        self.persist = persist
        self.tmp = tempfile.mkdtemp(prefix="kvc-stateful-") if persist else None
        self.cold_dir = os.path.join(self.tmp, "cold") if persist else None
        self.cache = kvcache.TieredKVCache(
            n_layers=N_LAYERS, n_kv_heads=N_HEADS, head_dim=head_dim,
            max_seq_len=self.max_seq_len, hot_tokens=hot, block_tokens=block,
            sink_tokens=sinks if hot else 0, eviction_policy=policy, threads=threads, dtype=dtype,
            cold_dir=self.cold_dir, persist=persist)
        self.dtype = dtype
        empty = np.empty((0, N_HEADS, head_dim), np.float32)
        self.keys = [empty.copy() for _ in range(N_LAYERS)]
        self.values = [empty.copy() for _ in range(N_LAYERS)]
        self.durable = (list(self.keys), list(self.values))  # what the last flush kept
        self.row_bytes = self.cache.config.row_bytes
        self.reset_counters()

    def reset_counters(self):
        """The model's view of stats(): they start from zero in each cache object."""
        self.tokens_stored = 0
        self.tokens_read = 0
        self.view_rows = 0  # rows read as views: counted in bytes of the stored dtype

    def teardown(self):
        # Only release: the invariants already checked the last state, and an
        # error here would mask the step that failed.
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.close()
        if getattr(self, "tmp", None):
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ------------------------------------------------------------
    def token_shape(self, t=None, n_layers=None):
        shape = (N_HEADS, self.D)
        if t is not None:
            shape = (t,) + shape
        if n_layers is not None:
            shape = (n_layers,) + shape
        return shape

    def append(self, layer, k, v):
        # the model holds what a float32 get must return: the stored dtype's rounding
        k, v = roundtrip(k, self.dtype), roundtrip(v, self.dtype)
        self.keys[layer] = np.concatenate([self.keys[layer], k])
        self.values[layer] = np.concatenate([self.values[layer], v])
        self.tokens_stored += len(k)

    def expected_range(self, layer, start, stop):
        """(a, b) like the cache resolves them, or the exception it must raise."""
        n = len(self.keys[layer])

        def pos(p, default):
            if p is None:
                return default
            if p < 0:
                p += n
            if p < 0 or p > n:
                return None
            return p

        a, b = pos(start, 0), pos(stop, n)
        if a is None or b is None:
            return IndexError
        if a > b:
            return ValueError
        return a, b

    def assert_unchanged_after(self, exc_type, fn, *args, **kwargs):
        before = self.cache.stats()
        with pytest.raises(exc_type):
            fn(*args, **kwargs)
        lens = [self.cache.layer_len(l) for l in range(N_LAYERS)]
        assert lens == [len(k) for k in self.keys]
        assert self.cache.stats() == before

    # -- stores -------------------------------------------------------------
    @rule(layer=layers, seed=seeds)
    def store_one(self, layer, seed):
        k = random_bits(seed, self.token_shape())
        v = random_bits(seed ^ 0x5A5A5A5A, self.token_shape())
        if len(self.keys[layer]) + 1 > self.cap:
            self.assert_unchanged_after(CacheFullError, self.cache.store, layer, k, v)
        else:
            self.cache.store(layer, k, v)
            self.append(layer, k[None], v[None])

    @rule(layer=layers, t=counts, seed=seeds, layout=layouts,
          method=st.sampled_from(["store", "store_batch"]))
    def store_many(self, layer, t, seed, layout, method):
        k, k_dense = laid_out(seed, self.token_shape(t), layout, 0)
        v, v_dense = laid_out(seed ^ 0x5A5A5A5A, self.token_shape(t), layout, 0)
        fn = getattr(self.cache, method)
        if len(self.keys[layer]) + t > self.cap:
            self.assert_unchanged_after(CacheFullError, fn, layer, k, v)
        else:
            fn(layer, k, v)
            self.append(layer, k_dense, v_dense)

    @rule(t=counts, seed=seeds, layout=layouts)
    def store_layers(self, t, seed, layout):
        k, k_dense = laid_out(seed, self.token_shape(t, N_LAYERS), layout, 1)
        v, v_dense = laid_out(seed ^ 0x5A5A5A5A, self.token_shape(t, N_LAYERS), layout, 1)
        if max(len(k) for k in self.keys) + t > self.cap:
            # all or nothing: one full layer refuses the whole call
            self.assert_unchanged_after(CacheFullError, self.cache.store_layers, k, v)
        else:
            self.cache.store_layers(k, v)
            for l in range(N_LAYERS):
                self.append(l, k_dense[l], v_dense[l])

    @rule(layer=layers, t=counts, seed=seeds,
          bad=st.sampled_from(["dtype", "heads", "dim", "rank", "mismatch", "empty", "layer",
                               "layer_type", "batch_rank", "layers_axis"]))
    def invalid_store(self, layer, t, seed, bad):
        k = random_bits(seed, self.token_shape(t))
        v = k.copy()
        c = self.cache
        if bad == "dtype":
            self.assert_unchanged_after(TypeError, c.store, layer, np.zeros(k.shape), v)
        elif bad == "heads":
            kb = random_bits(seed, (t, N_HEADS + 1, self.D))
            self.assert_unchanged_after(ValueError, c.store, layer, kb, kb)
        elif bad == "dim":
            kb = random_bits(seed, (t, N_HEADS, self.D - 1))
            self.assert_unchanged_after(ValueError, c.store_batch, layer, kb, kb)
        elif bad == "rank":
            self.assert_unchanged_after(ValueError, c.store, layer, k[None], v[None])
        elif bad == "mismatch":  # different token counts for keys and values
            vb = random_bits(seed, self.token_shape(t + 1))
            self.assert_unchanged_after(ValueError, c.store, layer, k, vb)
        elif bad == "empty":
            self.assert_unchanged_after(ValueError, c.store_batch, layer, k[:0], v[:0])
        elif bad == "layer":
            self.assert_unchanged_after(IndexError, c.store, N_LAYERS + layer, k, v)
            self.assert_unchanged_after(IndexError, c.store, -1 - layer, k, v)
        elif bad == "layer_type":
            self.assert_unchanged_after(TypeError, c.store, float(layer), k, v)
            self.assert_unchanged_after(TypeError, c.store, True, k, v)
        elif bad == "batch_rank":  # store_batch wants [T, H, D], not one token
            self.assert_unchanged_after(ValueError, c.store_batch, layer, k[0], v[0])
        elif bad == "layers_axis":
            kl = random_bits(seed, self.token_shape(t, N_LAYERS - 1))
            self.assert_unchanged_after(ValueError, c.store_layers, kl, kl)

    # -- rollback -----------------------------------------------------------
    @rule(n=st.integers(0, 30))
    def truncate(self, n):
        self.cache.truncate(n)
        if self.persist and any(n < len(k) for k in self.durable[0]):
            # documented: a truncate below the flushed length flushes at once
            self.durable = ([k[:n] for k in self.keys], [v[:n] for v in self.values])
        self.keys = [k[:n] for k in self.keys]
        self.values = [v[:n] for v in self.values]

    @rule(n=st.one_of(st.integers(-5, -1), st.just(True), st.just(1.5)))
    def invalid_truncate(self, n):
        exc = ValueError if isinstance(n, int) and not isinstance(n, bool) else TypeError
        self.assert_unchanged_after(exc, self.cache.truncate, n)

    @rule()
    def reset(self):
        self.truncate(0)  # the same call, as documented

    # -- persistence --------------------------------------------------------
    @rule()
    def flush(self):
        if not self.persist:
            self.assert_unchanged_after(ValueError, self.cache.flush)
            return
        self.cache.flush()
        self.durable = (list(self.keys), list(self.values))

    @rule(policy=st.sampled_from([None, "lru", "adaptive", "h2o"]), threads=st.integers(1, 3))
    def close_and_open(self, policy, threads):
        """close() flushes; open() in "a later process" finds every position."""
        if not self.persist:
            return
        self.cache.close()
        self.durable = (list(self.keys), list(self.values))
        self.reopen(policy, threads)

    @rule()
    def lose_the_process(self):
        """The object is dropped without close(): like a crash, only the last
        flush survives (garbage collection does not flush)."""
        if not self.persist:
            return
        self.cache = None
        gc.collect()
        self.keys, self.values = list(self.durable[0]), list(self.durable[1])
        self.reopen(None, 1)

    def reopen(self, policy, threads):
        overrides = {"threads": threads}
        if policy is not None:
            overrides["eviction_policy"] = policy
        self.cache = kvcache.TieredKVCache.open(self.cold_dir, **overrides)
        self.reset_counters()

    # -- reads --------------------------------------------------------------
    @rule(layer=layers, start=positions, stop=positions,
          use_out=st.booleans(), np_ints=st.booleans())
    def get(self, layer, start, stop, use_out, np_ints):
        expected = self.expected_range(layer, start, stop)
        if np_ints:  # numpy integers are accepted wherever ints are
            layer = np.int64(layer)
            start = None if start is None else np.int32(start)
            stop = None if stop is None else np.int64(stop)
        if not isinstance(expected, tuple):
            self.assert_unchanged_after(expected, self.cache.get, layer, start, stop)
            return
        a, b = expected
        n = b - a
        if use_out:
            # Sliced from a larger buffer: numpy gives a *fresh* empty array
            # zero strides, which test_get_into_fresh_empty_out covers alone.
            out = (np.full(self.token_shape(n + 1), np.float32(7))[:n],
                   np.full(self.token_shape(n + 1), np.float32(7))[1:])
            res = self.cache.get(layer, start, stop, out=out)
            assert res[0] is out[0] and res[1] is out[1]
            k, v = out
        else:
            k, v = self.cache.get(layer, start=start, stop=stop)
            assert k.dtype == np.float32 and v.dtype == np.float32
            assert k.flags.c_contiguous and v.flags.c_contiguous
        assert k.shape == v.shape == self.token_shape(n)
        assert np.array_equal(bits(k), bits(self.keys[int(layer)][a:b]))
        assert np.array_equal(bits(v), bits(self.values[int(layer)][a:b]))
        self.tokens_read += n

    @rule(layer=layers, start=positions, stop=positions, extra=st.sampled_from([-1, 1]))
    def get_bad_out(self, layer, start, stop, extra):
        expected = self.expected_range(layer, start, stop)
        if not isinstance(expected, tuple):
            return
        n = expected[1] - expected[0] + extra
        if n < 0:
            return
        out = (np.zeros(self.token_shape(n + 1), np.float32)[:n],
               np.zeros(self.token_shape(n + 1), np.float32)[:n])
        self.assert_unchanged_after(ValueError, self.cache.get, layer, start, stop, out)
        assert not out[0].any() and not out[1].any()

    @rule(layer=layers)
    def get_bad_layer(self, layer):
        self.assert_unchanged_after(IndexError, self.cache.get, N_LAYERS + layer)
        self.assert_unchanged_after(IndexError, self.cache.layer_len, -1 - layer)

    @rule(layer=layers, start=positions, stop=positions)
    def get_views(self, layer, start, stop):
        expected = self.expected_range(layer, start, stop)
        if not isinstance(expected, tuple):
            return
        a, b = expected
        raw = self.dtype != "float32"
        k, v = self.cache.get(layer, start, stop, copy=False, raw=raw)
        if raw:
            k, v = widened(k, self.dtype), widened(v, self.dtype)
        else:
            assert not k.flags.writeable and not v.flags.writeable
        assert np.array_equal(bits(k), bits(self.keys[layer][a:b]))
        assert np.array_equal(bits(v), bits(self.values[layer][a:b]))
        self.tokens_read += b - a
        self.view_rows += b - a

    @rule(layer=layers, seed=seeds, reduced=st.booleans())
    def update_scores(self, layer, seed, reduced):
        n = len(self.keys[layer])
        rng = np.random.default_rng(seed)
        attn = rng.random((n,) if reduced else (2, 3, n), dtype=np.float32)
        self.cache.update_scores(layer, attn)

    # -- invariants ---------------------------------------------------------
    @invariant()
    def contents_match(self):
        if not hasattr(self, "cache"):
            return
        for l in range(N_LAYERS):
            k, v = self.cache.get(l)
            assert np.array_equal(bits(k), bits(self.keys[l]))
            assert np.array_equal(bits(v), bits(self.values[l]))
            self.tokens_read += len(k)

    @invariant()
    def check_lengths_and_stats(self):
        if not hasattr(self, "cache"):
            return
        lens = [len(k) for k in self.keys]
        assert [self.cache.layer_len(l) for l in range(N_LAYERS)] == lens
        assert self.cache.seq_len == min(lens)
        assert all(n <= self.cap for n in lens)
        stats = self.cache.stats()
        assert stats["tokens_stored"] == self.tokens_stored
        assert stats["bytes_stored"] == 2 * self.row_bytes * self.tokens_stored
        assert stats["tokens_read"] == self.tokens_read
        f32_row, cold_row = N_HEADS * self.D * 4, self.cache.config.cold_row_bytes
        assert stats["bytes_read"] == 2 * (f32_row * (self.tokens_read - self.view_rows)
                                           + cold_row * self.view_rows)
        assert stats["hot_hits"] + stats["cold_hits"] == self.tokens_read
        on_disk = sum(row[1] for l in range(N_LAYERS) for row in self.cache._hot_tier().block_table(l)[1])
        assert stats["cold_bytes_on_disk"] == 2 * self.row_bytes * on_disk
        hot = self.cache._hot_tier()
        for l in range(N_LAYERS):
            assert len(hot._debug_hot_blocks(l)) <= hot.capacity // self.cache.config.block_tokens


KVCacheMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    derandomize=DETERMINISTIC,
    database=None if DETERMINISTIC else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVCacheMachine = KVCacheMachine.TestCase


def test_get_into_fresh_empty_out():
    """An empty range may be read into empty ``out`` arrays, however numpy made them.

    NumPy 2 gives freshly created empty arrays all-zero strides; ``get`` itself
    returns such arrays for an empty range, so they must be accepted back.
    """
    cache = kvcache.TieredKVCache(n_layers=1, n_kv_heads=N_HEADS, head_dim=3, max_seq_len=4)
    try:
        out = (np.empty((0, N_HEADS, 3), np.float32), np.empty((0, N_HEADS, 3), np.float32))
        res = cache.get(0, out=out)
        assert res[0] is out[0] and res[1] is out[1]
        cache.get(0, out=cache.get(0))  # get's own empty result, passed back
        assert cache.stats()["tokens_read"] == 0
    finally:
        cache.close()
