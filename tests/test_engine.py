"""The engine's structure and its error records (issue #12): errors carried up once,
messages that say what happened (on a real full file system), exact statistics of
promoted reads, a strict index, and one concept per module."""
import errno
import importlib
import os
import pathlib
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

import kvcache
from conftest import SHAPE, rows
from kvcache._cold import _fail_writes
from kvcache._policy import POLICIES

H, D = SHAPE["n_kv_heads"], SHAPE["head_dim"]
ROOT = pathlib.Path(__file__).resolve().parent.parent


# -- errors carried up once --------------------------------------------------------
def test_a_failed_write_keeps_its_errno_while_another_thread_writes():
    """Two threads store into one layer; every store evicts a block.  The first
    thread's cold writes fail (ENOSPC), the second's succeed.  Each failure must
    report its own errno: an errno kept in the layer's shared state was cleared
    by the other thread's eviction in between (ColdStoreError(0, "Success"))."""
    c = kvcache.TieredKVCache(n_layers=1, n_kv_heads=H, head_dim=D, max_seq_len=20000,
                              hot_tokens=2, block_tokens=1)
    rounds = 1500
    tokens = rows(rounds + 2, seed=3)
    c.store_batch(0, tokens[:2], -tokens[:2])  # both slots taken by blocks not yet on disk
    failures, problems = [], []
    start = threading.Barrier(2)

    def failing():
        _fail_writes(errno.ENOSPC)
        try:
            start.wait()
            for _ in range(rounds):
                try:
                    c.store(0, tokens[0], tokens[0])
                    problems.append("a store whose eviction had to write succeeded")
                except kvcache.ColdStoreError as exc:
                    failures.append(exc)
        finally:
            _fail_writes(0)

    def succeeding():
        start.wait()
        for i in range(2, rounds + 2):
            c.store(0, tokens[i], -tokens[i])

    threads = [threading.Thread(target=failing), threading.Thread(target=succeeding)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems and len(failures) == rounds
    for exc in failures:
        assert exc.errno == errno.ENOSPC, exc
        assert os.strerror(errno.ENOSPC) in str(exc) and "(nothing was stored)" in str(exc), exc
        assert exc.filename and os.path.basename(exc.filename).startswith("layer0000.")
    k, v = c.get(0)  # the failing stores stored nothing; the other thread's are all there
    assert k.tobytes() == tokens.tobytes() and v.tobytes() == (-tokens).tobytes()
    c.close()


@pytest.fixture
def full_fs(tmp_path):
    """A 6 MiB tmpfs mounted for the test (root only)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(path):
    """Fill the file system holding ``path`` with a filler file until ENOSPC."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


SHAPE_FS = dict(n_layers=2, n_kv_heads=4, head_dim=64)  # a row: 1 KiB; a token: 4 KiB


def test_a_full_file_system_stops_a_store_and_keeps_every_token(full_fs):
    K = rows(4096, layers=2, seed=1, heads=4, dim=64)
    with kvcache.TieredKVCache(**SHAPE_FS, max_seq_len=4096, hot_tokens=64, block_tokens=16,
                               cold_dir=full_fs / "c") as c:
        p = 0
        with pytest.raises(kvcache.ColdStoreError) as info:
            while True:
                c.store_layers(K[:, p:p + 8], -K[:, p:p + 8])
                p += 8
        exc = info.value
        assert exc.errno == errno.ENOSPC
        assert exc.strerror.startswith("cannot write the cold ")
        assert "No space left on device (nothing was stored)" in str(exc), str(exc)
        assert exc.filename.startswith(str(full_fs / "c" / "layer000"))
        assert c.seq_len == p
        for layer in range(2):
            k, v = c.get(layer)
            assert k.tobytes() == K[layer, :p].tobytes() and v.tobytes() == (-K[layer, :p]).tobytes()


def test_a_flush_that_cannot_write_says_the_stores_stay(full_fs):
    K = rows(2048, layers=2, seed=2, heads=4, dim=64)  # 8 MiB: more than the file system holds
    with kvcache.TieredKVCache(**SHAPE_FS, max_seq_len=2048, block_tokens=16,
                               cold_dir=full_fs / "c", persist=True) as c:
        c.store_layers(K, -K)  # into RAM: succeeds
        with pytest.raises(kvcache.ColdStoreError) as info:
            c.flush()
        msg = str(info.value)
        assert info.value.errno == errno.ENOSPC
        assert info.value.strerror.startswith("flush: cannot write the cold "), msg
        assert "nothing was stored" not in msg
        assert "every position stored stays readable" in msg
        for layer in range(2):
            k, v = c.get(layer)
            assert k.tobytes() == K[layer].tobytes() and v.tobytes() == (-K[layer]).tobytes()
        c.truncate(0)  # lets close() write an index that fits


def test_closing_an_unchanged_reopened_cache_writes_nothing(full_fs):
    d = full_fs / "c"
    K = rows(100, layers=2, seed=4, heads=4, dim=64)
    with kvcache.TieredKVCache(**SHAPE_FS, max_seq_len=256, hot_tokens=64, block_tokens=16,
                               cold_dir=d, persist=True) as c:
        c.store_layers(K, -K)
    index = (d / "index.json").read_bytes()
    fill(full_fs / "filler")
    c = kvcache.TieredKVCache.open(d)
    for layer in range(2):
        assert c.get(layer)[0].tobytes() == K[layer].tobytes()
    c.flush()  # nothing changed: nothing to write, no ENOSPC
    c.close()
    assert (d / "index.json").read_bytes() == index
    assert not (d / "index.json.tmp").exists()


# -- statistics of promoted reads --------------------------------------------------
@pytest.mark.parametrize("promote", [True, False])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_read_of_a_cold_block_is_a_cold_hit_whether_or_not_it_is_promoted(policy, promote):
    B, T = 16, 256
    c = kvcache.TieredKVCache(n_layers=1, **{k: SHAPE[k] for k in ("n_kv_heads", "head_dim")},
                              max_seq_len=512, hot_tokens=64, block_tokens=B,
                              eviction_policy=policy, promote_on_read=promote)
    K = rows(T, seed=5)
    c.store(0, K, -K)
    hot = c._hot_tier()._debug_hot_blocks(0)
    assert 0 not in hot and hot == [12, 13, 14, 15]
    row = H * D * 4
    promotes = promote and POLICIES[policy].promotes

    def read(a, b):
        before = c.stats()
        k, v = c.get(0, a, b)
        assert k.tobytes() == K[a:b].tobytes() and v.tobytes() == (-K[a:b]).tobytes()
        after = c.stats()
        return {name: after[name] - before[name] for name in after}

    d = read(0, B)  # the oldest block: cold when read
    assert (d["cold_hits"], d["hot_hits"], d["tokens_read"]) == (B, 0, B)
    assert d["bytes_from_cold"] == 2 * B * row
    assert (d["promotions"], d["promotion_blocks"]) == ((B, 1) if promotes else (0, 0))
    assert (0 in c._hot_tier()._debug_hot_blocks(0)) == promotes
    d = read(0, B)  # again: from RAM only if it was promoted
    assert (d["cold_hits"], d["hot_hits"]) == ((0, B) if promotes else (B, 0))
    assert d["bytes_from_cold"] == (0 if promotes else 2 * B * row)
    d = read(15 * B, 16 * B)  # the newest block never left RAM
    assert (d["cold_hits"], d["hot_hits"], d["bytes_from_cold"]) == (0, B, 0)
    d = read(3 * B + 5, 7 * B)  # a scan over more cold blocks than half the slots: no promotion
    assert (d["cold_hits"], d["hot_hits"], d["promotions"]) == (4 * B - 5, 0, 0)
    assert d["bytes_from_cold"] == 2 * (4 * B - 5) * row
    c.close()


# -- a strict index ------------------------------------------------------------------
def rewrite_index(d, edit):
    """Replace the index body by ``edit(body)``, with a valid checksum line."""
    body = (d / "index.json").read_bytes().decode().split("\n")[0]
    body = edit(body)
    (d / "index.json").write_bytes((body + "\n" + f"{zlib.crc32(body.encode()):08x}\n").encode())


@pytest.fixture
def persisted(tmp_path):
    d = tmp_path / "c"
    with kvcache.TieredKVCache(**SHAPE, max_seq_len=16, block_tokens=4, cold_dir=d, persist=True) as c:
        c.store_layers(rows(6, layers=SHAPE["n_layers"]), rows(6, layers=SHAPE["n_layers"]))
    return d


@pytest.mark.parametrize("edit, match", [
    (lambda b: b.replace('"version":1', '"version":true'), "index format version"),
    (lambda b: b.replace('"dtype":"float32"', '"dtype":"float32","colour":"blue"'), "config: expected the fields"),
])
def test_an_index_this_version_does_not_write_is_refused_by_open_and_inspect(persisted, edit, match):
    rewrite_index(persisted, edit)
    with pytest.raises(kvcache.CorruptionError, match=match):
        kvcache.TieredKVCache.open(persisted)
    out = subprocess.run([sys.executable, "-m", "kvcache", "inspect", str(persisted)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "corrupt" in out.stderr or "version" in out.stderr, out.stderr


@pytest.mark.parametrize("crc", [lambda c: " " + c, lambda c: "0x" + c, lambda c: c[1:], lambda c: c + "0"])
def test_the_index_checksum_line_is_exactly_eight_lowercase_hex_digits(persisted, crc):
    body, line, _ = (persisted / "index.json").read_bytes().decode().split("\n")
    (persisted / "index.json").write_bytes((body + "\n" + crc(line) + "\n").encode())
    with pytest.raises(kvcache.CorruptionError, match="8 lowercase hex digits"):
        kvcache.TieredKVCache.open(persisted)


# -- one concept per module ----------------------------------------------------------
ENGINE = ["_arena", "_hot", "_copy", "_moves", "_cold", "_format", "_policy", "_codec", "_status", "_persist", "_cache",
          "_blocks", "prefix.keys", "prefix.record", "prefix.ram", "prefix.disk", "prefix.store"]


@pytest.mark.parametrize("name", ENGINE)
def test_each_engine_module_says_what_it_owns_and_must_not_touch(name):
    doc = importlib.import_module(f"kvcache.{name}").__doc__ or ""
    assert "Owns:" in doc and "Must not touch:" in doc, name


def test_no_pyx_is_much_over_600_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "kvcache").glob("*.pyx")}
    assert max(sizes.values()) <= 600, sizes


def test_the_dtype_and_policy_tables_are_the_only_definitions():
    from kvcache import config
    from kvcache._codec import DTYPES, row_bytes
    assert config.DTYPES == tuple(DTYPES) and config.EVICTION_POLICIES == tuple(POLICIES)
    c = kvcache.CacheConfig(n_layers=1, n_kv_heads=3, head_dim=5, max_seq_len=4, dtype="int8")
    assert c.row_bytes == row_bytes("int8", 3, 5) == 4 * 3 + 16  # scales, then 15 values padded to 16
    # the codes are what cold headers record
    assert [d.code for d in DTYPES.values()] == [0, 1, 2, 3]


def test_a_reopen_with_overrides_records_them_at_close(tmp_path):
    d = tmp_path / "c"
    with kvcache.TieredKVCache(**SHAPE, max_seq_len=16, block_tokens=4, cold_dir=d, persist=True) as c:
        c.store_layers(rows(6, layers=SHAPE["n_layers"]), rows(6, layers=SHAPE["n_layers"]))
    index = (d / "index.json").read_bytes()
    kvcache.TieredKVCache.open(d).close()  # unchanged: the same bytes, not rewritten
    assert (d / "index.json").read_bytes() == index
    kvcache.TieredKVCache.open(d, max_seq_len=32, eviction_policy="adaptive").close()
    with kvcache.TieredKVCache.open(d) as c:
        assert (c.config.max_seq_len, c.config.eviction_policy) == (32, "adaptive")
        assert c.seq_len == 6
