"""Reduced-precision storage end to end: float16, bfloat16 and int8 caches, both tiers."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvcache
from helpers import SHAPE, rows
from reference import BF16, quantize, roundtrip, stored

L, H, D = SHAPE["n_layers"], SHAPE["n_kv_heads"], SHAPE["head_dim"]
DTYPES = ["float32", "float16", "bfloat16", "int8"]
INPUTS = {"float32": np.float32, "float16": np.float16, "bfloat16": BF16}


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def make(dtype, **kw):
    args = dict(max_seq_len=64, dtype=dtype, **SHAPE)
    args.update(kw)
    return kvcache.TieredKVCache(**args)


def spread(n, seed=0, layers=None):
    """Values over many magnitudes (and a zero group), to exercise rounding."""
    x = rows(n, layers=layers, seed=seed) * np.float32(10) ** rows(n, layers=layers, seed=seed + 1)
    x[..., 0, :] = 0 if n else x[..., 0, :]
    return x.astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_as", list(INPUTS))
def test_get_returns_the_rounded_values_for_every_input_type(dtype, given_as):
    k = spread(9, seed=1).astype(INPUTS[given_as])
    v = spread(9, seed=5).astype(INPUTS[given_as])
    with make(dtype) as c:
        c.store(0, k[0], v[0])
        c.store_batch(0, k[1:5], v[1:5])
        c.store_layers(np.stack([k[5:]] * L), np.stack([v[5:]] * L))
        gk, gv = c.get(0)
        assert gk.dtype == np.float32 and gk.shape == (9, H, D)
        assert bits(gk).tobytes() == bits(roundtrip(k, dtype)).tobytes()
        assert bits(gv).tobytes() == bits(roundtrip(v, dtype)).tobytes()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_raw_returns_the_stored_representation(dtype):
    k, v = spread(6, seed=2), spread(6, seed=3)
    with make(dtype) as c:
        c.store_batch(1, k, v)
        rk, rv = c.get(1, 1, 5, raw=True)
        want_k, want_v = stored(k[1:5], dtype), stored(v[1:5], dtype)
        if dtype == "int8":
            (qk, sk), (qv, sv) = rk, rv
            assert qk.dtype == np.int8 and qk.shape == (4, H, D) and sk.shape == (4, H)
            np.testing.assert_array_equal(qk, want_k[0])
            assert bits(sk).tobytes() == bits(want_k[1]).tobytes()
            np.testing.assert_array_equal(qv, want_v[0])
            assert bits(sv).tobytes() == bits(want_v[1]).tobytes()
        else:
            assert rk.dtype == want_k.dtype and rk.shape == (4, H, D)
            assert bits(rk).tobytes() == bits(want_k).tobytes()
            assert bits(rv).tobytes() == bits(want_v).tobytes()


def test_int8_zero_rows_give_zero_scale_and_exact_zeros():
    with make("int8") as c:
        z = np.zeros((3, H, D), np.float32)
        z[1, 1] = -0.0
        c.store_batch(0, z, z)
        (q, s), _ = c.get(0, raw=True)
        assert (s == 0).all() and (q == 0).all()
        k, v = c.get(0)
        assert (k == 0).all() and not np.isnan(k).any()


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, (2, H, D), elements=st.floats(-2.0 ** 126, 2.0 ** 126, width=32)))
def test_int8_error_is_at_most_half_a_step(x):
    # (within a rounding of FLT_MAX, 127 * scale may round up to inf: docs/reliability.md)
    with make("int8") as c:
        c.store_batch(0, x, x)
        k, _ = c.get(0)
        _, scale = quantize(x)
        err = np.abs(x.astype(np.float64) - k.astype(np.float64))
        # half a quantisation step, plus the float32 rounding of x / scale ...
        bound = scale.astype(np.float64)[..., None] * (0.5 + 127 * 2.0 ** -23)
        # ... while the scale is a normal float32 (or 0); a group below
        # 127 * 2**-126 gets a subnormal or zero scale, still within its max|x|.
        top = np.abs(x).max(axis=-1, keepdims=True)
        normal = (top == 0) | (scale >= 2.0 ** -126)[..., None]
        assert (err <= np.where(normal, bound, top)).all()


@pytest.mark.parametrize("dtype,ratio", [("float32", 1.0), ("float16", 0.5), ("bfloat16", 0.5),
                                         ("int8", (4 * H + (H * D + 3) // 4 * 4) / (4 * H * D))])
def test_nbytes_reflects_the_stored_dtype(dtype, ratio):
    with make(dtype) as c, make("float32") as ref:
        assert c.nbytes == ref.nbytes * ratio


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_the_cold_tier_stores_the_reduced_representation(dtype, tmp_path):
    d = tmp_path / "c"
    k, v = spread(40, seed=4, layers=L), spread(40, seed=6, layers=L)
    with make(dtype, hot_tokens=16, block_tokens=4, cold_dir=d, promote_on_read=False) as c:
        c.store_layers(k, v)
        for l in range(L):
            gk, gv = c.get(l)
            assert bits(gk).tobytes() == bits(roundtrip(k[l], dtype)).tobytes()
            assert bits(gv).tobytes() == bits(roundtrip(v[l], dtype)).tobytes()
        row = c.config.cold_row_bytes
        assert c.stats()["cold_bytes_on_disk"] == 2 * L * 24 * row  # blocks 0..5 went cold
        raw = (d / "layer0002.keys").read_bytes()
        code = {"float16": 1, "bfloat16": 2, "int8": 3}[dtype]
        assert int.from_bytes(raw[36:40], "little") == code  # the header records the dtype
        first = stored(k[2, :1], dtype)
        want = (bits(first[1]).tobytes() + bits(first[0]).tobytes() if dtype == "int8"
                else bits(first).tobytes())
        assert raw[4096:4096 + len(want)] == want
        # views of the stored representation need raw=True
        with pytest.raises(ValueError, match="pass raw=True"):
            c.get(2, 0, 8, copy=False)
        vk, _ = c.get(2, 0, 8, copy=False, raw=True)
        rk, _ = c.get(2, 0, 8, raw=True)
        if dtype == "int8":
            np.testing.assert_array_equal(vk[0], rk[0])
            np.testing.assert_array_equal(vk[1], rk[1])
        else:
            assert bits(vk).tobytes() == bits(rk).tobytes()


def test_a_different_dtype_per_tier_converts_on_eviction_and_promotion():
    k, v = spread(40, seed=7, layers=L), spread(40, seed=8, layers=L)
    with make("float16", cold_dtype="int8", hot_tokens=16, block_tokens=4) as c:
        c.store_layers(k, v)
        hot_blocks = c._hot_tier()._debug_hot_blocks(0)
        assert hot_blocks == [6, 7, 8, 9]
        gk, _ = c.get(0)
        # positions 0..23 went through int8 on eviction, 24..39 are float16
        np.testing.assert_array_equal(gk[:24], roundtrip(k[0, :24], "float16", "int8"))
        np.testing.assert_array_equal(gk[24:], roundtrip(k[0, 24:], "float16"))
        with pytest.raises(ValueError, match="raw reads need one stored dtype"):
            c.get(0, raw=True)
        q, scales = c.get(0, 0, 8, copy=False, raw=True)[0]  # views: the cold tier's int8
        np.testing.assert_array_equal(q, stored(roundtrip(k[0, :8], "float16"), "int8")[0])
        # a promoted block comes back as float16 of the int8 values
        c.get(0, 4, 8)
        assert 1 in c._hot_tier()._debug_hot_blocks(0)
        back = roundtrip(roundtrip(k[0, 4:8], "float16", "int8"), "float16")
        np.testing.assert_array_equal(c.get(0, 4, 8)[0], back)


def test_persisted_reduced_cache_reopens_and_checks_the_dtype(tmp_path):
    d = tmp_path / "c"
    k = spread(30, seed=9, layers=L)
    with make("bfloat16", hot_tokens=16, block_tokens=4, cold_dir=d, persist=True) as c:
        c.store_layers(k, k)
    with pytest.raises(ValueError, match="holds bfloat16 cold files, got dtype/cold_dtype asking for float16"):
        kvcache.TieredKVCache.open(d, dtype="float16")
    with kvcache.TieredKVCache.open(d) as c:
        assert c.config.dtype == "bfloat16"
        np.testing.assert_array_equal(c.get(1)[0], roundtrip(k[1], "bfloat16"))
    with kvcache.TieredKVCache.open(d, dtype="float32", cold_dtype="bfloat16") as c:
        assert c.config.dtype == "float32"  # hot tier in float32 now, same files
        np.testing.assert_array_equal(c.get(1)[0], roundtrip(k[1], "bfloat16"))


def test_inputs_must_share_a_float_dtype():
    with make("float16") as c:
        with pytest.raises(TypeError, match="expected dtype float32, float16 or bfloat16, got float64"):
            c.store(0, np.zeros((H, D)), np.zeros((H, D)))
        with pytest.raises(TypeError, match=r"values: expected the dtype of keys \(float16\), got float32"):
            c.store(0, np.zeros((H, D), np.float16), np.zeros((H, D), np.float32))
        with pytest.raises(TypeError, match="int8"):
            c.store(0, np.zeros((H, D), np.int8), np.zeros((H, D), np.int8))
        with pytest.raises(ValueError, match="out= takes float32 copies"):
            c.get(0, raw=True, out=(np.empty((0, H, D), np.float32),) * 2)
        assert c.layer_len(0) == 0


def test_torch_bfloat16_and_float16_tensors():
    torch = pytest.importorskip("torch")
    x = spread(4, seed=11)
    with make("bfloat16") as c:
        t = torch.from_numpy(x)
        c.store_batch(0, t.to(torch.bfloat16), t.to(torch.bfloat16))
        c.store_batch(1, t.to(torch.float16), t.to(torch.float16))
        np.testing.assert_array_equal(c.get(0)[0], x.astype(BF16).astype(np.float32))
        np.testing.assert_array_equal(c.get(1)[1], x.astype(np.float16).astype(BF16).astype(np.float32))
