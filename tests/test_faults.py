"""Capacity limits and disk faults: a clear error, nothing half-stored, nothing lost."""
import os
import textwrap

import pytest

import kvcache
from helpers import SHAPE, contents, rows, run_python, tiered

L, H, D = SHAPE["n_layers"], SHAPE["n_kv_heads"], SHAPE["head_dim"]
ROW = H * D * 4
BLOCK_BYTES = 2 * 4 * ROW  # keys + values of one 4-position block of one layer


def test_max_seq_len_bounds_positions_across_tiers():
    with tiered(max_seq_len=24) as c:
        c.store_layers(rows(24, layers=L), rows(24, layers=L))
        before = contents(c)
        with pytest.raises(kvcache.CacheFullError, match="exceed max_seq_len=24"):
            c.store(0, rows(1)[0], rows(1)[0])
        assert contents(c) == before


def test_max_cold_bytes_refuses_a_store_before_writing_anything():
    with tiered(max_cold_bytes=2 * L * BLOCK_BYTES) as c:  # two blocks per layer may go cold
        c.store_layers(rows(24, layers=L, seed=1), rows(24, layers=L, seed=2))  # 6 blocks: 2 cold
        assert c.stats()["cold_bytes_on_disk"] == 2 * L * BLOCK_BYTES
        before, stats = contents(c), c.stats()
        with pytest.raises(kvcache.CacheFullError, match="max_cold_bytes"):
            c.store_layers(rows(1, layers=L), rows(1, layers=L))  # block 6 would push one out
        with pytest.raises(kvcache.CacheFullError, match="max_cold_bytes"):
            c.store(1, rows(1)[0], rows(1)[0])
        assert contents(c) == before
        after = c.stats()
        for name in ("tokens_stored", "evictions", "bytes_to_cold", "cold_bytes_on_disk"):
            assert after[name] == stats[name]
        c.truncate(20)  # frees block 5 of RAM: room again
        c.store_layers(rows(4, layers=L), rows(4, layers=L))


def test_max_cold_bytes_with_persist_counts_every_position(tmp_path):
    with tiered(cold_dir=tmp_path / "c", persist=True, max_cold_bytes=L * 10 * 2 * ROW) as c:
        c.store_layers(rows(10, layers=L), rows(10, layers=L))
        with pytest.raises(kvcache.CacheFullError, match="max_cold_bytes"):
            c.store(0, rows(1)[0], rows(1)[0])
        c.flush()
        assert c.stats()["cold_bytes_on_disk"] == L * 10 * 2 * ROW


def test_an_unwritable_cold_dir_raises_an_oserror(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/kvcache-cold"  # root may write anywhere else
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "cold"
    with pytest.raises(kvcache.ColdStoreError, match="cannot use cold_dir") as exc:
        tiered(cold_dir=target)
    assert isinstance(exc.value, OSError) and exc.value.errno


def test_a_cold_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        tiered(cold_dir=f)


FILLER = textwrap.dedent("""
    import resource, signal, sys, numpy as np, kvcache
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of death
    L, H, D, limit = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    c = kvcache.TieredKVCache(n_layers=L, n_kv_heads=H, head_dim=D, max_seq_len=4096,
                              hot_tokens=16, block_tokens=4, cold_dir=sys.argv[5])
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    rng = np.random.default_rng(0)
    K = rng.standard_normal((L, 4096, H, D), dtype=np.float32)
    p = 0
    try:
        while True:
            c.store_layers(K[:, p:p + 3], -K[:, p:p + 3])
            p += 3
    except kvcache.ColdStoreError as exc:
        assert isinstance(exc, OSError) and exc.errno == 27, exc   # EFBIG
        assert "nothing was stored" in str(exc), exc
        err = str(exc)
    assert c.seq_len == p, (c.seq_len, p)
    for l in range(L):   # every token stored before the failure is intact
        k, v = c.get(l)
        assert k.tobytes() == K[l, :p].tobytes() and v.tobytes() == (-K[l, :p]).tobytes()
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    c.store_layers(K[:, p:p + 3], -K[:, p:p + 3])   # the disk has room again: it goes on
    assert c.get(0)[0].tobytes() == K[0, :p + 3].tobytes()
    print("ok", p, err)
""")


def test_a_disk_that_fills_mid_write_keeps_every_stored_token(tmp_path):
    limit = 4096 + 37 * ROW + 5  # cuts a block's write in the middle
    out = run_python("-c", FILLER, L, H, D, limit, tmp_path / "c")
    assert out.stdout.startswith("ok"), out.stdout
