"""Reduced-precision storage: stores and reads of float16 / bfloat16 / int8 caches,
and the conversion kernels beside numpy.

Inputs are float32 (what a model hands over); a token still counts 256 KiB of
float32 keys and values, so GB/s here is float32 bytes taken in (or given out)
per second, and "tokens/s" compares directly with the float32 copy limit.
"""
import ml_dtypes
import numpy as np
import pytest

import kvcache
from _bench import (HEAD_DIM, MAX_SEQ_LEN, N_HEADS, N_LAYERS, NUMPY_COPY, CacheArena, measure,
                    whole_context_sides)
from kvcache import _simd
from kvcache._benchkit import LIMIT, Side

REDUCED = ["float16", "bfloat16", "int8"]
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def reduced_caches():
    """One prefaulted cache per stored dtype (1/2 or ~1/4 GiB each), made on first use."""
    made = {}

    def get(dtype):
        if dtype not in made:
            made[dtype] = kvcache.TieredKVCache(n_layers=N_LAYERS, n_kv_heads=N_HEADS, head_dim=HEAD_DIM,
                                                max_seq_len=MAX_SEQ_LEN, dtype=dtype)
        c = made[dtype]
        c.reset()
        return c
    yield get
    for c in made.values():
        c.close()


def _check_rounded(cache, k, dtype, tokens):
    """The cache holds the inputs, rounded as the dtype says (not a no-op)."""
    n = cache.layer_len(N_LAYERS - 1)
    got = cache.get(N_LAYERS - 1, n - tokens, n)[0]
    want = k[N_LAYERS - 1, -tokens:]
    if dtype == "int8":  # within half a step of each (token, head)'s scale
        scale = np.abs(want).max(axis=-1, keepdims=True) / 127
        assert (np.abs(got - want) <= scale * 0.5001).all()
    else:
        rounded = want.astype(np.float16 if dtype == "float16" else BF16).astype(np.float32)
        np.testing.assert_array_equal(got, rounded)


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("phase,tokens", [("prefill", 256), ("decode", 1)], ids=["prefill", "decode"])
def test_reduced_store_layers(benchmark, reduced_caches, limit_buffer, kv_inputs, dtype, phase, tokens):
    """store_layers of float32 inputs into a reduced cache (converted in the copy)
    vs the float32 copy limit.  float16 target: 1.2x in tokens/s (it writes half the bytes)."""
    cache = reduced_caches(dtype)
    k, v = kv_inputs(tokens)
    measure(
        benchmark, name=f"{phase} store_layers T={tokens} dtype={dtype}",
        proj=Side("kvcache", lambda: cache.store_layers(k, v), tokens, CacheArena(cache)),
        baselines=[limit_buffer.side(k, v)],
        targets={LIMIT: 1.2} if dtype == "float16" else {})
    _check_rounded(cache, k, dtype, tokens)


CONTEXT = 1024


@pytest.mark.parametrize("dtype", REDUCED)
def test_reduced_get_whole_context(benchmark, reduced_caches, numpy_cache, kv_inputs, dtype):
    """32 get(l, out=float32) of 1024 positions (widened by the SIMD header) vs
    np.copyto of the same float32 bytes."""
    cache = reduced_caches(dtype)
    k, v = kv_inputs(256)
    numpy_cache.reset()
    for _ in range(CONTEXT // 256):
        cache.store_layers(k, v)
        numpy_cache.store_batch(list(k), list(v), 256)
    proj, base, _ = whole_context_sides(cache, numpy_cache, CONTEXT)
    measure(benchmark, name=f"get whole context ({CONTEXT} pos) x32 layers dtype={dtype}",
            proj=proj, baselines=[base])
    assert base.name == NUMPY_COPY


KERNEL_TOKENS = 64  # 16 MiB of float32 keys and 16 MiB of values per step


@pytest.mark.parametrize("kind", ["f32_f16", "f32_bf16", "f16_f32", "bf16_f32"])
def test_conversion_kernel_vs_numpy(benchmark, kv_inputs, kind):
    """The header's conversion (auto SIMD path) vs numpy's astype into a
    preallocated array (np.copyto with casting), same data.  Target 2x for the
    float32 -> float16 / bfloat16 conversions that stores make."""
    k, v = kv_inputs(KERNEL_TOKENS)
    half = np.float16 if "bf16" not in kind else BF16
    if kind.startswith("f32"):
        src = [k.reshape(-1), v.reshape(-1)]
        dst = [np.empty(a.shape, half) for a in src]
    else:
        src = [k.reshape(-1).astype(half), v.reshape(-1).astype(half)]
        dst = [np.empty(a.shape, np.float32) for a in src]
    backend = kvcache.simd_backend()

    def proj():
        _simd.convert_with(backend, kind, dst[0], src[0])
        _simd.convert_with(backend, kind, dst[1], src[1])

    def numpy_astype():
        np.copyto(dst[0], src[0], casting="unsafe")
        np.copyto(dst[1], src[1], casting="unsafe")

    measure(benchmark, name=f"convert {kind} ({KERNEL_TOKENS} tokens) simd={backend}",
            proj=Side("kvcache", proj, KERNEL_TOKENS),
            baselines=[Side("numpy astype", numpy_astype, KERNEL_TOKENS)],
            # the target is for the conversion a store makes (narrowing); widening
            # bfloat16 is a shift, which ml_dtypes does at memory speed too
            targets={"numpy astype": 2.0} if kind.startswith("f32") else {})
    proj()
    want = src[1].astype(dst[1].dtype)
    assert dst[1].view(np.uint8).tobytes() == want.view(np.uint8).tobytes()


def test_int8_quant_kernel_vs_numpy(benchmark, kv_inputs):
    """int8 quantisation of (token, head) groups: the header's kernel vs the same
    arithmetic written with numpy (max, divide, rint, clip, cast)."""
    k, v = kv_inputs(KERNEL_TOKENS)
    groups = [k.reshape(-1, HEAD_DIM), v.reshape(-1, HEAD_DIM)]
    backend = kvcache.simd_backend()

    def proj():
        for g in groups:
            _simd.quant_i8_with(backend, g)

    def numpy_quant():
        for g in groups:
            scale = np.abs(g).max(axis=1) / np.float32(127)
            np.clip(np.rint(g / scale[:, None]), -127, 127).astype(np.int8)

    measure(benchmark, name=f"quantize int8 ({KERNEL_TOKENS} tokens) simd={backend}",
            proj=Side("kvcache", proj, KERNEL_TOKENS),
            baselines=[Side("numpy", numpy_quant, KERNEL_TOKENS)])
