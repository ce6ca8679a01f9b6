"""The prefix store (issue #13, items 1-4) against independent references.

Keys and records are recomputed and parsed by tests/prefix_reader.py, written only
from docs/format.md §7 (whose test vectors are parsed out of the document); the KV a
store loads is compared byte for byte with what the source cache's own ``get``
returns; counters are derived from the workload.
"""

import hashlib
import logging
import os
import re
import stat
import struct
import threading

import ml_dtypes
import numpy as np
import pytest

try:
    import torch
except ImportError:  # the torch input forms are tested where torch is installed
    torch = None

import kvcache
import prefix_reader as pr
from helpers import SHAPE, fill, rows, run_python, run_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "format.md")
MODEL = "org/tiny@r1"
B = 4
DTYPES = ["float32", "float16", "bfloat16", "int8"]
REMOTE_STATS = (  # the remote tier's counters (tests/test_prefix_remote.py derives them)
    "hit_tokens_remote", "promotions_remote", "integrity_failures_remote", "records_saved_remote",
    "bytes_sent_remote", "bytes_read_remote", "deleted_remote", "remote_round_trips", "remote_errors",
    "remote_errors_connect", "remote_errors_match", "remote_errors_load", "remote_errors_save",
    "remote_outages", "remote_skipped", "remote_down")


# ---- helpers ---------------------------------------------------------------------------

def cache(dtype="float32", **kw):
    args = dict(max_seq_len=64, block_tokens=B, dtype=dtype, **SHAPE)
    args.update(kw)
    return kvcache.TieredKVCache(**args)


def prompt(n, seed=0):
    """``n`` token ids, spread over the whole u32 range (2**32 - 1 included)."""
    ids = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64)
    if n:
        ids[0] = 2**32 - 1
    return [int(t) for t in ids]


def source(n, dtype="float32", seed=0, **kw):
    """A cache holding ``n`` random positions in every layer (``inputs(n, seed)``)."""
    c = cache(dtype, **kw)
    fill(c, n, seed=seed)
    return c


def inputs(n, seed=0):
    """The float32 keys and values ``source(n, seed=seed)`` stored, [n_layers, n, H, D]."""
    return rows(n, layers=SHAPE["n_layers"], seed=seed), rows(n, layers=SHAPE["n_layers"], seed=seed + 1)


def shape_of(c):
    cfg = c.config
    return dict(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                block_tokens=cfg.block_tokens, dtype=cfg.dtype)


def raw_bytes(c, layer, start=0, stop=None):
    """The stored representation of a layer's rows (``get(raw=True)``), as bytes
    (None for a cache whose tiers store different dtypes: it has no raw reads)."""
    if c.config.cold_dtype not in (None, c.config.dtype):
        return None
    out = []
    for part in c.get(layer, start, stop, raw=True):
        parts = part if isinstance(part, tuple) else (part,)  # int8: (values, scales)
        out.append(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))
    return out


def assert_same(got, want, n):
    """``got`` holds exactly ``want``'s first ``n`` positions, in every layer."""
    for l in range(want.config.n_layers):
        assert got.layer_len(l) == n
        raw = raw_bytes(got, l), raw_bytes(want, l, 0, n)
        if None not in raw:
            assert raw[0] == raw[1]
        assert [a.tobytes() for a in got.get(l)] == [a.tobytes() for a in want.get(l, 0, n)]


def record_size(c, mac=False):
    return pr.record_size(**shape_of(c), mac=mac)


def ref_keys(tokens, c, salt=b""):
    return pr.keys(tokens, MODEL, **shape_of(c), salt=salt)


def files(d):
    return set(pr.record_files(d))


def name(key):
    return key.hex() + ".kvp"


def doc_section(title):
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    start = text.index(title)
    end = text.find("\n### ", start + len(title))
    return text[start:end if end >= 0 else len(text)]


def doc_blocks(section):
    return re.findall(r"```\n(.*?)```", section, re.S)


# ---- keys (§7.1) ------------------------------------------------------------------------

def doc_key_vectors():
    sec = doc_section("### 7.1 Prefix keys")
    m = re.search(r'model `"([^"]+)"`, `n_layers=(\d+), n_kv_heads=(\d+), head_dim=(\d+),\s*'
                  r'block_tokens=(\d+), dtype="(\w+)"`.*?tokens `0, 1, \.\.\., (\d+)`', sec, re.S)
    model, L, H, D, Bk, dtype, last = m.groups()
    shape = dict(n_layers=int(L), n_kv_heads=int(H), head_dim=int(D), block_tokens=int(Bk), dtype=dtype)
    vectors = re.findall(r'salt b"(.*?)"\nroot\s+(\w{64})\n((?:key\[\d\]\s+\w{64}\n)+)', doc_blocks(sec)[1])
    out = [(salt.encode(), bytes.fromhex(root), [bytes.fromhex(k) for k in re.findall(r"\s(\w{64})", ks)])
           for salt, root, ks in vectors]
    return model, shape, list(range(int(last) + 1)), out


def test_doc_key_vectors():
    model, shape, tokens, vectors = doc_key_vectors()
    for salt, head, tail in re.findall(r'`SHA-256\(b"(\w*)"\)` is\s+`(\w+)\.\.\.(\w+)`',
                                       doc_section("### 7.1 Prefix keys")):
        digest = hashlib.sha256(salt.encode()).hexdigest()
        assert digest.startswith(head) and digest.endswith(tail)
    assert len(vectors) == 2 and all(len(keys) == len(tokens) // shape["block_tokens"] for _, _, keys in vectors)
    for salt, root, keys in vectors:
        assert pr.root(model, **shape, salt=salt) == root
        assert pr.keys(tokens, model, **shape, salt=salt) == keys
        assert kvcache.prefix_hashes(tokens, model=model, **shape, salt=salt) == keys
        with kvcache.PrefixStore(model, **shape, salt=salt) as s:
            assert s.root == root


@pytest.mark.parametrize("n", [0, 3, 4, 13, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,salt,model", [
    ((1, 1, 1, 1), b"", "m"),
    ((32, 8, 128, 16), b"tenant-7", "org/name@0123abc"),
    ((3, 2, 5, 4), bytes(range(256)), "modèle/ünïcode@v1"),
])
def test_keys_recomputed_from_the_document(shape, salt, model, dtype, n):
    L, H, D, Bk = shape
    tokens = prompt(n, seed=n)
    want = pr.keys(tokens, model, L, H, D, Bk, dtype, salt)
    got = kvcache.prefix_hashes(tokens, model=model, n_layers=L, n_kv_heads=H, head_dim=D,
                                block_tokens=Bk, dtype=dtype, salt=salt)
    assert got == want and len(got) == n // Bk and all(isinstance(k, bytes) and len(k) == 32 for k in got)


def test_keys_separate_models_salts_shapes_and_prefixes():
    base = dict(model="m", n_layers=2, n_kv_heads=2, head_dim=4, block_tokens=4, dtype="float16")
    tokens = prompt(8)
    first = kvcache.prefix_hashes(tokens, **base)
    for change in (dict(model="m2"), dict(salt=b"x"), dict(n_layers=3), dict(head_dim=8),
                   dict(block_tokens=2), dict(dtype="bfloat16")):
        assert kvcache.prefix_hashes(tokens, **{**base, **change})[0] != first[0], change
    other = kvcache.prefix_hashes([tokens[0] ^ 1] + tokens[1:], **base)
    assert other[0] != first[0] and other[1] != first[1]  # a key names the whole prefix
    assert kvcache.prefix_hashes(tokens[:4] + prompt(4, seed=9), **base)[0] == first[0]


def test_keys_agree_across_interpreters_with_different_hash_seeds(tmp_path):
    """Two interpreters with different PYTHONHASHSEED compute the same keys, and each
    finds every record this process wrote (a new process, no index)."""
    src, tokens = source(5 * B, "int8"), prompt(5 * B)
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=tmp_path / "s", salt=b"tenant") as s:
        assert s.save(src, tokens) == 5
    code = (f"import kvcache, sys; tokens = {tokens!r}; shape = {shape_of(src)!r}\n"
            f"print(','.join(k.hex() for k in kvcache.prefix_hashes(tokens, model={MODEL!r}, salt=b'tenant', **shape)))\n"
            f"s = kvcache.PrefixStore({MODEL!r}, disk_dir=sys.argv[1], salt=b'tenant', **shape)\n"
            f"print(s.match(tokens), s.stats()['records_disk'])")
    outs = {seed: run_python("-c", code, tmp_path / "s", cwd=ROOT, env=dict(os.environ, PYTHONHASHSEED=seed),
                             timeout=120).stdout.split("\n")[:2] for seed in ("0", "12345")}
    want = [",".join(k.hex() for k in ref_keys(tokens, src, salt=b"tenant")), f"{5 * B} 5"]
    assert outs == {"0": want, "12345": want}


def test_token_input_forms_agree():
    ids = [5, 0, 70000, 2**31, 3, 9, 1, 2]
    kw = dict(model="m", n_layers=1, n_kv_heads=1, head_dim=2, block_tokens=4, dtype="float32")
    want = pr.keys(ids, "m", 1, 1, 2, 4, "float32")
    forms = [ids, tuple(ids), [np.int64(t) for t in ids], np.array(ids, np.int64),
             np.array(ids, np.uint32), np.array(ids, np.uint64), np.array([ids], np.int64),
             np.array(ids, np.int64)[::-1][::-1], np.array(ids, ">i8"), np.repeat(np.array(ids, np.int64), 2)[::2]]
    small = [t % 30000 for t in ids]
    small_forms = [np.array(small, np.int32), np.array(small, np.int16), np.array(small, np.uint16)]
    if torch is not None:
        forms += [torch.tensor(ids, dtype=torch.int64), torch.tensor([ids], dtype=torch.int64)]
        small_forms += [torch.tensor(small, dtype=torch.int32), torch.tensor([small], dtype=torch.int16)]
    for f in forms:
        assert kvcache.prefix_hashes(f, **kw) == want, type(f)
    for f in small_forms:
        assert kvcache.prefix_hashes(f, **kw) == pr.keys(small, "m", 1, 1, 2, 4, "float32"), type(f)


BAD_TOKENS = [
    ([1.0, 2.0], TypeError), ([1, 2.5], TypeError), ([True, 1], TypeError), (["1", "2"], TypeError),
    ([1, None], TypeError), ("1234", TypeError), (b"\x01\x02", TypeError), (None, TypeError),
    (3, TypeError), ([[1, 2, 3, 4]], TypeError),
    (np.array([1.0, 2.0]), TypeError), (np.array([True, False]), TypeError), (np.array(["a"]), TypeError),
    ([-1, 2], ValueError), ([2**32], ValueError), ([0, 2**40], ValueError),
    (np.array([-1, 2]), ValueError), (np.array([2**32], np.uint64), ValueError),
    (np.zeros((2, 4), np.int64), ValueError), (np.zeros((1, 2, 4), np.int64), ValueError),
    (np.int64(5), TypeError), (np.array(5), ValueError),
]
if torch is not None:
    BAD_TOKENS += [
        (torch.tensor([1.0, 2.0]), TypeError), (torch.tensor([True]), TypeError),
        (torch.tensor([-3]), ValueError), (torch.zeros((2, 4), dtype=torch.int64), ValueError),
        (torch.zeros((1, 1, 4), dtype=torch.int64), ValueError),
    ]


@pytest.mark.parametrize("tokens,exc", BAD_TOKENS, ids=[f"{i}" for i in range(len(BAD_TOKENS))])
def test_bad_tokens_are_refused(tokens, exc):
    kw = dict(model="m", n_layers=1, n_kv_heads=1, head_dim=2, block_tokens=4, dtype="float32")
    with pytest.raises(exc, match="expected"):
        kvcache.prefix_hashes(tokens, **kw)
    c = cache()
    fill(c, 8)
    with kvcache.PrefixStore.for_cache(c, MODEL) as s:
        for call in (lambda: s.save(c, tokens), lambda: s.match(tokens), lambda: s.load(cache(), tokens)):
            with pytest.raises(exc, match="expected"):
                call()
        assert all(v == 0 for v in s.stats().values())


# ---- records (§7.2) ---------------------------------------------------------------------

def doc_record_vector():
    sec = doc_section("### 7.4 Record test vector")
    m = re.search(r'Model `"([^"]+)"`, `n_layers=(\d+), n_kv_heads=(\d+), head_dim=(\d+), block_tokens=(\d+)`,'
                  r'\s*`dtype="(\w+)"`', sec)
    model, L, H, D, Bk, dtype = m.groups()
    shape = dict(n_layers=int(L), n_kv_heads=int(H), head_dim=int(D), block_tokens=int(Bk), dtype=dtype)
    tokens = [int(t) for t in re.search(r"Tokens `\[([\d, ]+)\]`", sec).group(1).split(",")]
    root = bytes.fromhex(re.search(r"Root \(the parent\) is\s+`(\w{64})`", sec).group(1))
    key = bytes.fromhex(re.search(r"the file name without `\.kvp`, is\s+`(\w{64})`", sec).group(1))
    data = bytes.fromhex("".join(doc_blocks(sec)[0].split()))
    crc = int(re.search(r"CRC32C\(bytes 0\.\.\d+\) = `0x(\w{8})`", sec).group(1), 16)
    secret = re.search(r'`secret=b"(\w+)"`', sec).group(1).encode()
    mac = bytes.fromhex(re.search(r"bytes\s+\d+\.\.\d+ are `HMAC-SHA256\(b\"\w+\", bytes 0\.\.\d+\)` =\s+`(\w{64})`",
                                  sec).group(1))
    return model, shape, tokens, root, key, data, crc, secret, mac


def test_doc_record_vector(tmp_path):
    model, shape, tokens, root, key, data, crc, secret, mac = doc_record_vector()
    assert pr.root(model, **shape) == root and pr.keys(tokens, model, **shape) == [key]
    # The reader accepts the document's bytes and finds the inputs the document names.
    rec = pr.parse_record(data, **shape, key=key, parent=root, tokens=tokens)
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == crc == pr.crc32c(data[:-4])
    k, v = rec.widened(0)
    assert k.tolist() == [[[1, -2]], [[0.5, 0.25]]] and v.tolist() == [[[-1, 3]], [[0, -0.5]]]
    # The library writes exactly these bytes, and the HMAC variant the document describes.
    c = kvcache.TieredKVCache(max_seq_len=4, **shape)
    c.store(0, k, v)
    for sec, d in ((None, tmp_path / "crc"), (secret, tmp_path / "mac")):
        with kvcache.PrefixStore.for_cache(c, model, disk_dir=d, secret=sec) as s:
            assert s.save(c, tokens) == 1
        assert files(d) == {name(key)}
        got = (d / name(key)).read_bytes()
        if sec is None:
            assert got == data
        else:
            want = bytearray(data[:-4])
            want[10:12] = struct.pack("<H", 1)
            want[40:48] = struct.pack("<Q", len(data) - 4 + 32)
            assert got == bytes(want) + mac
            assert pr.parse_record(got, **shape, key=key, parent=root, tokens=tokens, secret=sec).rows == rec.rows
            with pytest.raises(pr.RecordError, match="size"):  # a reader without the secret
                pr.parse_record(got, **shape, key=key)
            with pytest.raises(pr.RecordError, match="mac"):
                pr.parse_record(got, **shape, key=key, secret=b"wrong")


@pytest.mark.parametrize("hot_tokens", [None, 8], ids=["ram", "tiered"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reader_reads_what_the_store_wrote(tmp_path, dtype, hot_tokens):
    n = 30
    c = source(n, dtype, hot_tokens=hot_tokens)
    tokens = prompt(n)
    d = tmp_path / "s"
    with kvcache.PrefixStore.for_cache(c, MODEL, disk_dir=d) as s:
        assert s.save(c, tokens) == n // B
    keys = ref_keys(tokens, c)
    assert files(d) == {name(k) for k in keys}
    for i, key in enumerate(keys):
        rec = pr.read_record(d / name(key), **shape_of(c), parent=keys[i - 1] if i else
                             pr.root(MODEL, **shape_of(c)), tokens=tokens[i * B:(i + 1) * B])
        assert rec.tokens == tokens[i * B:(i + 1) * B]
        for l in range(SHAPE["n_layers"]):
            stored = rec.stored(l)
            want = c.get(l, i * B, (i + 1) * B, raw=True)
            if dtype == "int8":
                for (q, s_), (wq, ws) in zip(stored, want):
                    assert q.tobytes() == wq.tobytes() and s_.tobytes() == ws.tobytes()
            else:
                assert all(a.dtype == w.dtype and a.tobytes() == w.tobytes() for a, w in zip(stored, want))
            assert [a.tobytes() for a in rec.widened(l)] == [a.tobytes() for a in c.get(l, i * B, (i + 1) * B)]


# ---- the store ----------------------------------------------------------------------------

@pytest.mark.parametrize("hot_tokens", [None, 8], ids=["ram", "tiered"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_and_the_cache_goes_on(tmp_path, dtype, hot_tokens):
    n, more = 37, 11  # a partial last block, then positions stored after the load
    src = source(n + more, dtype, hot_tokens=hot_tokens)
    tokens = prompt(n + more)[:n]
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=tmp_path / "s") as s:
        assert s.save(src, tokens) == n // B
        assert s.match(tokens) == n // B * B
        dst = cache(dtype, hot_tokens=hot_tokens)
        assert s.load(dst, tokens) == n // B * B
    if hot_tokens is not None:  # most blocks were cold in the source and are in the destination
        assert src.stats()["eviction_blocks"] > 0 and dst.stats()["eviction_blocks"] > 0
    assert_same(dst, src, n // B * B)
    # The destination goes on from there: store the source's inputs past the loaded
    # positions, and every position matches the source's.
    p = n // B * B
    k, v = inputs(n + more)
    dst.store_layers(k[:, p:], v[:, p:])
    assert_same(dst, src, n + more)


EXACT_COLD = [("float32", "float16"), ("float32", "bfloat16"), ("float32", "int8"),
              ("float16", "float32"), ("bfloat16", "float32"), ("int8", "float32")]


@pytest.mark.parametrize("dtype,cold_dtype", EXACT_COLD)
def test_cold_dtype_records_hold_what_get_returns(tmp_path, dtype, cold_dtype):
    n = 32
    # promote_on_read=False: the reference gets below must not move blocks between the
    # tiers (with a lossy cold dtype what get returns depends on where a block is)
    src = source(n, dtype, hot_tokens=8, cold_dtype=cold_dtype, promote_on_read=False)
    tokens = prompt(n)
    d = tmp_path / "s"
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d) as s:
        assert s.save(src, tokens) == n // B
        keys = ref_keys(tokens, src)
        for i, key in enumerate(keys):
            rec = pr.read_record(d / name(key), **shape_of(src))
            for l in range(SHAPE["n_layers"]):
                assert [a.tobytes() for a in rec.widened(l)] == \
                    [a.tobytes() for a in src.get(l, i * B, (i + 1) * B)]
        if dtype == "float32":  # the cold format rounded: the records hold its values, not the inputs
            assert src.get(0)[0].tobytes() != inputs(n)[0][0].tobytes()
        ram = cache(dtype)
        assert s.load(ram, tokens) == n - 1
        assert_same(ram, src, n - 1)
        # A tiered destination holds what storing those values there had stored.
        dst, ref = (cache(dtype, hot_tokens=8, cold_dtype=cold_dtype) for _ in range(2))
        assert s.load(dst, tokens) == n - 1
    for l in range(SHAPE["n_layers"]):
        ref.store(l, *src.get(l, 0, n - 1))
    assert_same(dst, ref, n - 1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cold_dtype_narrower_records_hold_the_dtype_rounding(tmp_path, dtype):
    """int8 cold values do not fit float16 / bfloat16: a record holds dtype's rounding
    of them (docs/format.md §7.2), not what a read served from the cold file returns."""
    n = 24
    src = source(n, dtype, hot_tokens=8, cold_dtype="int8", promote_on_read=False)
    tokens = prompt(n)
    d = tmp_path / "s"
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d) as s:
        s.save(src, tokens)
    np_type = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    differs = False
    for i, key in enumerate(ref_keys(tokens, src)):
        rec = pr.read_record(d / name(key), **shape_of(src))
        for l in range(SHAPE["n_layers"]):
            for got, want in zip(rec.stored(l), src.get(l, i * B, (i + 1) * B)):
                rounded = want.astype(np_type)
                assert got.tobytes() == rounded.tobytes()
                differs |= rounded.astype(np.float32).tobytes() != want.tobytes()
    assert differs  # the rounding was not the identity: the test tells the two apart


def test_load_caps(tmp_path):
    n = 4 * B
    src = source(n + 2)
    tokens = prompt(n + 2)
    with kvcache.PrefixStore.for_cache(src, MODEL) as s:
        assert s.save(src, tokens[:n]) == 4
        # The whole prompt stored, its length a multiple of B: all of it but the last token.
        assert s.match(tokens[:n]) == n
        c = cache()
        assert s.load(c, tokens[:n]) == n - 1
        assert_same(c, src, n - 1)
        # A longer prompt: every stored block (the prompt's last token is past them).
        for extra, want in ((1, n), (2, n)):
            c = cache()
            assert s.load(c, tokens[:n + extra]) == want
            assert_same(c, src, want)
        # The cache's max_seq_len, inside a block and on a block boundary.
        for max_seq_len in (10, 8):
            c = cache(max_seq_len=max_seq_len)
            assert s.load(c, tokens) == max_seq_len
            assert_same(c, src, max_seq_len)
        for short in ([], tokens[:1], tokens[:B]):
            c = cache()
            assert s.load(c, short) == max(0, len(short) - 1)
            assert_same(c, src, max(0, len(short) - 1))


def test_load_into_a_non_empty_cache_changes_nothing():
    src = source(16)
    tokens = prompt(16)
    with kvcache.PrefixStore.for_cache(src, MODEL) as s:
        s.save(src, tokens)
        before = s.stats()
        c = cache()
        k = rows(1)
        c.store(2, k, -k)  # one layer holds a position: not empty
        with pytest.raises(ValueError, match="expected an empty cache, got one holding 1 positions"):
            s.load(c, tokens)
        assert [c.layer_len(l) for l in range(3)] == [0, 0, 1]
        assert c.get(2)[0].tobytes() == k.tobytes() and c.get(2)[1].tobytes() == (-k).tobytes()
        assert s.stats() == before


@pytest.mark.parametrize("field,value", [("n_layers", 2), ("n_kv_heads", 1), ("head_dim", 4),
                                         ("block_tokens", 8), ("dtype", "float16")])
def test_a_cache_of_another_shape_names_the_field(field, value):
    src = source(16)
    tokens = prompt(16)
    with kvcache.PrefixStore.for_cache(src, MODEL) as s:
        s.save(src, tokens)
        before = s.stats()
        other = cache(**{field: value})
        fill(other, 16)
        full = cache(**{field: value})
        was = [a.tobytes() for l in range(other.config.n_layers) for a in other.get(l)]
        for call in (lambda: s.save(other, tokens), lambda: s.load(full, tokens)):
            with pytest.raises(ValueError, match=rf"{field}={getattr(src.config, field)!r}.*{field}={value!r}"):
                call()
        assert s.stats() == before and full.seq_len == 0
        assert [a.tobytes() for l in range(other.config.n_layers) for a in other.get(l)] == was


def test_save_adds_only_missing_blocks():
    src = source(40)
    tokens = prompt(40)
    fork = tokens[:12] + prompt(28, seed=5)  # shares 3 blocks with tokens
    other = source(40, seed=7)
    with kvcache.PrefixStore.for_cache(src, MODEL) as s:
        assert s.save(src, tokens[:8]) == 2
        assert s.save(src, tokens[:22]) == 5 - 2  # 22 tokens: 5 full blocks
        assert s.save(src, tokens[:22]) == 0
        assert s.save(other, fork) == 10 - 3
        assert s.save(src, tokens) == 10 - 5
        st = s.stats()
        assert st["blocks_saved"] == 2 + 3 + 7 + 5 == st["records_ram"]
        assert st["bytes_ram"] == st["records_ram"] * record_size(src)
        # The fork's blocks are the other cache's KV, the shared ones the first's.
        c = cache()
        assert s.load(c, fork) == 39
        for l in range(3):
            got, a, b = c.get(l), src.get(l, 0, 12), other.get(l, 12, 39)
            assert got[0][:12].tobytes() == a[0].tobytes() and got[0][12:].tobytes() == b[0].tobytes()
            assert got[1][:12].tobytes() == a[1].tobytes() and got[1][12:].tobytes() == b[1].tobytes()


def test_ram_lru_eviction():
    c = source(4 * B)
    size = record_size(c)
    one = [prompt(B, seed=i) for i in range(5)]  # five one-block prompts, five records
    srcs = [source(B, seed=10 * i) for i in range(5)]
    with kvcache.PrefixStore.for_cache(c, MODEL, ram_bytes=3 * size + size // 2) as s:
        for i in range(3):
            assert s.save(srcs[i], one[i]) == 1
        assert (s.stats()["records_ram"], s.stats()["evictions_ram"]) == (3, 0)
        # A load hit refreshes record 0: record 1 is now the least recently used.
        assert s.load(cache(), one[0] + [1]) == B
        assert s.save(srcs[3], one[3]) == 1
        assert [s.match(p) for p in one[:4]] == [B, 0, B, B]
        assert s.save(srcs[4], one[4]) == 1  # then record 2 goes
        assert [s.match(p) for p in one] == [B, 0, 0, B, B]
        st = s.stats()
        assert (st["records_ram"], st["bytes_ram"], st["evictions_ram"], st["blocks_saved"]) == (3, 3 * size, 2, 5)
        for i in (0, 3, 4):
            d = cache()
            assert s.load(d, one[i] + [0]) == B
            assert_same(d, srcs[i], B)
    with kvcache.PrefixStore.for_cache(c, MODEL, ram_bytes=size - 1) as s:  # a record never fits
        assert s.save(c, prompt(4 * B)) == 0
        assert s.stats()["records_ram"] == 0 and s.match(prompt(4 * B)) == 0


def test_disk_tier_survives_the_store(tmp_path):
    d = tmp_path / "s"
    n = 6 * B
    src, tokens = source(n + 1), prompt(n + 1)
    size = record_size(src)
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d) as s:
        assert s.save(src, tokens) == 6
        assert (s.stats()["records_disk"], s.stats()["bytes_disk"]) == (6, 6 * size)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert (d / "KVCACHE-PREFIX").read_bytes() == b"kvcache prefix store, records v1\n"
    assert files(d) == {name(k) for k in ref_keys(tokens, src)}
    assert all(stat.S_IMODE(os.stat(d / f).st_mode) == 0o600 and os.path.getsize(d / f) == size for f in files(d))
    assert {f: stat.S_IMODE(os.stat(d / f).st_mode) for f in os.listdir(d) if f not in files(d)} == \
        {"KVCACHE-PREFIX": 0o600, ".lock": 0o600}  # nothing else, nothing readable by others
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d) as s:
        st = s.stats()
        assert (st["records_disk"], st["bytes_disk"], st["records_ram"]) == (6, 6 * size, 0)
        assert s.match(tokens) == n
        c = cache()
        assert s.load(c, tokens) == n
        assert_same(c, src, n)
        assert s.match(tokens) == n  # now from RAM
        st = s.stats()
        assert (st["hit_tokens_disk"], st["hit_tokens_ram"], st["promotions"], st["records_ram"]) == \
            (n + n, n, 6, 6)
        assert (st["lookups"], st["query_tokens"]) == (3, 3 * (n + 1))


def test_disk_takes_over_an_empty_directory_and_refuses_others(tmp_path):
    d = tmp_path / "empty"
    d.mkdir(mode=0o755)
    c = source(B)
    with kvcache.PrefixStore.for_cache(c, MODEL, disk_dir=d) as s:
        s.save(c, prompt(B))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a store")
    with pytest.raises(FileExistsError, match="foreign"):
        kvcache.PrefixStore.for_cache(c, MODEL, disk_dir=tmp_path / "foreign")
    with pytest.raises(NotADirectoryError):
        kvcache.PrefixStore.for_cache(c, MODEL, disk_dir=tmp_path / "foreign" / "notes.txt")


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    d = tmp_path / "s"
    c = source(2 * B)
    with kvcache.PrefixStore.for_cache(c, MODEL, disk_dir=d) as s:
        s.save(c, prompt(2 * B))
    dead = run_python("-c", "import os; print(os.getpid())").stdout.strip()
    (d / f".tmp-{dead}-1-0").write_bytes(b"half a rec")      # a writer that crashed
    (d / f".tmp-{os.getpid()}-1-999").write_bytes(b"being written")  # a live one's
    with kvcache.PrefixStore.for_cache(c, MODEL, disk_dir=d) as s:
        assert s.stats()["records_disk"] == 2 and s.match(prompt(2 * B)) == 2 * B
    assert not (d / f".tmp-{dead}-1-0").exists() and (d / f".tmp-{os.getpid()}-1-999").exists()
    assert len(files(d)) == 2


def test_disk_lru_budget(tmp_path):
    d = tmp_path / "s"
    c = source(B)
    size = record_size(c)
    one = [prompt(B, seed=i) for i in range(5)]
    srcs = [source(B, seed=10 * i) for i in range(5)]
    keys = [ref_keys(p, c)[0] for p in one]
    with kvcache.PrefixStore.for_cache(c, MODEL, ram_bytes=0, disk_dir=d, disk_bytes=3 * size + size // 2) as s:
        for i in range(3):
            assert s.save(srcs[i], one[i]) == 1
        # The order is the files' mtimes (docs/format.md §7.3): set them apart by seconds,
        # older than now, so that it does not rest on the file system clock's tick.
        now = os.stat(d / name(keys[0])).st_mtime
        for i in range(3):
            os.utime(d / name(keys[i]), (now - 100 + i, now - 100 + i))
        assert s.load(cache(), one[0] + [0]) == B  # a disk hit: record 0 becomes the newest
        assert s.save(srcs[3], one[3]) == 1
        assert files(d) == {name(keys[i]) for i in (0, 2, 3)}
        assert s.save(srcs[4], one[4]) == 1  # record 2 is the oldest now
        assert files(d) == {name(keys[i]) for i in (0, 3, 4)}
        st = s.stats()
        assert (st["records_disk"], st["bytes_disk"], st["evictions_disk"]) == (3, 3 * size, 2)
        assert (st["records_ram"], st["blocks_saved"], st["promotions"]) == (0, 5, 0)
        for i in (0, 3, 4):
            got = cache()
            assert s.load(got, one[i] + [0]) == B
            assert_same(got, srcs[i], B)
    with kvcache.PrefixStore.for_cache(c, MODEL, ram_bytes=0, disk_dir=d, disk_bytes=3 * size) as s:
        assert (s.stats()["records_disk"], s.stats()["bytes_disk"]) == (3, 3 * size)
    with kvcache.PrefixStore.for_cache(c, MODEL, ram_bytes=0, disk_dir=tmp_path / "t", disk_bytes=size - 1) as s:
        assert s.save(c, one[0]) == 0  # a record larger than the budget is not written
        assert files(tmp_path / "t") == set()


def test_stats_after_a_known_workload(tmp_path):
    """Every counter, derived step by step from the workload (RAM holds 4 records,
    the disk 5; two prompts of 3 and 2 blocks, then a third of 1)."""
    a, b, x = prompt(3 * B + 2, seed=1), prompt(2 * B, seed=2), prompt(B, seed=3)
    ca, cb, cx = source(3 * B + 2, seed=1), source(2 * B, seed=2), source(B, seed=3)
    size = record_size(ca)
    with kvcache.PrefixStore.for_cache(ca, MODEL, ram_bytes=4 * size, disk_dir=tmp_path / "s",
                                       disk_bytes=5 * size) as s:
        assert s.save(ca, a) == 3         # RAM a0 a1 a2; disk 3
        assert s.save(cb, b) == 2         # RAM a1 a2 b0 b1 (a0 evicted); disk 5
        assert s.match(a) == 3 * B        # a0 from disk, a1 a2 from RAM
        c = cache()
        assert s.load(c, a) == 3 * B      # the same tiers; a0 promoted, b0 evicted (LRU)
        assert_same(c, ca, 3 * B)
        assert s.match(b) == 2 * B        # b0 from disk, b1 from RAM
        c = cache()
        assert s.load(c, b + [7]) == 2 * B  # b0 promoted, a1 evicted
        assert_same(c, cb, 2 * B)
        assert s.save(cx, x) == 1         # RAM evicts a2; the disk (5 records) evicts one
        st = s.stats()
    want = dict(
        lookups=4, query_tokens=len(a) + len(a) + len(b) + len(b) + 1,
        hit_tokens_ram=2 * B + 2 * B + B + B, hit_tokens_disk=B + B + B + B,
        blocks_saved=3 + 2 + 1, records_ram=4, bytes_ram=4 * size, records_disk=5, bytes_disk=5 * size,
        evictions_ram=1 + 1 + 1 + 1, evictions_disk=1, promotions=2,
        integrity_failures=0, integrity_failures_ram=0, integrity_failures_disk=0, mac_failures=0)
    # Without a remote tier its counters are there, all zero (one schema for every store).
    want.update(dict.fromkeys(REMOTE_STATS, 0))
    assert st == want
    assert len(files(tmp_path / "s")) == 5


# ---- integrity ---------------------------------------------------------------------------

def corrupt(path, how, c, other_file=None):
    """Damage a record file in one of the ways §7.2's checks catch; the check's name."""
    data = bytearray(path.read_bytes())
    hb = pr.header_bytes(c.config.block_tokens)
    flip = {"rows": hb + 17, "last_row": len(data) - 5, "tokens": 128 + 1, "key": 48 + 31,
            "parent": 80, "header": 16, "padding": 128 + 4 * B, "trailer": len(data) - 1,
            "reserved": 120}
    if how in flip:
        data[flip[how]] ^= 0x10
    elif how == "truncated":
        del data[-1]
    elif how == "extended":
        data += b"\0"
    elif how == "foreign":
        data = bytearray(other_file.read_bytes())
    path.write_bytes(bytes(data))
    return {"rows": "checksum", "last_row": "checksum", "trailer": "checksum", "reserved": "header",
            "tokens": "tokens", "key": "key", "parent": "parent", "header": "header", "padding": "header",
            "truncated": "size", "extended": "size", "foreign": "key"}[how]


HOW = ["rows", "last_row", "tokens", "key", "parent", "header", "padding", "trailer", "reserved",
       "truncated", "extended", "foreign"]


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_disk_record_is_a_miss_at_that_block(tmp_path, how, caplog):
    n, bad = 5 * B, 2
    src, tokens = source(n + 1, "float16"), prompt(n + 1)
    d = tmp_path / "s"
    keys = ref_keys(tokens, src)
    with kvcache.PrefixStore.for_cache(src, MODEL, ram_bytes=0, disk_dir=d) as s:
        assert s.save(src, tokens) == 5
        other = None
        if how == "foreign":  # another model's record of the same tokens and shape
            with kvcache.PrefixStore.for_cache(src, "other/model@r", disk_dir=tmp_path / "o") as o:
                o.save(src, tokens)
            other = tmp_path / "o" / name(pr.keys(tokens, "other/model@r", **shape_of(src))[bad])
        why = corrupt(d / name(keys[bad]), how, src, other)
        with pytest.raises(pr.RecordError) as err:  # the independent reader refuses it too
            pr.read_record(d / name(keys[bad]), **shape_of(src), parent=keys[bad - 1],
                           tokens=tokens[bad * B:(bad + 1) * B])
        assert err.value.check == ("padding" if how == "padding" else why)
        assert s.match(tokens) == n  # match checks nothing: the file is there
        c = cache("float16")
        with caplog.at_level(logging.ERROR, logger="kvcache"):
            assert s.load(c, tokens) == bad * B
        assert_same(c, src, bad * B)  # the verified blocks before it, nothing of it or after
        assert [r.getMessage() for r in caplog.records if name(keys[bad]) in r.getMessage()
                and f"fails its {why} check" in r.getMessage() and "removed" in r.getMessage()]
        assert files(d) == {name(k) for i, k in enumerate(keys) if i != bad}
        st = s.stats()
        assert (st["integrity_failures"], st["integrity_failures_disk"], st["integrity_failures_ram"],
                st["mac_failures"]) == (1, 1, 0, 0)
        assert (st["records_disk"], st["hit_tokens_disk"]) == (4, n + bad * B)
        # It is now a plain miss; saving again repairs the chain.
        assert s.match(tokens) == bad * B
        assert s.save(src, tokens) == 1
        c = cache("float16")
        assert s.load(c, tokens) == n
        assert_same(c, src, n)
        assert s.stats()["integrity_failures"] == 1


@pytest.mark.parametrize("how", ["rows", "tokens", "key", "trailer"])
def test_a_damaged_ram_record_is_a_miss_at_that_block(how, caplog):
    n, bad = 4 * B, 1
    src, tokens = source(n + 1, "int8"), prompt(n + 1)
    keys = ref_keys(tokens, src)
    with kvcache.PrefixStore.for_cache(src, MODEL) as s:
        assert s.save(src, tokens) == 4
        # Only memory corruption damages a RAM record: reach into the tier to make it.
        buf = s._ram.records[keys[bad]].buf
        off = {"rows": pr.header_bytes(B) + 3, "tokens": 129, "key": 50, "trailer": len(buf) - 2}[how]
        buf[off] ^= 0x01
        c = cache("int8")
        with caplog.at_level(logging.ERROR, logger="kvcache"):
            assert s.load(c, tokens) == bad * B
        assert_same(c, src, bad * B)
        assert any(keys[bad].hex() in r.getMessage() for r in caplog.records)
        st = s.stats()
        assert (st["integrity_failures"], st["integrity_failures_ram"], st["integrity_failures_disk"]) == (1, 1, 0)
        assert (st["records_ram"], st["hit_tokens_ram"]) == (3, bad * B)
        assert s.save(src, tokens) == 1
        c = cache("int8")
        assert s.load(c, tokens) == n
        assert_same(c, src, n)


def test_secret_records_carry_an_hmac_and_a_wrong_secret_removes_nothing(tmp_path, caplog):
    n = 3 * B
    src, tokens = source(n + 1, "bfloat16"), prompt(n + 1)
    d = tmp_path / "s"
    keys = ref_keys(tokens, src)
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d, secret=b"k1") as s:
        assert s.save(src, tokens) == 3
    names = {name(k) for k in keys}
    assert files(d) == names
    for i, key in enumerate(keys):
        data = (d / name(key)).read_bytes()
        assert len(data) == record_size(src, mac=True) and struct.unpack_from("<H", data, 10)[0] == 1
        pr.parse_record(data, **shape_of(src), key=key, secret=b"k1")
    snapshot = {f: (d / f).read_bytes() for f in names}
    for secret in (b"k2", None):  # a wrong secret, or none: misses, counted, nothing removed
        with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d, secret=secret) as s:
            c = cache("bfloat16")
            with caplog.at_level(logging.ERROR, logger="kvcache"):
                assert s.load(c, tokens) == 0
            assert c.seq_len == 0
            st = s.stats()
            assert (st["mac_failures"], st["integrity_failures"], st["integrity_failures_disk"]) == (1, 1, 1)
            assert st["records_disk"] == 3 and st["promotions"] == 0
        assert {f: (d / f).read_bytes() for f in files(d)} == snapshot
    assert sum("fails its HMAC" in r.getMessage() and "kept" in r.getMessage() for r in caplog.records) == 2
    # A forged record (rows changed, no secret to seal them) is refused and kept as well.
    data = bytearray(snapshot[name(keys[1])])
    data[pr.header_bytes(B)] ^= 0xFF
    (d / name(keys[1])).write_bytes(bytes(data))
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d, secret=b"k1") as s:
        c = cache("bfloat16")
        assert s.load(c, tokens) == B
        assert_same(c, src, B)
        assert (s.stats()["mac_failures"], s.stats()["records_disk"]) == (1, 3)
    assert files(d) == names
    (d / name(keys[1])).write_bytes(snapshot[name(keys[1])])
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d, secret=b"k1") as s:
        c = cache("bfloat16")
        assert s.load(c, tokens) == n
        assert_same(c, src, n)
        assert s.stats()["mac_failures"] == 0
    # The reverse: records sealed without a secret are not loaded by a store with one.
    e = tmp_path / "plain"
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=e) as s:
        s.save(src, tokens)
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=e, secret=b"k1") as s:
        assert s.load(cache("bfloat16"), tokens) == 0
        assert s.stats()["mac_failures"] == 1
    assert len(files(e)) == 3


# ---- threads -------------------------------------------------------------------------------

def test_threads_save_and_load_concurrently(tmp_path):
    """Four threads, one store (RAM and disk): each saves prompts that share a first
    block with the others', and loads them back, byte for byte."""
    common = prompt(B, seed=99)
    n_threads, per_thread = 4, 3
    work = []
    for t in range(n_threads):
        items = []
        for j in range(per_thread):
            tokens = common + prompt(3 * B, seed=100 * t + j)
            src = cache()
            k = rows(4 * B, layers=3, seed=1000 * t + j)
            k[:, :B] = rows(B, layers=3, seed=5)  # the common block's KV, the same for all
            src.store_layers(k, -k)
            items.append((tokens, src))
        work.append(items)
    barrier = threading.Barrier(n_threads)
    with kvcache.PrefixStore.for_cache(work[0][0][1], MODEL, disk_dir=tmp_path / "s") as s:
        def worker(items):
            def run():
                barrier.wait()
                for _ in range(2):
                    for tokens, src in items:
                        s.save(src, tokens)
                        c = cache()
                        got = s.load(c, tokens + [0])
                        assert got == 4 * B
                        assert_same(c, src, got)
                return True
            return run
        assert run_threads([worker(items) for items in work], barrier=barrier) == [True] * n_threads
        distinct = 1 + n_threads * per_thread * 3
        st = s.stats()
        assert st["blocks_saved"] == distinct == st["records_ram"] == len(files(tmp_path / "s"))
