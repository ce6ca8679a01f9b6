"""Prefix-store benchmarks (issue #13): load, save and match against what bounds them.

Shape 32 x 8 x 128, float16 cache, ``block_tokens`` 256: a token is
32 x 8 x 128 x 2 B x 2 = 128 KiB and a 4096-token prefix 512 MiB (16 records
of 32 MiB).  Each step moves a whole prefix:

* ``load`` into an empty cache (emptied outside the timing) from the RAM tier,
  and from the disk tier with its pages in the page cache (``ram_bytes=0``:
  every load reads the files), vs the copy limit of the same bytes
  (``np.copyto`` into a prefaulted buffer, ``_benchkit.CopyLimit``).  A load
  checks every record (header, key, parent, token ids, CRC32C) before
  copying it, on the thread pool; the limit only copies.
* ``save`` of the whole prefix, copying every layer out of the cache into
  records and summing their CRC32C as it copies, vs the same limit: into a
  store at its RAM budget (the records of the prompt saved before are
  replaced, their buffers reused), and into a new store (fresh memory).
* ``match`` of a 32k-token prompt whose every block is stored (a store of a
  small shape: match's cost is the chain, not the rows) vs computing the
  chain's SHA-256 keys with hashlib alone.
"""
import hashlib

import numpy as np
import pytest

import kvcache
from _bench import N_HEADS, N_LAYERS, HEAD_DIM, measure
from kvcache._benchkit import LIMIT, CopyLimit, Side
from kvcache.prefix.keys import chain, token_ids

PREFIX = 4096
BLOCK = 256
DTYPE = "float16"
TOKEN_BYTES = 2 * N_LAYERS * N_HEADS * HEAD_DIM * 2  # 128 KiB


def new_cache(prefix):
    """An empty float16 cache of the benchmark shape with room for ``prefix`` + a block."""
    return kvcache.TieredKVCache(n_layers=N_LAYERS, n_kv_heads=N_HEADS, head_dim=HEAD_DIM,
                                 max_seq_len=prefix + BLOCK, block_tokens=BLOCK, dtype=DTYPE)


def filled_cache(prefix):
    """A float16 cache holding ``prefix`` + 1 positions of random KV, and the prompt's ids."""
    c = new_cache(prefix)
    rng = np.random.default_rng(13)
    for _ in range(prefix // BLOCK):
        k = rng.standard_normal((N_LAYERS, BLOCK, N_HEADS, HEAD_DIM), dtype=np.float32).astype(np.float16)
        c.store_layers(k, -k)
    one = np.ones((N_LAYERS, 1, N_HEADS, HEAD_DIM), np.float16)
    c.store_layers(one, one)
    return c, rng.integers(0, 128_000, prefix + 1)


@pytest.fixture(scope="module")
def source():
    """A float16 cache holding PREFIX + 1 positions of random KV, and the prompt's ids."""
    c, ids = filled_cache(PREFIX)
    yield c, ids
    c.close()


@pytest.fixture(scope="module")
def target():
    """The empty cache loads go into (prefaulted, like the limit's buffer)."""
    c = new_cache(PREFIX)
    yield c
    c.close()


@pytest.fixture(scope="module")
def limit():
    """The copy limit of a prefix's bytes: float16 rows copied as float32 pairs."""
    lim = CopyLimit(N_LAYERS, N_HEADS, HEAD_DIM // 2, PREFIX)
    rng = np.random.default_rng(1)
    k = rng.standard_normal((N_LAYERS, PREFIX, N_HEADS, HEAD_DIM // 2), dtype=np.float32)
    return lim.side(k, k.copy())


def same_rows(a, b, positions):
    """``b`` holds ``a``'s first ``positions`` (first and last layer), bit for bit."""
    for layer in (0, N_LAYERS - 1):
        ka, va = a.get(layer, 0, positions, raw=True)
        kb, vb = b.get(layer, 0, positions, raw=True)
        assert np.array_equal(ka.view(np.uint16), kb.view(np.uint16))
        assert np.array_equal(va.view(np.uint16), vb.view(np.uint16))


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_load(benchmark, source, target, limit, tmp_path, tier):
    """load of a PREFIX-token prefix (every record checked) vs the copy limit."""
    cache, ids = source
    options = dict(ram_bytes=1 << 30) if tier == "ram" else dict(ram_bytes=0, disk_dir=tmp_path / "p")
    store = kvcache.PrefixStore.for_cache(cache, "bench/model", **options)
    assert store.save(cache, ids) == PREFIX // BLOCK
    step = lambda: store.load(target, ids)  # noqa: E731
    measure(benchmark, name=f"prefix load {PREFIX} tokens from {tier}"
                            f"{' (pages cached)' if tier == 'disk' else ''}",
            proj=Side("kvcache", step, PREFIX, enter=target.reset),
            baselines=[limit], targets={LIMIT: 0.8 if tier == "ram" else 0.7},
            token_bytes=TOKEN_BYTES)
    target.reset()
    assert store.load(target, ids) == PREFIX  # ids hold PREFIX + 1 tokens
    same_rows(cache, target, PREFIX)
    s = store.stats()
    assert s["integrity_failures"] == 0 and s[f"hit_tokens_{tier}"] >= PREFIX
    store.close()


@pytest.mark.parametrize("state", ["full", "new"])
def test_save(benchmark, source, target, limit, state):
    """save of a PREFIX-token prefix vs the copy limit.  "full": a store whose RAM
    tier holds one prefix, saving two prompts in turn (each save's records
    replace the other prompt's: a serving store at its budget, which writes new
    records into recycled buffers); "new": into an empty new store each step
    (fresh memory, every page faulted in by the copy)."""
    cache, ids = source
    other = ids[::-1].copy()
    one = kvcache.PrefixStore.for_cache(cache, "bench/model", ram_bytes=1 << 30).layout.total
    prompts = [ids, other]
    stores = [kvcache.PrefixStore.for_cache(cache, "bench/model", ram_bytes=PREFIX // BLOCK * one)]

    def fresh():
        if state == "new":
            stores[:] = [kvcache.PrefixStore.for_cache(cache, "bench/model", ram_bytes=1 << 30)]
        prompts.reverse()

    def step():
        assert stores[0].save(cache, prompts[0]) == PREFIX // BLOCK

    measure(benchmark, name=f"prefix save {PREFIX} tokens to ram ({state} store)",
            proj=Side("kvcache", step, PREFIX, enter=fresh),
            baselines=[limit], targets={LIMIT: 0.7} if state == "full" else {},
            token_bytes=TOKEN_BYTES)
    store = stores[0]
    target.reset()
    assert store.load(target, prompts[0]) == PREFIX
    same_rows(cache, target, PREFIX)


def test_match_32k(benchmark):
    """match of a 32k-token prompt, every block stored, vs hashing its chain alone."""
    n, B = 32768, BLOCK
    small = kvcache.TieredKVCache(n_layers=1, n_kv_heads=1, head_dim=2, max_seq_len=n,
                                  block_tokens=B, dtype=DTYPE)
    small.store_layers(np.zeros((1, n, 1, 2), np.float16), np.zeros((1, n, 1, 2), np.float16))
    ids = np.random.default_rng(3).integers(0, 128_000, n)
    store = kvcache.PrefixStore.for_cache(small, "bench/model")
    assert store.save(small, ids) == n // B
    raw = token_ids(ids).tobytes()

    def hashing():
        parent = b"\0" * 32
        for i in range(n // B):
            parent = hashlib.sha256(parent + raw[4 * B * i:4 * B * (i + 1)]).digest()

    res = measure(benchmark, name="prefix match 32k tokens (median, us below)",
                  proj=Side("kvcache", lambda: store.match(ids), n),
                  baselines=[Side("sha-256 chain alone", hashing, n)], token_bytes=4)
    assert store.match(ids) == n
    assert chain(store.root, token_ids(ids), B) == kvcache.prefix_hashes(
        ids, model="bench/model", n_layers=1, n_kv_heads=1, head_dim=2, block_tokens=B, dtype=DTYPE)
    if res:
        us = res["rows"][0]["proj_median_s"] * 1e6
        benchmark.extra_info["match_us"] = us
        print(f"\nmatch of a 32k-token prompt: {us:.0f} us")
    store.close()
    small.close()
