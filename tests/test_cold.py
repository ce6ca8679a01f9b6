"""The cold tier: spilling blocks to disk, reading them back, views, checksums, files."""
import gc
import os
import stat

import numpy as np
import pytest

import kvcache
from helpers import SHAPE, fill, flip_bits, rows, tiered

L, H, D = SHAPE["n_layers"], SHAPE["n_kv_heads"], SHAPE["head_dim"]
ROW = H * D * 4  # bytes of one position's keys (or values) in one layer


def test_a_context_longer_than_ram_keeps_every_token():
    with tiered() as c:
        k, v = fill(c, 60)
        assert c.seq_len == 60
        assert c.nbytes == 2 * L * 16 * ROW  # RAM stays at the hot budget
        for l in range(L):  # one store of 60: blocks 0..10 went cold, 11..14 stay
            assert c._hot_tier()._debug_hot_blocks(l) == [11, 12, 13, 14]
        s = c.stats()
        assert s["cold_bytes_on_disk"] == s["bytes_to_cold"] == 2 * L * ROW * 44
        assert (s["eviction_blocks"], s["evictions"]) == (11 * L, 44 * L)
        for l in range(L):
            gk, gv = c.get(l)
            assert gk.tobytes() == k[l].tobytes() and gv.tobytes() == v[l].tobytes()
        # any range, crossing tiers and block edges
        for a, b in [(0, 1), (3, 9), (15, 17), (40, 60), (59, 60), (0, 60)]:
            gk, gv = c.get(1, a, b)
            np.testing.assert_array_equal(gk, k[1, a:b])
            np.testing.assert_array_equal(gv, v[1, a:b])


def test_eviction_is_by_block_and_only_when_a_slot_is_needed():
    with tiered(eviction_policy="lru") as c:
        for t in range(16):  # fills the 4 hot slots exactly: nothing goes cold
            c.store_layers(rows(1, layers=L, seed=t), rows(1, layers=L, seed=t + 100))
        assert c.stats()["evictions"] == 0 and c.stats()["bytes_to_cold"] == 0
        c.store_layers(rows(1, layers=L), rows(1, layers=L))   # block 4 starts: block 0 goes
        s = c.stats()
        assert (s["eviction_blocks"], s["evictions"]) == (L, 4 * L)
        assert s["bytes_to_cold"] == s["cold_bytes_on_disk"] == 2 * 4 * ROW * L
        for t in range(3):  # the rest of block 4: no more eviction
            c.store_layers(rows(1, layers=L), rows(1, layers=L))
        assert c.stats()["eviction_blocks"] == L
        assert c._hot_tier()._debug_hot_blocks(0) == [1, 2, 3, 4]


def test_prefill_longer_than_the_hot_tier_in_one_call():
    with tiered() as c:
        k, v = rows(50, seed=3), rows(50, seed=4)
        c.store(2, k, v)
        np.testing.assert_array_equal(c.get(2)[0], k)
        np.testing.assert_array_equal(c.get(2)[1], v)


def test_stats_count_tokens_by_tier():
    with tiered(promote_on_read=False) as c:
        fill(c, 32)  # blocks 0..3 cold, 4..7 hot
        before = c.stats()
        c.get(0, 0, 10)
        c.get(0, 20, 30)
        s = c.stats()
        assert s["cold_hits"] - before["cold_hits"] == 10 + 0
        assert s["hot_hits"] - before["hot_hits"] == 10
        assert s["bytes_from_cold"] - before["bytes_from_cold"] == 2 * 10 * ROW
        assert s["tokens_read"] - before["tokens_read"] == 20


def test_lru_promotes_a_cold_block_read_back():
    with tiered(eviction_policy="lru") as c:
        k, v = fill(c, 32)
        assert c._hot_tier()._debug_hot_blocks(0) == [4, 5, 6, 7]
        np.testing.assert_array_equal(c.get(0, 4, 8)[0], k[0, 4:8])   # block 1
        assert c._hot_tier()._debug_hot_blocks(0) == [1, 5, 6, 7]     # 4 was least recent
        s = c.stats()
        assert (s["promotion_blocks"], s["promotions"]) == (1, 4)
        np.testing.assert_array_equal(c.get(0)[1], v[0])  # a scan: no promotion
        assert c.stats()["promotion_blocks"] == 1


def test_truncate_into_the_cold_tier_then_store_again():
    with tiered() as c:
        k, v = fill(c, 40)
        c.truncate(6)  # inside block 1, which is cold
        k2, v2 = rows(30, layers=L, seed=9), rows(30, layers=L, seed=10)
        c.store_layers(k2, v2)
        for l in range(L):
            np.testing.assert_array_equal(c.get(l)[0], np.concatenate([k[l, :6], k2[l]]))
            np.testing.assert_array_equal(c.get(l)[1], np.concatenate([v[l, :6], v2[l]]))
        on_disk = sum(r for l in range(L) for _, r, _, _ in c._hot_tier().block_table(l)[1])
        assert c.stats()["cold_bytes_on_disk"] == 2 * ROW * on_disk


def test_views_are_zero_copy_read_only_and_outlive_close():
    c = tiered()
    k, v = fill(c, 40)
    vk, vv = c.get(1, 2, 38, copy=False)
    assert not vk.flags.writeable and not vv.flags.writeable
    np.testing.assert_array_equal(vk, k[1, 2:38])
    np.testing.assert_array_equal(vv, v[1, 2:38])
    with pytest.raises(ValueError):
        vk[0, 0, 0] = 1
    with pytest.raises(ValueError, match="excludes raw=True and copy=False"):
        c.get(0, copy=False, out=(np.empty((40, H, D), np.float32),) * 2)
    c.close()
    gc.collect()
    np.testing.assert_array_equal(vk, k[1, 2:38])  # the mapping lives as long as the view


def test_views_of_an_all_in_ram_cache_are_views_of_its_arenas():
    c = kvcache.TieredKVCache(max_seq_len=16, **SHAPE)
    k, v = fill(c, 5)
    vk, vv = c.get(0, copy=False)
    np.testing.assert_array_equal(vk, k[0])
    np.testing.assert_array_equal(vv, v[0])
    assert not vk.flags.writeable and c._cold_dir() is None  # no file involved
    assert np.shares_memory(vk, c.get(0, 2, 4, copy=False)[0])  # the same memory, no copy
    c.store_layers(rows(1, layers=L, seed=9), rows(1, layers=L, seed=10))
    np.testing.assert_array_equal(c.get(0, copy=False)[0][5], rows(1, layers=L, seed=9)[0, 0])
    c.close()
    gc.collect()
    np.testing.assert_array_equal(vk, k[0])  # the arena lives as long as the view


def test_a_corrupted_cold_block_raises_naming_file_and_block(tmp_path):
    with tiered(cold_dir=tmp_path / "c", promote_on_read=False) as c:
        fill(c, 40)
        path = tmp_path / "c" / "layer0001.values"
        flip_bits(path, 4096 + 9 * ROW + 3, 0x10)  # position 9: block 2
        c.get(1, 0, 8)  # blocks 0 and 1 are intact
        with pytest.raises(kvcache.CorruptionError, match="block 2 .*layer 1") as exc:
            c.get(1, 8, 12)
        assert isinstance(exc.value, OSError) and "layer0001" in str(exc.value)
        with pytest.raises(kvcache.CorruptionError):
            c.get(1, copy=False)
        c.get(0)  # other layers unaffected


def test_cold_files_have_a_header_and_private_permissions(tmp_path):
    d = tmp_path / "cold"
    with tiered(cold_dir=d) as c:
        fill(c, 30)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        names = sorted(os.listdir(d))
        assert names == sorted(f"layer{l:04d}.{k}" for l in range(L) for k in ("keys", "values"))
        for name in names:
            assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600
            head = (d / name).read_bytes()[:64]
            assert head.startswith(b"KVCACHE\x00")
    assert not d.exists()  # scratch directory created by the cache: removed on close


def test_private_temporary_directory_is_removed_on_close_and_gc():
    fds = len(os.listdir("/proc/self/fd"))
    c = tiered()
    fill(c, 30)
    path = c._cold_dir()
    assert os.path.isdir(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o700
    c.close()
    assert not os.path.exists(path)
    c = tiered()
    fill(c, 30)
    path = c._cold_dir()
    del c
    gc.collect()
    assert not os.path.exists(path)
    assert len(os.listdir("/proc/self/fd")) <= fds  # every cold file closed


def test_cold_dir_must_be_empty_or_absent(tmp_path):
    (tmp_path / "x").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        tiered(cold_dir=tmp_path)
    assert (tmp_path / "x").read_text() == "mine"
    with pytest.raises(NotADirectoryError):
        tiered(cold_dir=tmp_path / "x")


def test_hot_tokens_must_be_whole_blocks():
    with pytest.raises(ValueError, match="hot_tokens: expected a multiple of block_tokens=4, got 10"):
        tiered(hot_tokens=10)
    with pytest.raises(ValueError, match=r"hot_tokens: expected at least 12 \(sink blocks \+ 2"):
        tiered(hot_tokens=8, sink_tokens=3)


def test_threads_store_and_read_across_tiers_exactly():
    """Writers (one per layer, random batch sizes) race readers (copies and views)
    while blocks move between tiers: every read sees whole, correct tokens."""
    from concurrent.futures import ThreadPoolExecutor

    n_layers, total = 6, 400
    shape = dict(n_kv_heads=2, head_dim=8)
    c = kvcache.TieredKVCache(n_layers=n_layers, max_seq_len=total, hot_tokens=24, block_tokens=4,
                              sink_tokens=2, **shape)
    row = 2 * 8 * 4

    def token(l, p):  # every float of a position encodes (layer, position)
        return np.full((2, 8), l * 10000 + p, np.float32)

    def writer(l):
        rng = np.random.default_rng(l)
        p = 0
        while p < total:
            n = int(min(total - p, rng.integers(1, 9)))
            ks = np.stack([token(l, q) for q in range(p, p + n)])
            c.store(l, ks, -ks)
            p += n
        return 0

    def reader(seed):
        rng = np.random.default_rng(seed)
        read = 0
        for _ in range(150):
            l = int(rng.integers(n_layers))
            n = c.layer_len(l)
            a = int(rng.integers(0, n + 1))
            b = int(rng.integers(a, n + 1))
            k, v = c.get(l, a, b, copy=bool(rng.integers(2)))
            want = np.arange(a, b, dtype=np.float32) + l * 10000
            assert np.array_equal(k[:, 0, 0], want) and np.array_equal(k.min(axis=(1, 2)), want)
            assert np.array_equal(v.max(axis=(1, 2)), -want)
            read += b - a
        return read

    with ThreadPoolExecutor(max_workers=10) as pool:
        writes = [pool.submit(writer, l) for l in range(n_layers)]
        reads = [pool.submit(reader, s) for s in range(4)]
        read = sum(f.result() for f in reads)
        for f in writes:
            f.result()
    for l in range(n_layers):
        k, v = c.get(l)
        read += total
        assert np.array_equal(k, np.stack([token(l, p) for p in range(total)]))
        assert np.array_equal(v, -k)
    s = c.stats()
    assert s["tokens_stored"] == n_layers * total and s["tokens_read"] == read
    assert s["hot_hits"] + s["cold_hits"] == read
    on_disk = sum(r for l in range(n_layers) for _, r, _, _ in c._hot_tier().block_table(l)[1])
    assert s["cold_bytes_on_disk"] == 2 * row * on_disk
    assert s["eviction_blocks"] > 0 and s["promotion_blocks"] > 0
    for l in range(n_layers):
        assert 0 in c._hot_tier()._debug_hot_blocks(l)  # the sink block never left
    c.close()


def test_a_decode_step_that_evicts_runs_on_the_pool():
    # One token is far below the parallel threshold, but the step that starts a
    # block writes a block of every layer to disk: worth the threads.
    with tiered(threads=2) as c:
        fill(c, 16)
        c.store_layers(rows(1, layers=L), rows(1, layers=L))   # block 4: evicts block 0 everywhere
        assert c._hot_tier().last_threads == 2
        c.store_layers(rows(1, layers=L), rows(1, layers=L))   # inside block 4: nothing moves
        assert c._hot_tier().last_threads == 1
