"""Read benchmark: get() of each layer's whole context into preallocated outputs."""
import numpy as np

from _bench import measure, whole_context_sides

CONTEXT = 1024  # positions per layer: 8 MiB of keys and values per get, 256 MiB a step


def test_get_whole_context(benchmark, fresh_cache, numpy_cache, kv_inputs):
    """A step reads every layer's whole context (32 get calls) = CONTEXT tokens."""
    cache = fresh_cache
    k, v = kv_inputs(256)
    numpy_cache.reset()
    for _ in range(CONTEXT // 256):
        cache.store_layers(k, v)
        numpy_cache.store_batch(list(k), list(v), 256)
    assert cache.seq_len == CONTEXT and numpy_cache.pos == CONTEXT
    proj, numpy_copy, out = whole_context_sides(cache, numpy_cache, CONTEXT)
    ko, vo = out
    try:
        measure(benchmark, name=f"get whole context ({CONTEXT} pos) x32 layers",
                proj=proj, baselines=[numpy_copy])
        cache.get(5, 0, None, out=out)
        np.testing.assert_array_equal(ko[-256:], k[5])
        np.testing.assert_array_equal(vo[:256], v[5])
    finally:
        numpy_cache.reset()
