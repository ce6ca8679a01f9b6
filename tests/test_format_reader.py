"""tests/format_reader.py (written only from docs/format.md) against the library.

Caches are made with the public API; the independent reader must return exactly what
``TieredKVCache.open(dir).get(layer)`` returns (float32 bits, NaN payloads included),
the raw rows ``get(..., raw=True)`` returns, and refuse damaged directories.
"""

import json
import os
import struct
import zlib

import numpy as np
import pytest

import ml_dtypes

import kvcache
from format_reader import FormatError, crc32c, read_cache, row_bytes

H, D, B = 2, 5, 4  # N = 10: int8 rows have 2 padding bytes, float16 rows are 20 bytes
DTYPES = ["float32", "float16", "bfloat16", "int8"]
LENGTHS = (37, 16, 21)  # partial last block, exactly full blocks, another partial one


def tokens(n, seed, specials=True):
    """Random float32 [n, H, D], with NaN payloads, infinities, -0.0, subnormals, huge values."""
    x = np.random.default_rng(seed).standard_normal((n, H, D), dtype=np.float32) * 3
    if specials and n > 6:
        bits = x.view(np.uint32)
        bits[1, 0, 0] = 0x7F800001  # signalling NaN, payload 1
        bits[1, 1, 2] = 0xFFC12345  # negative quiet NaN with a payload
        bits[2, 0, 1] = 0x7F800000  # +inf
        bits[2, 1, 4] = 0xFF800000  # -inf
        bits[3, 0, :] = 0x80000000  # -0.0 (a whole head)
        bits[4, 1, 3] = 0x00000001  # smallest subnormal
        bits[5, 0, 2] = 0x7F7FFFFF  # FLT_MAX: overflows float16, near the int8 limit
        bits[6, 1, :] = 0           # an all-zero head (int8 scale 0)
    return x


def make_cache(directory, dtype, cold_dtype=None, hot_tokens=None, lengths=LENGTHS, max_seq_len=64):
    """Store ``lengths[l]`` positions in layer l, in several calls with a flush between."""
    c = kvcache.TieredKVCache(n_layers=len(lengths), n_kv_heads=H, head_dim=D, max_seq_len=max_seq_len,
                              block_tokens=B, hot_tokens=hot_tokens, dtype=dtype, cold_dtype=cold_dtype,
                              cold_dir=str(directory), persist=True)
    first = min(lengths)
    k = np.stack([tokens(first, 10 + l) for l in range(len(lengths))])
    c.store_layers(k, -k)
    c.flush()
    for l, n in enumerate(lengths):
        rest = tokens(n - first, 100 + l, specials=False)
        for p in range(0, n - first, 3):  # a few positions per call, via store
            c.store(l, rest[p: p + 3], rest[p: p + 3] * 0.5)
    c.close()
    return directory


def int8_rows(q, scales):
    """Row bytes from get(raw=True)'s int8 pair: scales | q | zero padding (§2.3)."""
    n, h, d = q.shape
    pad = (4 - (h * d) % 4) % 4
    return np.concatenate([np.ascontiguousarray(scales, "<f4").view(np.uint8).reshape(n, 4 * h),
                           np.ascontiguousarray(q).view(np.uint8).reshape(n, h * d),
                           np.zeros((n, pad), np.uint8)], axis=1).tobytes()


def check_against_library(directory, raw):
    got = read_cache(str(directory))
    with kvcache.TieredKVCache.open(str(directory)) as c:
        assert len(got.layers) == got.config["n_layers"]
        for l, layer in enumerate(got.layers):
            k, v = c.get(l)
            cfg = got.config
            assert layer.keys.shape == k.shape == (layer.length, cfg["n_kv_heads"], cfg["head_dim"])
            assert layer.keys.dtype == np.float32 and layer.values.dtype == np.float32
            assert layer.keys.tobytes() == k.tobytes()
            assert layer.values.tobytes() == v.tobytes()
            assert len(layer.keys_raw) == len(layer.values_raw) == layer.length * got.row_bytes
            if raw:
                rk, rv = c.get(l, raw=True)
                if got.cold_format == "int8":
                    assert layer.keys_raw == int8_rows(*rk)
                    assert layer.values_raw == int8_rows(*rv)
                else:
                    assert layer.keys_raw == np.ascontiguousarray(rk).tobytes()
                    assert layer.values_raw == np.ascontiguousarray(rv).tobytes()
    again = read_cache(str(directory))  # open + get + close changed nothing the reader sees
    for a, b in zip(got.layers, again.layers):
        assert (a.keys_raw, a.values_raw) == (b.keys_raw, b.values_raw)
    return got


# ---- CRC32C ----

def test_crc32c_check_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA
    # §6.1: the keys file's blocks
    rows = bytes.fromhex("000080bf000000bf" "000000000000003f" "0000803f0000c03f")
    assert crc32c(rows[:16]) == 0xFCBA940D and crc32c(rows[16:]) == 0x039F9D65


@pytest.mark.parametrize("n", [1, 3, 4, 5, 63, 1023, 1024, 1025, 4097, 65536, 300_001])
def test_crc32c_matches_library(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32c(data) == kvcache._simd.crc32c(data)


# ---- reading what the library wrote ----

@pytest.mark.parametrize("tiered", [False, True], ids=["ram", "tiered"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reader_matches_library(tmp_path, dtype, tiered):
    d = make_cache(tmp_path / "c", dtype, hot_tokens=2 * B if tiered else None)
    got = check_against_library(d, raw=True)
    assert [layer.length for layer in got.layers] == list(LENGTHS)
    assert got.cold_format == dtype and got.row_bytes == row_bytes(dtype, H, D)
    if dtype == "float32":  # an oracle independent of the library: the input bits
        first = min(LENGTHS)
        for l, layer in enumerate(got.layers):
            rest = tokens(LENGTHS[l] - first, 100 + l, specials=False)
            keys = np.concatenate([tokens(first, 10 + l), rest])
            values = np.concatenate([-tokens(first, 10 + l), rest * 0.5])
            assert layer.keys.tobytes() == keys.tobytes() and layer.values.tobytes() == values.tobytes()


@pytest.mark.parametrize("tiered", [False, True], ids=["ram", "tiered"])
@pytest.mark.parametrize("dtype,cold_dtype", [("float32", "float16"), ("float32", "bfloat16"),
                                              ("float32", "int8"), ("bfloat16", "float32"),
                                              ("float16", "float32")])
def test_reader_matches_library_mixed_tiers(tmp_path, dtype, cold_dtype, tiered):
    """The RAM tier's dtype holds the cold values exactly: get returns them bit for bit."""
    d = make_cache(tmp_path / "c", dtype, cold_dtype, hot_tokens=2 * B if tiered else None)
    got = check_against_library(d, raw=False)
    assert got.cold_format == cold_dtype


def round_to(x, dtype):
    with np.errstate(all="ignore"):  # FLT_MAX-sized int8 values overflow float16: data
        return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).astype(np.float32)


@pytest.mark.parametrize("tiered", [False, True], ids=["ram", "tiered"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrower_ram_tier_than_int8_cold(tmp_path, dtype, tiered):
    """§4: int8 cold values do not fit float16 / bfloat16. A row get serves from RAM after
    a promotion comes back in the RAM tier's rounding; one served from the file is exact."""
    d = make_cache(tmp_path / "c", dtype, "int8", hot_tokens=2 * B if tiered else None)
    got = read_cache(str(d))
    with kvcache.TieredKVCache.open(str(d)) as c:
        for l, layer in enumerate(got.layers):
            for name, lib in zip(("keys", "values"), c.get(l)):
                exact = getattr(layer, name)
                rounded = round_to(exact, dtype)
                for p in range(layer.length):
                    assert lib[p].tobytes() in (exact[p].tobytes(), rounded[p].tobytes())
                if not tiered:  # every block is loaded into RAM: all rows rounded
                    assert lib.tobytes() == rounded.tobytes()


def test_empty_layers(tmp_path):
    d = tmp_path / "c"
    kvcache.TieredKVCache(n_layers=2, n_kv_heads=H, head_dim=D, max_seq_len=8, block_tokens=B,
                          cold_dir=str(d), persist=True).close()
    assert all(os.path.getsize(d / f"layer{l:04d}.{k}") == 4096 for l in (0, 1) for k in ("keys", "values"))
    got = check_against_library(d, raw=True)
    assert [(x.length, x.keys.shape, x.keys_raw) for x in got.layers] == [(0, (0, H, D), b"")] * 2


def test_stale_tail_and_foreign_files_are_ignored(tmp_path):
    d = tmp_path / "c"
    c = kvcache.TieredKVCache(n_layers=1, n_kv_heads=H, head_dim=D, max_seq_len=64, block_tokens=B,
                              hot_tokens=2 * B, dtype="int8", cold_dir=str(d), persist=True)
    c.store(0, tokens(30, 1), tokens(30, 2))
    c.flush()
    c.truncate(9)  # flushes at once; the files keep 30 rows
    c.store(0, tokens(2, 3), tokens(2, 4))
    c.close()
    r = row_bytes("int8", H, D)
    assert os.path.getsize(d / "layer0000.keys") >= 4096 + 30 * r
    with open(d / "layer0000.keys", "r+b") as f:  # the tail is not data: damage it
        f.seek(4096 + 20 * r)
        f.write(b"\xff" * r)
    (d / "index.json.tmp").write_bytes(b'{"half an ind')
    (d / "notes.txt").write_text("not ours")
    got = check_against_library(d, raw=True)
    assert got.layers[0].length == 11


# ---- the document's test vectors (§6) ----

DOC_INDEX_F32 = (
    '{"magic":"kvcache-index","version":1,"config":{"n_layers":1,"n_kv_heads":1,"head_dim":2,'
    '"max_seq_len":4,"hot_tokens":null,"dtype":"float32","cold_dtype":null,"eviction_policy":"lru",'
    '"sink_tokens":0,"block_tokens":2,"max_cold_bytes":null,"recent_tokens":null,'
    '"adaptive_recency_weight":1.0,"adaptive_frequency_weight":16.0,"promote_on_read":true},'
    '"layers":[{"length":3,"rows":[2,1],"crc_k":[4240086029,60792165],"crc_v":[380030077,1867994695]}]}'
    "\n813f38d4\n")
DOC_INDEX_I8 = (
    '{"magic":"kvcache-index","version":1,"config":{"n_layers":1,"n_kv_heads":2,"head_dim":3,'
    '"max_seq_len":4,"hot_tokens":null,"dtype":"int8","cold_dtype":null,"eviction_policy":"lru",'
    '"sink_tokens":0,"block_tokens":2,"max_cold_bytes":null,"recent_tokens":null,'
    '"adaptive_recency_weight":1.0,"adaptive_frequency_weight":16.0,"promote_on_read":true},'
    '"layers":[{"length":3,"rows":[2,1],"crc_k":[3445557803,239131630],"crc_v":[1299230195,3355812856]}]}'
    "\n98bce4fd\n")
DOC_HEADER_F32 = bytes.fromhex(
    "4b 56 43 41 43 48 45 00 01 00 00 00 00 00 00 00 00 00 00 00 01 00 00 00"
    "01 00 00 00 02 00 00 00 02 00 00 00 00 00 00 00 66 8a f4 b5")


def test_doc_vector_float32_from_bytes(tmp_path):
    """§6.1 rebuilt from the document's bytes alone, then read."""
    (tmp_path / "index.json").write_text(DOC_INDEX_F32)
    keys = bytes.fromhex("000080bf000000bf 000000000000003f 0000803f0000c03f".replace(" ", ""))
    values = bytes.fromhex("00000080000080be 000000bf000040bf 000080bf0000a0bf".replace(" ", ""))
    vhead = DOC_HEADER_F32[:12] + b"\x01" + DOC_HEADER_F32[13:40] + bytes.fromhex("7b7741b4")
    (tmp_path / "layer0000.keys").write_bytes(DOC_HEADER_F32.ljust(4096, b"\0") + keys)
    (tmp_path / "layer0000.values").write_bytes(vhead.ljust(4096, b"\0") + values)
    got = read_cache(str(tmp_path)).layers[0]
    assert got.keys.tolist() == [[[-1, -0.5]], [[0, 0.5]], [[1, 1.5]]]
    assert got.values.tobytes() == np.array([[[-0.0, -0.25]], [[-0.5, -0.75]], [[-1, -1.25]]], np.float32).tobytes()
    check_against_library(tmp_path, raw=True)


def small_cache(d, keys, values, **kw):
    c = kvcache.TieredKVCache(n_layers=1, max_seq_len=4, block_tokens=2, cold_dir=str(d), persist=True, **kw)
    c.store_batch(0, np.asarray(keys, np.float32), np.asarray(values, np.float32))
    c.close()


def test_doc_vectors_match_library(tmp_path):
    """The library still writes the document's §6.1 / §6.2 bytes."""
    k = [[[-1, -0.5]], [[0, 0.5]], [[1, 1.5]]]
    v = [[[-0.0, -0.25]], [[-0.5, -0.75]], [[-1, -1.25]]]
    small_cache(tmp_path / "f32", k, v, n_kv_heads=1, head_dim=2)
    assert (tmp_path / "f32" / "index.json").read_text() == DOC_INDEX_F32
    assert (tmp_path / "f32" / "layer0000.keys").read_bytes()[:4096] == DOC_HEADER_F32.ljust(4096, b"\0")
    for cold, rows, crc_k in [("float16", "00bc00b8 00000038 003c003e", [3070158544, 3818234128]),
                              ("bfloat16", "80bf00bf 0000003f 803fc03f", [1179021123, 2913212322])]:
        small_cache(tmp_path / cold, k, v, n_kv_heads=1, head_dim=2, cold_dtype=cold)
        got = read_cache(str(tmp_path / cold))
        assert got.layers[0].keys_raw == bytes.fromhex(rows.replace(" ", ""))
        idx = json.loads((tmp_path / cold / "index.json").read_text().split("\n")[0])
        assert idx["layers"][0]["crc_k"] == crc_k
    # §6.2: keys = -1 + 0.5 * arange(18) with element d = 0 of every head set to 100,
    # values = -0.25 * arange(18), both shaped [3, 2, 3]
    k8 = (-1 + 0.5 * np.arange(18, dtype=np.float32)).reshape(3, 2, 3)
    k8[:, :, 0] = 100
    v8 = (-0.25 * np.arange(18, dtype=np.float32)).reshape(3, 2, 3)
    small_cache(tmp_path / "i8", k8, v8, n_kv_heads=2, head_dim=3, dtype="int8")
    got = read_cache(str(tmp_path / "i8"))
    assert got.layers[0].keys_raw[:16] == bytes.fromhex("2693493f2693493f7fff007f01020000")
    assert got.layers[0].values_raw[:16] == bytes.fromhex("0402813b8542213c00c081b49a810000")
    assert got.layers[0].keys[0].tolist() == np.array([[100, -0.78740156, 0], [100, 0.78740156, 1.5748031]],
                                                      np.float32).tolist()
    assert (tmp_path / "i8" / "index.json").read_text() == DOC_INDEX_I8
    assert os.path.getsize(tmp_path / "i8" / "layer0000.keys") == 4144
    assert (tmp_path / "i8" / "layer0000.keys").read_bytes()[:44] == bytes.fromhex(
        "4b 56 43 41 43 48 45 00 01 00 00 00 00 00 00 00 00 00 00 00 01 00 00 00"
        "02 00 00 00 03 00 00 00 02 00 00 00 03 00 00 00 15 dd 2c 15")
    check_against_library(tmp_path / "i8", raw=True)


def test_doc_vector_stale_tail(tmp_path):
    """§6.3: an empty fresh index, then a file longer than its layer's length."""
    d = tmp_path / "c"
    c = kvcache.TieredKVCache(n_layers=2, n_kv_heads=1, head_dim=2, block_tokens=2, max_seq_len=8,
                              cold_dir=str(d), persist=True)
    fresh = read_cache(str(d))
    assert [(x.length, x.keys_raw) for x in fresh.layers] == [(0, b"")] * 2
    assert sorted(os.listdir(d)) == ["index.json", "layer0000.keys", "layer0000.values",
                                     "layer0001.keys", "layer0001.values"]
    assert all(os.path.getsize(d / n) == 4096 for n in os.listdir(d) if n.startswith("layer"))
    x = np.arange(20, dtype=np.float32).reshape(2, 5, 1, 2)
    c.store_layers(x, x)
    c.flush()
    c.truncate(1)
    c.store_layers(x[:, :1] + 100, x[:, :1] + 100)
    c.close()
    assert os.path.getsize(d / "layer0000.keys") == 4136
    idx = json.loads((d / "index.json").read_text().split("\n")[0])
    assert [(x["length"], x["rows"]) for x in idx["layers"]] == [(2, [2])] * 2
    got = check_against_library(d, raw=True)
    assert got.layers[0].keys.ravel().tolist() == [0, 1, 100, 101]


# ---- damaged directories ----

@pytest.fixture
def damaged(tmp_path):
    return make_cache(tmp_path / "c", "int8", hot_tokens=2 * B)


def flip(path, offset, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


@pytest.mark.parametrize("where", ["first", "last_of_partial_block", "int8_padding", "values_file"])
def test_flipped_block_byte_is_refused(damaged, where):
    r, n = row_bytes("int8", H, D), LENGTHS[0]
    name, offset = {"first": ("keys", 4096), "last_of_partial_block": ("keys", 4096 + n * r - 1),
                    "int8_padding": ("keys", 4096 + 6 * r + r - 1),
                    "values_file": ("values", 4096 + 13 * r + 5)}[where]
    flip(damaged / f"layer0000.{name}", offset)
    with pytest.raises(FormatError, match="CRC32C"):
        read_cache(str(damaged))
    read_cache(str(damaged), verify=False)  # everything but the block checksums still holds
    with pytest.raises(kvcache.CorruptionError):
        with kvcache.TieredKVCache.open(str(damaged)) as c:
            c.get(0)


def test_edited_index_is_refused(damaged):
    path = damaged / "index.json"
    text = path.read_text()
    edited = text.replace('"length":37', '"length":36', 1)
    assert edited != text
    path.write_text(edited)
    with pytest.raises(FormatError, match="checksum"):
        read_cache(str(damaged))
    with pytest.raises(kvcache.CorruptionError):
        kvcache.TieredKVCache.open(str(damaged)).close()


def reindex(path, edit):
    """Rewrite index.json with ``edit(obj)`` applied and a valid checksum."""
    obj = json.loads(path.read_text().split("\n")[0])
    edit(obj)
    body = json.dumps(obj, separators=(",", ":"))
    path.write_text(f"{body}\n{zlib.crc32(body.encode()):08x}\n")


@pytest.mark.parametrize("edit,match", [
    (lambda o: o["layers"][0].update(length=36), "rows"),
    (lambda o: o["layers"][0]["crc_k"].pop(), "crc_k"),
    (lambda o: o["layers"][0]["crc_v"].__setitem__(0, True), "crc_v"),
    (lambda o: o["layers"][0].update(length=65), "length"),
    (lambda o: o["config"].update(n_kv_heads=True), "n_kv_heads"),
    (lambda o: o["config"].pop("promote_on_read"), "config"),
    (lambda o: o["layers"].pop(), "n_layers"),
    (lambda o: o.update(version=2), "version"),
    (lambda o: o["config"].update(cold_dtype="int4"), "dtype"),
    (lambda o: o["layers"][1]["crc_k"].__setitem__(0, o["layers"][1]["crc_k"][0] ^ 1), "CRC32C"),
])
def test_index_with_valid_checksum_is_still_checked(damaged, edit, match):
    reindex(damaged / "index.json", edit)
    with pytest.raises(FormatError, match=match):
        read_cache(str(damaged))


@pytest.mark.parametrize("edit", [lambda t: t + "\n", lambda t: t + "x", lambda t: t[:-1], lambda t: t[:-2] + "\n",
                                  lambda t: t.replace("\n", "\r\n"), lambda t: ""],
                         ids=["extra_newline", "trailing_byte", "no_final_newline", "crc_7_digits", "crlf", "empty"])
def test_index_layout(damaged, edit):
    path = damaged / "index.json"
    path.write_bytes(edit(path.read_text()).encode())
    with pytest.raises(FormatError):
        read_cache(str(damaged))


def test_index_crc_must_be_lowercase(damaged):
    path = damaged / "index.json"
    body, crc, _ = path.read_text().rsplit("\n", 2)
    if crc == crc.upper():
        pytest.skip("this checksum has no hex letters")
    path.write_text(f"{body}\n{crc.upper()}\n")
    with pytest.raises(FormatError, match="hex"):
        read_cache(str(damaged))


def rewrite_header(path, **fields):
    """Replace header fields and recompute the header CRC (a well-formed, foreign header)."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(44))
        names = ["version", "kind", "layer", "n_layers", "n_kv_heads", "head_dim", "block_tokens", "dtype"]
        for name, value in fields.items():
            struct.pack_into("<I", head, 8 + 4 * names.index(name), value)
        struct.pack_into("<I", head, 40, zlib.crc32(bytes(head[:40])))
        f.seek(0)
        f.write(head)


@pytest.mark.parametrize("offset", [0, 7, 12, 16, 36, 40, 43])
def test_damaged_header_is_refused(damaged, offset):
    flip(damaged / "layer0002.values", offset, 0x10)
    with pytest.raises(FormatError, match="magic" if offset < 8 else "header CRC"):
        read_cache(str(damaged))
    with pytest.raises(kvcache.CorruptionError):
        kvcache.TieredKVCache.open(str(damaged)).close()


@pytest.mark.parametrize("fields,match", [
    (dict(version=2), "version"), (dict(kind=0), "kind"), (dict(layer=1), "layer"),
    (dict(n_layers=4), "n_layers"), (dict(head_dim=4), "head_dim"), (dict(block_tokens=8), "block_tokens"),
    (dict(dtype=1), "dtype"),
])
def test_foreign_header_is_refused(damaged, fields, match):
    rewrite_header(damaged / "layer0002.values", **fields)
    with pytest.raises(FormatError, match=match):
        read_cache(str(damaged))


def test_short_or_missing_file_is_refused(damaged):
    r = row_bytes("int8", H, D)
    os.truncate(damaged / "layer0001.keys", 4096 + LENGTHS[1] * r - 1)
    with pytest.raises(FormatError, match="bytes, index needs"):
        read_cache(str(damaged))
    os.remove(damaged / "layer0001.keys")
    with pytest.raises(FormatError, match="layer0001.keys"):
        read_cache(str(damaged))
    os.remove(damaged / "index.json")
    with pytest.raises(FormatError, match="index"):
        read_cache(str(damaged))
