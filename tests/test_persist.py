"""Persistence: flush, close and reopen in a later process; crash survival; foreign files."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import crash_writer
import kvcache
from helpers import SHAPE, rows, run_python, tiered
from kvcache._format import HEADER_SIZE
from reference import roundtrip

L = SHAPE["n_layers"]


def make(d, **kw):
    return tiered(**{"max_seq_len": 200, "cold_dir": d, "persist": True, **kw})


def assert_layer(c, l, k, v):
    gk, gv = c.get(l)
    assert gk.tobytes() == k.tobytes() and gv.tobytes() == v.tobytes()


def test_close_flushes_and_open_restores_every_token(tmp_path):
    d = tmp_path / "c"
    k, v = rows(50, layers=L, seed=1), rows(50, layers=L, seed=2)
    with make(d) as c:
        c.store_layers(k, v)
        c.store(1, rows(3, seed=3), rows(3, seed=4))  # layers may differ in length
    with kvcache.TieredKVCache.open(d) as c:
        assert c.seq_len == 50 and c.layer_len(1) == 53
        assert c.config.hot_tokens == 16 and c.config.block_tokens == 4 and c.config.persist
        assert c.nbytes == 2 * L * 16 * SHAPE["n_kv_heads"] * SHAPE["head_dim"] * 4
        for l in (0, 2):
            assert_layer(c, l, k[l], v[l])
        assert_layer(c, 1, np.concatenate([k[1], rows(3, seed=3)]), np.concatenate([v[1], rows(3, seed=4)]))
        # the tail block comes back to RAM when a store continues it
        c.store_layers(rows(2, layers=L, seed=5), rows(2, layers=L, seed=6))
        assert_layer(c, 0, np.concatenate([k[0], rows(2, layers=L, seed=5)[0]]),
                     np.concatenate([v[0], rows(2, layers=L, seed=6)[0]]))
    with kvcache.TieredKVCache.open(d, hot_tokens=None) as c:  # now all in RAM
        assert c.seq_len == 52 and not c.config.tiered
        assert_layer(c, 2, np.concatenate([k[2], rows(2, layers=L, seed=5)[2]]),
                     np.concatenate([v[2], rows(2, layers=L, seed=6)[2]]))


@pytest.mark.parametrize("policy", ["lru", "adaptive", "h2o"])
def test_sinks_are_back_in_ram_after_open_the_rest_comes_lazily(tmp_path, policy):
    d = tmp_path / "c"
    with make(d, sink_tokens=5, eviction_policy=policy) as c:
        c.store_layers(rows(40, layers=L), rows(40, layers=L))
    with kvcache.TieredKVCache.open(d) as c:
        assert c._hot_tier()._debug_hot_blocks(0) == [0, 1]     # the sink blocks
        assert c.stats()["promotion_blocks"] == 2 * L
        c.store_layers(rows(30, layers=L), rows(30, layers=L))  # push other blocks through RAM
        assert c._hot_tier()._debug_hot_blocks(0)[:2] == [0, 1]


@pytest.mark.parametrize("flushed", [30, 0])
def test_only_flushed_positions_survive_a_lost_process(tmp_path, flushed):
    """A process lost before its first flush leaves an empty cache, not a stray directory."""
    d = tmp_path / "c"
    code = textwrap.dedent(f"""
        import os, numpy as np, kvcache
        c = kvcache.TieredKVCache(n_layers={L}, n_kv_heads={SHAPE['n_kv_heads']},
            head_dim={SHAPE['head_dim']}, max_seq_len=200, hot_tokens=16, block_tokens=4,
            cold_dir={str(d)!r}, persist=True)
        c.store_layers(np.ones(({L}, 30, {SHAPE['n_kv_heads']}, {SHAPE['head_dim']}), np.float32),
                       np.ones(({L}, 30, {SHAPE['n_kv_heads']}, {SHAPE['head_dim']}), np.float32))
        if {flushed}:
            c.flush()
        c.store_layers(np.zeros(({L}, 7, {SHAPE['n_kv_heads']}, {SHAPE['head_dim']}), np.float32),
                       np.zeros(({L}, 7, {SHAPE['n_kv_heads']}, {SHAPE['head_dim']}), np.float32))
        os._exit(0)  # no close, no flush
    """)
    run_python("-c", code)
    with kvcache.TieredKVCache.open(d) as c:
        assert [c.layer_len(l) for l in range(L)] == [flushed] * L
        assert (c.get(0)[0] == 1).all()
        c.store_layers(rows(5, layers=L), rows(5, layers=L))  # and it goes on from there
    with kvcache.TieredKVCache.open(d) as c:
        assert c.seq_len == flushed + 5


def test_truncate_below_the_flushed_length_is_made_durable(tmp_path):
    d = tmp_path / "c"
    k, v = rows(40, layers=L, seed=1), rows(40, layers=L, seed=2)
    c = make(d)
    c.store_layers(k, v)
    c.flush()
    c.truncate(10)
    k2, v2 = rows(20, layers=L, seed=3), rows(20, layers=L, seed=4)
    c.store_layers(k2, v2)  # overwrites positions 10.. in the files
    c._hot_tier().close()  # simulate a crash: no flush at close
    c.close()
    with kvcache.TieredKVCache.open(d) as c:
        assert c.seq_len == 10  # the truncate was flushed; the later stores were not
        assert_layer(c, 0, k[0, :10], v[0, :10])


def test_open_rejects_a_config_that_does_not_match(tmp_path):
    d = tmp_path / "c"
    with make(d) as c:
        c.store_layers(rows(5, layers=L), rows(5, layers=L))
    with pytest.raises(ValueError, match="holds head_dim=5, got head_dim=8"):
        kvcache.TieredKVCache.open(d, head_dim=8)
    with pytest.raises(ValueError, match="holds block_tokens=4, got block_tokens=8"):
        kvcache.TieredKVCache.open(d, block_tokens=8)
    with pytest.raises(ValueError, match="max_seq_len=3 is below the 5 positions"):
        kvcache.TieredKVCache.open(d, max_seq_len=3)
    with pytest.raises(TypeError, match="unknown config fields"):
        kvcache.TieredKVCache.open(d, colour="red")
    with kvcache.TieredKVCache.open(d, head_dim=5, eviction_policy="h2o") as c:
        assert c.seq_len == 5 and c.config.eviction_policy == "h2o"


def test_a_new_cache_refuses_a_persisted_directory(tmp_path):
    d = tmp_path / "c"
    with make(d) as c:
        c.store_layers(rows(5, layers=L), rows(5, layers=L))
    with pytest.raises(FileExistsError, match="TieredKVCache.open"):
        make(d)
    with kvcache.TieredKVCache.open(d) as c:
        assert c.seq_len == 5


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such cache directory"):
        kvcache.TieredKVCache.open(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a persisted kvcache directory"):
        kvcache.TieredKVCache.open(tmp_path)
    (tmp_path / "index.json").write_text("{}\n0\n")
    with pytest.raises(kvcache.CorruptionError, match="corrupt cache index"):
        kvcache.TieredKVCache.open(tmp_path)


def test_damaged_files_are_detected_at_open_or_on_read(tmp_path):
    d = tmp_path / "c"
    k, v = rows(30, layers=L, seed=1), rows(30, layers=L, seed=2)
    with make(d) as c:
        c.store_layers(k, v)
    # a header from another layer
    keys0, keys1 = d / "layer0000.keys", d / "layer0001.keys"
    h0, h1 = keys0.read_bytes()[:4096], keys1.read_bytes()[:4096]
    with open(keys0, "r+b") as f:
        f.write(h1)
    with pytest.raises(kvcache.CorruptionError, match="holds keys of layer 1, expected keys of layer 0"):
        kvcache.TieredKVCache.open(d)
    with open(keys0, "r+b") as f:
        f.write(h0)
    # a file shorter than the index says (the tail lost)
    size = os.path.getsize(d / "layer0002.values")
    os.truncate(d / "layer0002.values", size - 1)
    with pytest.raises(kvcache.CorruptionError, match="the index needs"):
        kvcache.TieredKVCache.open(d)
    with open(d / "layer0002.values", "ab") as f:
        f.write(b"\x00")  # right size, wrong last byte
    with kvcache.TieredKVCache.open(d) as c:
        assert_layer(c, 0, k[0], v[0])
        with pytest.raises(kvcache.CorruptionError, match="block 7 .*layer 2"):
            c.get(2)
    # the index itself edited by hand
    idx = d / "index.json"
    body, crc, _ = idx.read_text().rsplit("\n", 2)
    data = json.loads(body)
    data["layers"][0]["length"] = 31
    idx.write_text(json.dumps(data) + "\n" + crc + "\n")
    with pytest.raises(kvcache.CorruptionError, match="corrupt cache index"):
        kvcache.TieredKVCache.open(d)
    idx.write_text(body + "\n" + crc + "\nappended")
    with pytest.raises(kvcache.CorruptionError, match="bytes after the checksum line"):
        kvcache.TieredKVCache.open(d)


CRASH_CONFIGS = [("float32", 16), ("float16", 16), ("int8", 16), ("float32", None), ("bfloat16", 8)]


def test_sigkill_at_random_moments_leaves_a_flushed_prefix(tmp_path):
    """25 children, killed at random moments while storing (three ways),
    truncating and flushing, in every dtype, tiered or not: each directory
    reopens to exactly the state of a completed flush.  Rows written after it
    (evicted blocks, a flush cut short) are a tail the index does not cover:
    never returned, and overwritten by later stores."""
    rng = np.random.default_rng(2026)
    H, D = SHAPE["n_kv_heads"], SHAPE["head_dim"]
    tails = 0
    for trial in range(25):
        dtype, hot = CRASH_CONFIGS[trial % len(CRASH_CONFIGS)]
        d = tmp_path / f"c{trial}"
        args = [str(d), str(trial), dtype, str(hot).lower(), str(L), str(H), str(D)]
        with subprocess.Popen([sys.executable, str(Path(__file__).with_name("crash_writer.py")), *args],
                              stdout=subprocess.PIPE, text=True) as proc:
            first = proc.stdout.readline()  # at least one flush happened
            assert first.strip()
            time.sleep(float(rng.uniform(0, 0.2)))
            proc.send_signal(signal.SIGKILL)
            done = [int(first)] + [int(x) for x in proc.stdout.read().split()]
        # the last reported flush, or the next one if it completed before its line was printed
        candidates = crash_writer.states(trial, done[-1] + 1, (L, H, D))[done[-1]:]
        with kvcache.TieredKVCache.open(d) as c:
            n = c.seq_len
            assert [c.layer_len(l) for l in range(L)] == [n] * L
            # consecutive states differ in length (a step stores >= 1 position or truncates)
            (keys,) = [keys for keys in candidates if keys.shape[1] == n]
            for l in range(L):
                k, v = c.get(l)
                assert k.tobytes() == roundtrip(keys[l], dtype).tobytes(), (trial, l)
                assert v.tobytes() == roundtrip(-keys[l], dtype).tobytes(), (trial, l)
            row = c.config.cold_row_bytes
        tails += os.path.getsize(d / "layer0000.keys") > HEADER_SIZE + n * row
    assert tails > 0  # some kills did leave rows past the flushed length


def test_one_live_cache_per_directory(tmp_path):
    """A second cache on a directory in use is refused (flock), and the first
    one's files are untouched; close() lets go, even while views live on."""
    d = tmp_path / "c"
    k, v = rows(10, layers=L), rows(10, layers=L, seed=1)
    first = make(d)
    first.store_layers(k, v)
    first.flush()
    with pytest.raises(kvcache.ColdStoreError, match="in use by another open cache") as info:
        kvcache.TieredKVCache.open(d)
    assert info.value.errno == errno.EBUSY
    views = first.get(0, copy=False)
    first.close()
    with kvcache.TieredKVCache.open(d) as again:
        assert_layer(again, 0, k[0], v[0])
        assert views[0].tobytes() == k[0].tobytes()
    scratch = tmp_path / "s"
    with kvcache.TieredKVCache(max_seq_len=64, hot_tokens=16, block_tokens=4, cold_dir=scratch, **SHAPE):
        with pytest.raises(FileExistsError, match="not empty"):
            kvcache.TieredKVCache(max_seq_len=64, hot_tokens=16, block_tokens=4, cold_dir=scratch, **SHAPE)
        assert len(list(scratch.iterdir())) == 2 * L


def test_a_relative_cold_dir_stays_where_it_was_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere" / "c").mkdir(parents=True)  # the same relative name, another place
    c = make("c")
    c.store_layers(rows(5, layers=L), rows(5, layers=L))
    monkeypatch.chdir(tmp_path / "elsewhere")
    c.close()  # flushes the index: into tmp_path/c, not elsewhere/c
    assert (tmp_path / "c" / "index.json").exists()
    assert not os.listdir(tmp_path / "elsewhere" / "c")
    with kvcache.TieredKVCache.open(tmp_path / "c") as c:
        assert c.seq_len == 5
