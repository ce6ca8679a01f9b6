"""CacheConfig validation: every bad field is named, with what was expected and what came."""
import pytest

import kvcache
from kvcache import CacheConfig

BASE = dict(n_layers=2, n_kv_heads=2, head_dim=4, max_seq_len=16)


def test_defaults():
    c = CacheConfig(**BASE)
    assert c.hot_tokens is None and c.hot_capacity == 16
    assert (c.dtype, c.eviction_policy, c.sink_tokens, c.block_tokens, c.cold_dir) == (
        "float32", "lru", 0, 256, None)
    assert c.row_bytes == 2 * 4 * 4 and c.token_bytes == 2 * 2 * c.row_bytes


@pytest.mark.parametrize("field,value,exc,match", [
    ("n_layers", 0, ValueError, r"CacheConfig.n_layers: expected an int >= 1, got 0"),
    ("n_kv_heads", -3, ValueError, r"n_kv_heads: expected an int >= 1, got -3"),
    ("head_dim", 2.5, TypeError, r"head_dim: expected an int, got float 2.5"),
    ("max_seq_len", "16", TypeError, r"max_seq_len: expected an int, got str"),
    ("n_layers", True, TypeError, r"n_layers: expected an int, got bool"),
    ("hot_tokens", 17, ValueError, r"hot_tokens: expected at most max_seq_len=16, got 17"),
    ("hot_tokens", 0, ValueError, r"hot_tokens: expected an int >= 1, got 0"),
    ("sink_tokens", -1, ValueError, r"sink_tokens: expected an int >= 0, got -1"),
    ("sink_tokens", 17, ValueError, r"sink_tokens: expected at most hot_tokens=16, got 17"),
    ("block_tokens", 0, ValueError, r"block_tokens: expected an int >= 1, got 0"),
    ("dtype", "float64", ValueError, r"dtype: expected one of \('float32', 'float16', 'bfloat16', 'int8'\), got 'float64'"),
    ("eviction_policy", "fifo", ValueError, r"eviction_policy: expected one of .*got 'fifo'"),
    ("cold_dir", 3, TypeError, r"cold_dir: expected a path or None, got int"),
    ("threads", 0, ValueError, r"threads: expected an int >= 1, got 0"),
    ("prefault", 1, TypeError, r"prefault: expected a bool, got int"),
])
def test_bad_fields(field, value, exc, match):
    with pytest.raises(exc, match=match):
        CacheConfig(**{**BASE, field: value})


def test_numpy_ints_accepted():
    import numpy as np
    c = CacheConfig(n_layers=np.int64(2), n_kv_heads=2, head_dim=4, max_seq_len=np.int32(8))
    assert type(c.n_layers) is int and c.max_seq_len == 8


def test_cache_takes_config_or_keywords_not_both():
    cfg = CacheConfig(**BASE)
    with kvcache.TieredKVCache(cfg) as a, kvcache.TieredKVCache(**BASE) as b:
        assert a.config == b.config == cfg
    with pytest.raises(TypeError, match="either a CacheConfig or its keywords"):
        kvcache.TieredKVCache(cfg, n_layers=3)
    with pytest.raises(TypeError, match="expected a CacheConfig, got dict"):
        kvcache.TieredKVCache(BASE)
    with pytest.raises(TypeError):
        kvcache.TieredKVCache(**BASE, bogus=1)


def test_absurd_sizes_raise_memory_error():
    with pytest.raises(MemoryError, match="lower hot_tokens or max_seq_len"):
        kvcache.TieredKVCache(n_layers=1000, n_kv_heads=64, head_dim=256, max_seq_len=1 << 20)
    with pytest.raises(MemoryError):
        kvcache.TieredKVCache(n_layers=1, n_kv_heads=1 << 20, head_dim=1 << 20,
                              max_seq_len=1 << 22, prefault=False)
