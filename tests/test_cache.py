"""TieredKVCache behaviour against plain numpy: stores, reads, positions, errors."""
import numpy as np
import pytest

import kvcache
from helpers import SHAPE, contents, rows

L, H, D = SHAPE["n_layers"], SHAPE["n_kv_heads"], SHAPE["head_dim"]


def test_store_one_token_and_batches(cache):
    k, v = rows(6, seed=1), rows(6, seed=2)
    cache.store(0, k[0], v[0])            # [H, D]
    cache.store(0, k[1:4], v[1:4])        # [T, H, D]
    cache.store_batch(0, k[4:], v[4:])
    gk, gv = cache.get(0)
    np.testing.assert_array_equal(gk, k)
    np.testing.assert_array_equal(gv, v)
    assert cache.layer_len(0) == 6 and cache.layer_len(1) == 0 and cache.seq_len == 0


def test_layers_have_their_own_cursor(cache):
    # Pitfall 1 of the origin: per-layer stores must not share or skip positions.
    for l in range(L):
        for t in range(l + 1):
            cache.store(l, rows(1, seed=10 * l + t)[0], rows(1, seed=100 + 10 * l + t)[0])
    assert [cache.layer_len(l) for l in range(L)] == [1, 2, 3]
    assert cache.seq_len == 1
    for l in range(L):
        gk, gv = cache.get(l)
        want_k = np.stack([rows(1, seed=10 * l + t)[0] for t in range(l + 1)])
        np.testing.assert_array_equal(gk, want_k)


def test_store_layers_appends_each_layer_at_its_cursor(cache):
    cache.store(1, rows(2, seed=3), rows(2, seed=4))
    k, v = rows(5, layers=L, seed=5), rows(5, layers=L, seed=6)
    cache.store_layers(k, v)
    assert [cache.layer_len(l) for l in range(L)] == [5, 7, 5]
    np.testing.assert_array_equal(cache.get(1)[0][2:], k[1])
    np.testing.assert_array_equal(cache.get(2)[1], v[2])


def test_strided_leading_dims_are_accepted(cache):
    big = rows(20, layers=6, seed=7)
    k = big[::2, ::3]            # strides on both leading axes
    v = big[::-2, 1::3]          # negative stride too
    cache.store_layers(k, v)
    for l in range(L):
        gk, gv = cache.get(l)
        np.testing.assert_array_equal(gk, k[l])
        np.testing.assert_array_equal(gv, v[l])
    b = rows(9, seed=8)[::4]
    cache.store(0, b, b)
    np.testing.assert_array_equal(cache.get(0, -3)[0], b)


def test_broadcast_token_is_stored_per_position(cache):
    tok = rows(1, seed=9)[0]
    batch = np.broadcast_to(tok, (4, H, D))   # stride 0 on the token axis
    cache.store_batch(2, batch, batch)
    np.testing.assert_array_equal(cache.get(2)[0], np.stack([tok] * 4))


def test_nan_inf_and_negative_zero_are_data(cache):
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38, -1.0, 0.0, 2.0, 5.0],
                 np.float32).reshape(1, H, D)
    x.view(np.uint32)[0, 0, 0] = 0x7FC12345  # a NaN payload
    cache.store(0, x, x[::-1])
    gk, gv = cache.get(0)
    assert gk.view(np.uint32).tobytes() == x.view(np.uint32).tobytes()
    assert gv.view(np.uint32).tobytes() == x[::-1].view(np.uint32).tobytes()


def test_get_ranges(cache):
    k, v = rows(10, seed=11), rows(10, seed=12)
    cache.store(1, k, v)
    for start, stop in [(0, None), (3, 7), (0, 0), (10, 10), (-4, None), (2, -2), (None, 5)]:
        gk, gv = cache.get(1, start, stop)
        np.testing.assert_array_equal(gk, k[start:stop])
        np.testing.assert_array_equal(gv, v[start:stop])
        assert gk.shape[1:] == (H, D) and gk.dtype == np.float32 and gk.flags.c_contiguous


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(start=5, stop=3), ValueError, "expected start <= stop, got start=5 > stop=3"),
    (dict(stop=11), IndexError, "stop=11 is outside the 10 positions stored"),
    (dict(start=-11), IndexError, "start=-11 is outside the 10 positions stored"),
    (dict(start=1 << 70), IndexError, "outside the 10 positions"),
    (dict(start=1.0), TypeError, "start expected an int or None, got float"),
    (dict(stop="3"), TypeError, "stop expected an int or None, got str"),
])
def test_get_bad_ranges(cache, kwargs, exc, match):
    cache.store(1, rows(10), rows(10))
    with pytest.raises(exc, match=match):
        cache.get(1, **kwargs)


def test_get_out_fills_callers_arrays(cache):
    k, v = rows(8, seed=13), rows(8, seed=14)
    cache.store(0, k, v)
    ko = np.full((5, H, D), -1, np.float32)
    vbig = np.zeros((5, 2, H, D), np.float32)
    vo = vbig[:, 1]                         # strided rows are fine for out too
    res = cache.get(0, 2, 7, out=(ko, vo))
    assert res[0] is ko and res[1] is vo
    np.testing.assert_array_equal(ko, k[2:7])
    np.testing.assert_array_equal(vbig[:, 1], v[2:7])
    assert not vbig[:, 0].any()


@pytest.mark.parametrize("make_out,exc,match", [
    (lambda: (np.zeros((4, H, D), np.float32),) * 2, ValueError, "out: keys_out and values_out overlap"),
    (lambda: (np.zeros((3, H, D), np.float32), np.zeros((4, H, D), np.float32)),
     ValueError, r"out\[0\]: expected shape \[4, 2, 5\], got \[3, 2, 5\]"),
    (lambda: (np.zeros((4, H, D), np.float64), np.zeros((4, H, D), np.float32)),
     TypeError, r"out\[0\]: expected dtype float32, got float64"),
    (lambda: (np.zeros((4, H, D), np.float32), np.zeros((4, H, D), np.float32).T.copy().T),
     ValueError, r"out\[1\]: expected the last two dimensions \[2, 5\] to be C-contiguous"),
    (lambda: np.zeros((2, 4, H, D), np.float32), TypeError, r"out: expected a \(keys_out, values_out\) pair"),
    (lambda: [np.zeros((4, H, D), np.float32)], TypeError, "expected a .keys_out, values_out. pair"),
])
def test_get_bad_out(cache, make_out, exc, match):
    cache.store(0, rows(4), rows(4))
    with pytest.raises(exc, match=match):
        cache.get(0, out=make_out())


def test_get_read_only_out(cache):
    cache.store(0, rows(4), rows(4))
    ko, vo = np.zeros((4, H, D), np.float32), np.zeros((4, H, D), np.float32)
    vo.flags.writeable = False
    with pytest.raises(ValueError, match=r"out\[1\]: expected a writable array, got a read-only one"):
        cache.get(0, out=(ko, vo))
    assert not vo.any()


BAD_INPUTS = [
    (lambda k: k.astype(np.float64), TypeError, "keys: expected dtype float32, float16 or bfloat16, got float64"),
    (lambda k: k.astype(np.int32), TypeError, "keys: expected dtype float32, float16 or bfloat16, got int32"),
    (lambda k: k.astype(">f4"), TypeError, "expected dtype float32, float16 or bfloat16, got >f4"),
    (lambda k: k.tolist(), TypeError, "keys: expected a float32 array .*got list"),
    (lambda k: None, TypeError, "keys: expected a float32 array .*got NoneType"),
    (lambda k: k.tobytes(), TypeError, "got bytes"),
    (lambda k: 1.5, TypeError, "got float"),
    (lambda k: k[..., :4], ValueError, r"keys: expected shape .*\[T, 2, 5\] \(rank 3\), got \[3, 2, 4\]"),
    (lambda k: k.reshape(3, 10), ValueError, r"expected shape .*\[T, 2, 5\] \(rank 3\), got \[3, 10\]"),
    (lambda k: k[None], ValueError, r"got \[1, 3, 2, 5\]"),
    (lambda k: np.asfortranarray(k), ValueError, "to be C-contiguous"),
    (lambda k: np.repeat(k, 2, axis=2)[:, :, ::2], ValueError, "to be C-contiguous"),
    (lambda k: k[:0], ValueError, "keys: expected at least one token, got 0"),
    (lambda k: np.frombuffer(b"\0" + k.tobytes(), np.float32, offset=1).reshape(k.shape),
     ValueError, "misaligned"),
]


@pytest.mark.parametrize("bad,exc,match", BAD_INPUTS)
@pytest.mark.parametrize("method", ["store", "store_batch"])
def test_bad_inputs_raise_and_change_nothing(cache, bad, exc, match, method):
    cache.store_layers(rows(2, layers=L), rows(2, layers=L, seed=1))
    before = contents(cache)
    k = rows(3, seed=20)
    with pytest.raises(exc, match=match):
        getattr(cache, method)(1, bad(k), k)
    with pytest.raises(exc, match=match.replace("keys", "values")):
        getattr(cache, method)(1, k, bad(k))
    assert contents(cache) == before


def test_mismatched_keys_and_values(cache):
    with pytest.raises(ValueError, match="values: expected 3 tokens like keys, got 2"):
        cache.store(0, rows(3), rows(2))
    with pytest.raises(ValueError, match=r"values: expected 3 tokens like keys, got 1"):
        cache.store(0, rows(3), rows(1)[0])
    with pytest.raises(ValueError, match=r"values: expected shape \[T, 2, 5\] \(rank 3\), got \[2, 5\]"):
        cache.store_batch(0, rows(3), rows(1)[0])
    with pytest.raises(ValueError, match=r"keys: expected shape \[2, 5\] or \[T, 2, 5\] \(rank 3\), got \[1, 1, 2, 5\]"):
        cache.store(0, rows(1)[None], rows(1))
    with pytest.raises(ValueError, match="expected 3 layers on axis 0, got 3 and 2"):
        cache.store_layers(rows(2, layers=3), rows(2, layers=2))
    with pytest.raises(ValueError, match="values: expected 2 tokens like keys, got 1"):
        cache.store_layers(rows(2, layers=3), rows(1, layers=3))
    with pytest.raises(ValueError, match=r"keys: expected shape \[n_layers, T, 2, 5\] \(rank 4\)"):
        cache.store_layers(rows(2), rows(2))
    assert cache.stats()["tokens_stored"] == 0


@pytest.mark.parametrize("layer,exc,match", [
    (3, IndexError, r"layer: expected 0 <= layer < 3, got 3"),
    (-1, IndexError, r"got -1"),
    (1 << 80, IndexError, "layer: expected 0 <= layer < 3"),
    (1.0, TypeError, "layer: expected an int, got float"),
    ("0", TypeError, "got str"),
    (None, TypeError, "got NoneType"),
    (True, TypeError, "got bool"),
])
def test_bad_layer(cache, layer, exc, match):
    for call in (lambda: cache.store(layer, rows(1)[0], rows(1)[0]),
                 lambda: cache.store_batch(layer, rows(1), rows(1)),
                 lambda: cache.get(layer), lambda: cache.layer_len(layer)):
        with pytest.raises(exc, match=match):
            call()


def test_numpy_integer_layer(cache):
    cache.store(np.int64(2), rows(1)[0], rows(1)[0])
    assert cache.layer_len(np.uint8(2)) == 1


def test_overflow_raises_cache_full_and_keeps_data():
    with kvcache.TieredKVCache(max_seq_len=8, **SHAPE) as c:
        c.store(0, rows(6), rows(6, seed=1))
        before = contents(c)
        with pytest.raises(kvcache.CacheFullError,
                           match=r"layer 0 holds 6 positions; 3 more would exceed max_seq_len=8"):
            c.store(0, rows(3), rows(3))
        assert isinstance(kvcache.CacheFullError(), ValueError)
        assert contents(c) == before
        c.store(0, rows(2, seed=5), rows(2, seed=6))   # exactly full is fine
        assert c.layer_len(0) == 8
        # store_layers is all or nothing: layer 0 is full, so layers 1 and 2 get nothing either.
        before = contents(c)
        with pytest.raises(kvcache.CacheFullError, match="layer 0 holds 8 positions; 1 more"):
            c.store_layers(rows(1, layers=L), rows(1, layers=L))
        assert contents(c) == before
        assert c.stats()["tokens_stored"] == 8


def test_truncate_and_reset(cache):
    k, v = rows(6, layers=L, seed=30), rows(6, layers=L, seed=31)
    cache.store_layers(k, v)
    cache.store(2, rows(2), rows(2))
    cache.truncate(7)                      # only layer 2 is longer than 7... it holds 8
    assert [cache.layer_len(l) for l in range(L)] == [6, 6, 7]
    cache.truncate(4)
    assert cache.seq_len == 4
    np.testing.assert_array_equal(cache.get(2)[0], k[2, :4])
    cache.store_layers(k[:, 4:5], v[:, 4:5])  # rollback then re-append
    np.testing.assert_array_equal(cache.get(0)[1], v[0, :5])
    cache.truncate(100)
    assert cache.seq_len == 5
    with pytest.raises(ValueError, match="truncate: expected n >= 0, got -1"):
        cache.truncate(-1)
    with pytest.raises(TypeError, match="truncate: expected an int, got float"):
        cache.truncate(2.0)
    stored = cache.stats()["tokens_stored"]
    cache.reset()
    assert cache.seq_len == 0 and cache.get(0)[0].shape == (0, H, D)
    assert cache.stats()["tokens_stored"] == stored   # lifetime counters survive reset


def test_stats_count_rows_and_bytes(cache):
    row = H * D * 4
    cache.store_layers(rows(4, layers=L), rows(4, layers=L))
    cache.store(1, rows(2), rows(2))
    cache.get(1, 1, 5)
    cache.get(0, out=(np.empty((4, H, D), np.float32), np.empty((4, H, D), np.float32)))
    s = cache.stats()
    assert s == {"tokens_stored": 4 * L + 2, "bytes_stored": 2 * row * (4 * L + 2),
                 "tokens_read": 8, "bytes_read": 2 * row * 8, "hot_hits": 8,
                 "cold_hits": 0, "evictions": 0, "eviction_blocks": 0, "promotions": 0,
                 "promotion_blocks": 0, "bytes_to_cold": 0, "bytes_from_cold": 0,
                 "cold_bytes_on_disk": 0}


class ArrayInterfaceOnly:
    """Exports only __array_interface__ (like some foreign tensor types)."""

    def __init__(self, arr):
        self._arr = arr
        self.__array_interface__ = arr.__array_interface__


def test_foreign_array_types_are_viewed_without_copy(cache):
    k, v = rows(3, seed=40), rows(3, seed=41)
    cache.store(0, ArrayInterfaceOnly(k), memoryview(v))
    np.testing.assert_array_equal(cache.get(0)[0], k)
    np.testing.assert_array_equal(cache.get(0)[1], v)
    ko, vo = np.empty((3, H, D), np.float32), np.empty((3, H, D), np.float32)
    cache.get(0, out=(ArrayInterfaceOnly(ko), memoryview(vo)))
    np.testing.assert_array_equal(ko, k)
    np.testing.assert_array_equal(vo, v)
    with pytest.raises(TypeError, match="expected dtype float32, float16 or bfloat16, got float64"):
        cache.store(0, memoryview(k.astype(np.float64)), v)
    with pytest.raises(ValueError, match="writable"):
        cache.get(0, out=(ko, memoryview(bytes(vo.nbytes)).cast("f").cast("B").cast("f")))


def test_torch_tensors_in_and_out(cache):
    torch = pytest.importorskip("torch")
    k, v = torch.randn(4, H, D), torch.randn(4, H, D)
    cache.store(1, k, v)
    cache.store_layers(torch.randn(L, 2, H, D)[:, :, :, :], torch.randn(L, 2, H, D))
    ko, vo = torch.empty(4, H, D), torch.empty(4, H, D)
    cache.get(1, 0, 4, out=(ko, vo))
    assert torch.equal(ko, k) and torch.equal(vo, v)
    with pytest.raises(TypeError, match="float32"):
        cache.store(1, k.double(), v)
    with pytest.raises(TypeError, match="cannot view Tensor"):
        cache.store(1, k.requires_grad_(), v)
    with pytest.raises(ValueError, match="C-contiguous"):
        cache.store(1, torch.randn(4, D, H).transpose(1, 2), v)
    assert cache.layer_len(1) == 6


def test_threads_property(cache):
    assert cache.threads == kvcache.config.usable_cores()
    cache.threads = 1
    assert cache.threads == 1
    with pytest.raises(ValueError, match="threads: expected an int >= 1, got 0"):
        cache.threads = 0
    k, v = rows(3, layers=L), rows(3, layers=L, seed=1)
    cache.store_layers(k, v)
    np.testing.assert_array_equal(cache.get(2)[0], k[2])
