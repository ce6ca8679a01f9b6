"""kvcache: a key/value cache for LLM inference on CPUs.

>>> import numpy as np, kvcache
>>> cache = kvcache.TieredKVCache(n_layers=2, n_kv_heads=2, head_dim=4, max_seq_len=16)
>>> cache.store(0, np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32))
>>> cache.layer_len(0)
1
"""
from kvcache._cache import TieredKVCache
from kvcache._simd import available_backends, set_simd_backend, simd_backend
from kvcache.config import CacheConfig
from kvcache.prefix import PrefixStore, prefix_hashes
from kvcache.errors import (
    CacheClosedError, CacheFullError, ColdStoreError, CorruptionError, KVCacheError, RemoteTierError,
)

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "TieredKVCache",
    "PrefixStore",
    "prefix_hashes",
    "CacheFullError",
    "CacheClosedError",
    "CorruptionError",
    "ColdStoreError",
    "RemoteTierError",
    "KVCacheError",
    "simd_backend",
    "available_backends",
    "set_simd_backend",
    "__version__",
]
