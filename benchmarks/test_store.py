"""Store benchmarks: store_batch, per-layer store() in decode, store_layers.

Each step stores whole tokens (every layer's keys and values); see _bench.py
and kvcache/_benchkit.py for the harness and the baselines.
"""
import pytest

import kvcache
from _bench import CORES, N_LAYERS, CacheArena, check_stored, measure
from kvcache._benchkit import LIMIT, Side, clock

NUMPY = "numpy cache"


@pytest.mark.parametrize("tokens", [1, 4, 8, 16, 32, 256])
def test_store_batch(benchmark, fresh_cache, numpy_cache, limit_buffer, kv_inputs, tokens):
    """32 store_batch calls a step (one per layer), `tokens` tokens each."""
    cache = fresh_cache
    k, v = kv_inputs(tokens)
    ks, vs = list(k), list(v)  # per-layer [T, H, D] views, made once for every side
    store_batch = cache.store_batch

    def proj():
        for l in range(N_LAYERS):
            store_batch(l, ks[l], vs[l])

    measure(
        benchmark, name=f"store_batch T={tokens}",
        proj=Side("kvcache", proj, tokens, CacheArena(cache)),
        baselines=[
            Side(NUMPY, lambda: numpy_cache.store_batch(ks, vs, tokens), tokens, numpy_cache),
            limit_buffer.side(k, v),
        ])
    check_stored(cache, k, v, tokens)


def test_decode_store_per_layer(benchmark, fresh_cache, numpy_cache, kv_inputs):
    """Decode as a model runs it: 32 store() calls a step, one [H, D] token per layer."""
    cache = fresh_cache
    k, v = kv_inputs(1)
    ks, vs = list(k[:, 0]), list(v[:, 0])  # per-layer [H, D]
    store = cache.store

    def proj():
        for l in range(N_LAYERS):
            store(l, ks[l], vs[l])

    measure(
        benchmark, name="decode store() x32 layers",
        proj=Side("kvcache", proj, 1, CacheArena(cache)),
        baselines=[Side(NUMPY, lambda: numpy_cache.store_one(ks, vs), 1, numpy_cache)],
        targets={NUMPY: 1.5})
    check_stored(cache, k, v, 1)


@pytest.mark.parametrize("phase,tokens,target", [("prefill", 256, 1.05), ("decode", 1, 0.85)],
                         ids=["prefill", "decode"])
def test_store_layers_vs_limit(benchmark, fresh_cache, limit_buffer, kv_inputs, phase, tokens, target):
    """One store_layers call a step (default threads = every core) vs the single-thread copy."""
    cache = fresh_cache
    k, v = kv_inputs(tokens)
    measure(
        benchmark, name=f"{phase} store_layers T={tokens} threads={cache.threads}",
        proj=Side("kvcache", lambda: cache.store_layers(k, v), tokens, CacheArena(cache)),
        baselines=[limit_buffer.side(k, v)],
        targets={LIMIT: target})
    check_stored(cache, k, v, tokens)


def _spin(seconds):
    """Keep the calling thread busy, standing in for the model's forward pass."""
    def run():
        end = clock() + seconds
        while clock() < end:
            pass
    return run


CALLER_WORK_S = 1e-3


def test_decode_store_layers_cadence(benchmark, fresh_cache, limit_buffer, kv_inputs):
    """Decode as an application paces it: 1 ms of work on the calling thread before
    every step (untimed), then one store_layers (default threads) vs the limit."""
    cache = fresh_cache
    k, v = kv_inputs(1)
    work = _spin(CALLER_WORK_S)
    limit = limit_buffer.side(k, v)
    limit.enter = work
    measure(
        benchmark, name=f"decode store_layers T=1 threads={cache.threads}, 1 ms work between",
        proj=Side("kvcache", lambda: cache.store_layers(k, v), 1, CacheArena(cache), enter=work),
        baselines=[limit], budget_s=3.0)
    check_stored(cache, k, v, 1)


@pytest.mark.skipif(CORES < 2, reason="needs at least 2 cores")
# T=1 (256 KiB) is below the size at which store_layers starts helper threads
# (PARALLEL_MIN_BYTES = 1 MiB in kvcache/_hot.pyx when this was written),
# so both sides run on the caller; T=4 (1 MiB) is the smallest parallel call.
@pytest.mark.parametrize("tokens", [1, 4, 256])
def test_store_layers_threads(benchmark, fresh_cache, kv_inputs, tokens):
    """store_layers with threads = every core vs threads=1, same cache, alternating."""
    cache = fresh_cache
    k, v = kv_inputs(tokens)
    arena = CacheArena(cache)
    step = lambda: cache.store_layers(k, v)  # noqa: E731

    def set_threads(n):
        return lambda: setattr(cache, "threads", n)

    measure(
        benchmark, name=f"store_layers T={tokens} threads={CORES}",
        proj=Side("kvcache", step, tokens, arena, enter=set_threads(CORES)),
        baselines=[Side("threads=1", step, tokens, arena, enter=set_threads(1),
                        exit=set_threads(CORES))])
    check_stored(cache, k, v, tokens)


@pytest.mark.parametrize("tokens", [1, 256])
def test_simd_vs_scalar(benchmark, fresh_cache, kv_inputs, tokens):
    """The copy kernel: SIMD "auto" vs forced scalar, store_layers on one thread."""
    cache = fresh_cache
    cache.threads = 1
    k, v = kv_inputs(tokens)
    arena = CacheArena(cache)
    step = lambda: cache.store_layers(k, v)  # noqa: E731
    auto = kvcache.set_simd_backend("auto")
    try:
        measure(
            benchmark, name=f"store_layers T={tokens} threads=1 simd={auto}",
            proj=Side("kvcache", step, tokens, arena, enter=lambda: kvcache.set_simd_backend("auto")),
            baselines=[Side("simd=scalar", step, tokens, arena,
                            enter=lambda: kvcache.set_simd_backend("scalar"),
                            exit=lambda: kvcache.set_simd_backend("auto"))])
    finally:
        kvcache.set_simd_backend("auto")
    assert kvcache.simd_backend() == auto
    check_stored(cache, k, v, tokens)
