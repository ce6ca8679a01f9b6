"""store_layers on the native thread pool: exact results, fork safety, busy pool."""
import os
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import kvcache
from helpers import rows, run_python

# 8 layers x 4 heads x 64: a token is 16 KiB, so 128 tokens (2 MiB) go parallel
# and 1 token (16 KiB) stays on the calling thread.
SHAPE = dict(n_layers=8, n_kv_heads=4, head_dim=64)


def data(t, seed):
    return rows(t, layers=SHAPE["n_layers"], seed=seed, heads=SHAPE["n_kv_heads"], dim=SHAPE["head_dim"])


@pytest.mark.parametrize("threads", [1, 2, 3, 8, 64])
def test_parallel_store_layers_is_exact(threads):
    with kvcache.TieredKVCache(max_seq_len=300, threads=threads, **SHAPE) as c:
        k, v = data(128, 1), data(128, 2)
        c.store_layers(k, v)
        assert c._hot_tier().last_threads == min(threads, SHAPE["n_layers"])
        c.store_layers(k[:, :1], v[:, :1])            # small: the caller alone
        assert c._hot_tier().last_threads == 1
        c.store_layers(k[:, ::-1][:, 5:100], v[:, 3:98])  # strided, parallel
        for l in range(SHAPE["n_layers"]):
            gk, gv = c.get(l)
            np.testing.assert_array_equal(gk, np.concatenate([k[l], k[l, :1], k[l, ::-1][5:100]]))
            np.testing.assert_array_equal(gv, np.concatenate([v[l], v[l, :1], v[l, 3:98]]))


def test_concurrent_store_layers_callers_share_the_pool():
    # Several Python threads call store_layers on separate caches at once: one
    # gets the pool, the others run on their own thread; all results exact.
    def work(i):
        with kvcache.TieredKVCache(max_seq_len=128 * 6, threads=2, **SHAPE) as c:
            k, v = data(128, 10 + i), data(128, 20 + i)
            for _ in range(6):
                c.store_layers(k, v)
            for l in range(SHAPE["n_layers"]):
                gk, gv = c.get(l)
                np.testing.assert_array_equal(gk, np.tile(k[l], (6, 1, 1)))
                np.testing.assert_array_equal(gv, np.tile(v[l], (6, 1, 1)))
        return True

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(work, range(8)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_store_layers_works_in_a_forked_child():
    # GNU OpenMP hangs here; the pool restarts empty in the child.
    code = textwrap.dedent("""
        import os, numpy as np, kvcache
        shape = dict(n_layers=8, n_kv_heads=4, head_dim=64)
        k = np.ones((8, 128, 4, 64), np.float32)
        c = kvcache.TieredKVCache(max_seq_len=512, threads=2, **shape)
        c.store_layers(k, k)
        assert c._hot_tier().last_threads == 2
        pid = os.fork()
        if pid == 0:
            c2 = kvcache.TieredKVCache(max_seq_len=512, threads=2, **shape)
            c2.store_layers(k, 2 * k)
            c.store_layers(k, 3 * k)
            ok = (c2._hot_tier().last_threads == 2 and c.layer_len(7) == 256
                  and (c2.get(7)[1] == 2).all() and (c.get(3, 128)[1] == 3).all())
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        c.store_layers(k, k)
        print("child", os.waitstatus_to_exitcode(status), "parent", c.layer_len(0))
    """)
    r = run_python("-c", code, timeout=60)
    assert r.stdout.split() == ["child", "0", "parent", "256"]
