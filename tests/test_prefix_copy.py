"""How the prefix store's copies check records (kvcache._blocks, kvcache.prefix.ram).

A load sums each layer's rows just before copying them and compares the record's
CRC32C under every layer's lock, undoing a record that fails; records are read in
place from RAM, from a buffer read off disk (to promote), or streamed from their file
into scratch memory.  Each path is shown here against the independent references of
test_prefix.py: the source cache's own reads and the document's reader.  Buffers the
RAM tier recycles are shown never to change under a load in flight.
"""
import os
import random
import threading

import numpy as np
import pytest

import kvcache
import prefix_reader as pr
from kvcache._blocks import crc32c_combine, read_rows
from kvcache._simd import crc32c
from test_prefix import B, MODEL, assert_same, cache, corrupt, files, name, prompt, ref_keys, source


def test_crc32c_combine_is_the_crc_of_the_concatenation():
    rng = random.Random(13)
    for _ in range(200):
        a = rng.randbytes(rng.choice([0, 1, 3, 8, 63, 64, 1000, rng.randrange(5000)]))
        b = rng.randbytes(rng.choice([0, 1, 7, 64, 4096, rng.randrange(70000)]))
        assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b) == pr.crc32c(a + b)


@pytest.mark.parametrize("hot_tokens", [None, 2 * B])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_read_rows_returns_the_crc_of_what_it_wrote(dtype, hot_tokens):
    """Every layer's rows, in the record layout, summed as they land: the CRC equals
    an independent CRC32C of the buffer, and the rows equal get(raw=True)'s."""
    n = 5 * B
    src = source(n, dtype, hot_tokens=hot_tokens)
    L, rb = src.config.n_layers, src.config.row_bytes
    head = np.frombuffer(os.urandom(64), np.uint8)
    buf = np.zeros(64 + 2 * L * B * rb, np.uint8)
    buf[:64] = head
    crc = read_rows(src, 2 * B, 3 * B, buf, 64)
    assert crc == pr.crc32c(buf.tobytes())
    for layer in range(L):
        want = b"".join(_rows_bytes(part, rb) for part in src.get(layer, 2 * B, 3 * B, raw=True))
        assert buf[64 + layer * 2 * B * rb:64 + (layer + 1) * 2 * B * rb].tobytes() == want


def _rows_bytes(part, row_bytes):
    """get(raw=True)'s output as rows of the record (docs/format.md §2.3): int8 rows are
    the float32 scales, then the values, zero-padded to ``row_bytes``."""
    if not isinstance(part, tuple):
        return np.ascontiguousarray(part).tobytes()
    values, scales = part
    n = values.shape[0]
    row = np.zeros((n, row_bytes), np.uint8)
    sb = scales.reshape(n, -1).view(np.uint8)
    vb = values.reshape(n, -1).view(np.uint8)
    row[:, :sb.shape[1]] = sb
    row[:, sb.shape[1]:sb.shape[1] + vb.shape[1]] = vb
    return row.tobytes()


@pytest.mark.parametrize("dest_hot", [None, 2 * B], ids=["dest-ram", "dest-tiered"])
@pytest.mark.parametrize("path", ["read", "streamed"])
@pytest.mark.parametrize("how", ["rows", "last_row", "trailer", "truncated", "tokens"])
def test_a_bad_disk_record_on_either_read_path_leaves_only_verified_blocks(tmp_path, how, path,
                                                                           dest_hot):
    """A fresh store on the directory (so every record comes from disk): read into a
    buffer and promoted when RAM can hold records, streamed through scratch memory when
    it cannot.  The record failing ends the prefix; a tiered destination, whose append
    of it had already pushed a block to its cold tier, holds exactly the blocks before."""
    n, bad = 5 * B, 3
    src, tokens = source(n + 1, "float16"), prompt(n + 1)
    d = tmp_path / "s"
    keys = ref_keys(tokens, src)
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d) as s:
        assert s.save(src, tokens) == 5
    why = corrupt(d / name(keys[bad]), how, src)
    ram = 0 if path == "streamed" else 1 << 20
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d, ram_bytes=ram) as s:
        assert s._streams() == (path == "streamed")
        c = cache("float16", hot_tokens=dest_hot)
        before = c.stats()
        assert s.load(c, tokens) == bad * B
        assert_same(c, src, bad * B)
        st, cs = s.stats(), c.stats()
        assert (st["integrity_failures_disk"], st["hit_tokens_disk"]) == (1, bad * B)
        assert st["promotions"] == (0 if path == "streamed" else bad)
        assert st["records_ram"] == (0 if path == "streamed" else bad)
        assert files(d) == {name(k) for i, k in enumerate(keys) if i != bad}
        # the undone record left no rows behind in the counters either
        assert cs["tokens_stored"] - before["tokens_stored"] == bad * B * src.config.n_layers
        if dest_hot:
            assert cs["eviction_blocks"] > 0  # the destination really spilled
        # the cache goes on from the verified prefix
        for layer in range(src.config.n_layers):
            kk, vv = src.get(layer, bad * B, n)
            c.store(layer, kk, vv)
        assert_same(c, src, n)
        assert why in ("checksum", "size", "tokens")


@pytest.mark.parametrize("path", ["ram", "streamed"])
def test_a_record_failing_its_crc_is_undone_before_any_reader_sees_it(tmp_path, path):
    """Readers polling the destination while a load appends a record that fails its
    CRC32C never see a position past the verified prefix: the record is appended and
    undone under every layer's lock."""
    n, bad = 6 * B, 4
    src, tokens = source(n + 1, "float32"), prompt(n + 1)
    d = tmp_path / "s"
    keys = ref_keys(tokens, src)
    s = (kvcache.PrefixStore.for_cache(src, MODEL) if path == "ram" else
         kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d, ram_bytes=0))
    s.save(src, tokens)
    if path == "ram":
        held = s._ram.records[keys[bad]]
        held.buf[held.buf.shape[0] - 9] ^= 1  # a row byte of the last layer's values
    else:
        corrupt(d / name(keys[bad]), "last_row", src)
    c = cache("float32")
    seen, stop = set(), threading.Event()

    def poll():
        while not stop.is_set():
            seen.add(c.layer_len(c.config.n_layers - 1))

    t = threading.Thread(target=poll)
    t.start()
    try:
        for _ in range(20):
            c.reset()
            assert s.load(c, tokens) == bad * B
            if path == "ram":  # refused and removed on the first round; put it back
                s.save(src, tokens)
                held = s._ram.records[keys[bad]]
                held.buf[held.buf.shape[0] - 9] ^= 1
            else:
                s.save(src, tokens)
                corrupt(d / name(keys[bad]), "last_row", src)
    finally:
        stop.set()
        t.join()
    assert max(seen) <= bad * B
    assert_same(c, src, bad * B)
    s.close()


def test_recycled_buffers_never_change_under_a_load(tmp_path):
    """A RAM tier at its budget (two prompts' records) while threads save and load
    three prompts in turn: saves reuse evicted records' buffers, and every load still
    gets byte-exact KV (a pinned record keeps its buffer until the load ends)."""
    n = 4 * B
    srcs = [source(n + 1, "float16", seed=10 * i) for i in range(3)]
    prompts = [prompt(n + 1, seed=i) for i in range(3)]
    one = pr.record_size(n_layers=srcs[0].config.n_layers, n_kv_heads=srcs[0].config.n_kv_heads,
                         head_dim=srcs[0].config.head_dim, block_tokens=B, dtype="float16")
    s = kvcache.PrefixStore.for_cache(srcs[0], MODEL, ram_bytes=2 * 4 * one)
    errors, loads = [], [0]

    def worker(seed):
        rng = random.Random(seed)
        c = cache("float16")
        try:
            for _ in range(60):
                i = rng.randrange(3)
                if rng.random() < 0.5:
                    s.save(srcs[i], prompts[i])
                else:
                    c.reset()
                    got = s.load(c, prompts[i])
                    assert got % B == 0 and got <= n
                    assert_same(c, srcs[i], got)
                    loads[0] += got > 0
        except Exception as exc:  # reported below, with the thread's seed
            errors.append((seed, repr(exc)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = s.stats()
    assert st["evictions_ram"] > 0 and loads[0] > 0
    assert st["bytes_ram"] <= 2 * 4 * one and st["integrity_failures"] == 0
    assert len(s._ram.free) * one + st["bytes_ram"] <= 2 * 4 * one  # the budget bounds both
    s.close()


def test_save_leaves_the_source_cache_tiers_as_they_are():
    """Saving a prefix reads cold blocks without promoting them: the source's RAM
    keeps the blocks it held (its recent ones), its promotion counters do not move,
    and the records still hold exactly what get returns."""
    n = 8 * B
    src = source(n, "float16", hot_tokens=2 * B, eviction_policy="lru", promote_on_read=True)
    tokens = prompt(n)
    hot = [src._hot_tier()._debug_hot_blocks(layer) for layer in range(src.config.n_layers)]
    before = src.stats()
    with kvcache.PrefixStore.for_cache(src, MODEL) as s:
        assert s.save(src, tokens) == 8
        after = src.stats()
        assert [src._hot_tier()._debug_hot_blocks(layer) for layer in range(src.config.n_layers)] == hot
        assert (after["promotions"], after["eviction_blocks"]) == (before["promotions"], before["eviction_blocks"])
        assert after["cold_hits"] - before["cold_hits"] == 6 * B * src.config.n_layers
        c = cache("float16")
        assert s.load(c, tokens + [1]) == n
        assert_same(c, src, n)
