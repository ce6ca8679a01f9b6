import numpy as np
import pytest

import kvcache

SHAPE = dict(n_layers=3, n_kv_heads=2, head_dim=5)


def rows(n, layers=None, seed=0, heads=SHAPE["n_kv_heads"], dim=SHAPE["head_dim"]):
    """Random float32 tokens, [n, H, D] (or [layers, n, H, D])."""
    rng = np.random.default_rng(seed)
    shape = (n, heads, dim) if layers is None else (layers, n, heads, dim)
    return rng.standard_normal(shape, dtype=np.float32)


@pytest.fixture
def cache():
    c = kvcache.TieredKVCache(max_seq_len=32, **SHAPE)
    yield c
    c.close()
