"""``kvcache inspect`` of a prefix store's directory, and the per-record checks
behind ``--verify`` (kvcache.prefix.record.verify_file).

The directory is written by real stores of two shapes sharing it (one with
CRC32C records, one with HMAC records); the expected sizes come from the
record layout as docs/format.md states it, recomputed here, and the bad
records are the ones the test damaged.
"""
import os
import shutil
import struct

import numpy as np
import pytest

import kvcache
from helpers import fill, flip_bits
from kvcache.prefix import record as rec
from test_cli import make_persisted, one_line, run

SECRET = b"the-secret\n"  # a trailing newline: the file's bytes are the secret, exactly
A = dict(n_layers=3, n_kv_heads=2, head_dim=5, block_tokens=4, dtype="float32")  # CRC32C records
B = dict(n_layers=2, n_kv_heads=1, head_dim=8, block_tokens=2, dtype="float16")  # HMAC records
TOKENS = {"A": list(range(100, 114)), "B": list(range(7, 14))}  # 3 full blocks each
DEAD_PID = 4194304  # above any pid_max: no process has it


def total_bytes(shape, mac):
    """A record's size from the layout: 128-byte header + 4 bytes a token id, padded to 64;
    every layer's B key rows and B value rows; a 4-byte CRC32C or a 32-byte HMAC."""
    itemsize = {"float32": 4, "float16": 2}[shape["dtype"]]
    row = shape["n_kv_heads"] * shape["head_dim"] * itemsize
    header = -(-(128 + 4 * shape["block_tokens"]) // 64) * 64
    return header + 2 * shape["n_layers"] * shape["block_tokens"] * row + (32 if mac else 4)


def header_bytes(shape):
    return -(-(128 + 4 * shape["block_tokens"]) // 64) * 64


def make_store_dir(d):
    """Two stores' records in ``d``: {"A": [file of block 0, 1, 2], "B": [...]}."""
    files = {}
    for name, shape, secret in (("A", A, None), ("B", B, SECRET)):
        c = kvcache.TieredKVCache(max_seq_len=32, n_layers=shape["n_layers"],
                                  n_kv_heads=shape["n_kv_heads"], head_dim=shape["head_dim"],
                                  block_tokens=shape["block_tokens"], dtype=shape["dtype"])
        fill(c, len(TOKENS[name]), seed=len(files))
        with kvcache.PrefixStore.for_cache(c, f"model-{name}", disk_dir=d, secret=secret) as s:
            assert s.save(c, TOKENS[name]) == 3
        c.close()
        keys = kvcache.prefix_hashes(TOKENS[name], model=f"model-{name}", **shape)
        files[name] = [d / (k.hex() + ".kvp") for k in keys]
        for f in files[name]:
            assert f.stat().st_size == total_bytes(shape, secret is not None)
    return files


def table(out):
    """The group rows of the listing: {shape: [block, dtype, trailer, records, tokens, bytes]}."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and (parts[0] == "unreadable" or parts[0][0].isdigit()) and len(parts) == 7:
            rows[parts[0]] = parts[1:]
    return rows


def state(d):
    """Every entry of ``d``: its bytes and its mtime (inspect is read-only, hits touch mtimes)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir()}


def corrupt_lines(err):
    """{file: check} of the ``kvcache: corrupt: FILE: CHECK: ...`` lines."""
    out = {}
    for line in err.splitlines():
        assert line.startswith("kvcache: corrupt: "), err
        file, check = line[len("kvcache: corrupt: "):].split(": ")[:2]
        assert file not in out, err
        out[file] = check
    return out


@pytest.fixture
def secret_file(tmp_path):
    p = tmp_path / "secret"
    p.write_bytes(SECRET)
    return p


def test_a_clean_store_is_listed_by_shape_and_verifies(tmp_path, secret_file):
    d = tmp_path / "store"
    files = make_store_dir(d)
    before = state(d)
    ta, tb = total_bytes(A, False), total_bytes(B, True)
    rc, out, err = run("inspect", d)
    assert rc == 0, err
    assert f"kvcache prefix store in {d}" in out
    assert f"records: 6, tokens: {3 * 4 + 3 * 2}, bytes: {3 * ta + 3 * tb:,}" in out
    assert "ignored" not in out  # the marker and the lock are the store's own
    assert table(out) == {"3x2x5": ["4", "float32", "CRC32C", "3", "12", f"{3 * ta:,}"],
                          "2x1x8": ["2", "float16", "HMAC", "3", "6", f"{3 * tb:,}"]}
    assert "verify" not in out

    rc, out, err = run("inspect", d, "--verify")
    assert rc == 0, err
    assert ("verify: OK, 3 records pass every check; 3 HMAC records pass all but the MAC check "
            "(no --secret-file)") in out
    unchecked = [line for line in out.splitlines() if "not verified" in line]
    assert sorted(unchecked) == sorted(f"verify: {f}: an HMAC record, its MAC not verified "
                                       f"(no --secret-file)" for f in files["B"])

    rc, out, err = run("inspect", d, "--verify", "--secret-file", secret_file)
    assert rc == 0, err
    assert "verify: OK, 6 records pass every check\n" in out and "not verified" not in out
    assert state(d) == before


def test_verify_names_exactly_the_bad_records(tmp_path, secret_file):
    d = tmp_path / "store"
    files = make_store_dir(d)
    ta, tb = total_bytes(A, False), total_bytes(B, True)
    a0, a1, a2 = files["A"]
    flip_bits(a1, header_bytes(A) + 7, 0x10)           # a byte of layer 0's key rows
    with open(a2, "r+b") as f:                          # cut short
        f.truncate(ta - 1)
    foreign = d / ("ab" * 32 + ".kvp")                  # B's block 1 under another key's name
    os.rename(files["B"][1], foreign)
    garbage = d / ("0" * 64 + ".kvp")
    garbage.write_bytes(b"not a record")
    (d / "notes.txt").write_text("a foreign file")
    (d / f".tmp-{DEAD_PID}-1-1").write_bytes(b"half a record")  # a crashed writer's
    before = state(d)

    rc, out, err = run("inspect", d)
    assert rc == 0, err
    size = 3 * ta - 1 + 3 * tb + len(b"not a record")
    assert f"records: 7, tokens: 18, bytes: {size:,}" in out
    assert "ignored: 1 temporary file (writes in progress); 1 foreign entry (notes.txt)" in out
    assert table(out) == {"3x2x5": ["4", "float32", "CRC32C", "3", "12", f"{3 * ta - 1:,}"],
                          "2x1x8": ["2", "float16", "HMAC", "3", "6", f"{3 * tb:,}"],
                          "unreadable": ["-", "-", "-", "1", "0", "12"]}

    bad = {str(a1): "checksum", str(a2): "size", str(foreign): "key", str(garbage): "size"}
    rc, out, err = run("inspect", d, "--verify", "--secret-file", secret_file)
    assert rc == 1
    assert corrupt_lines(err) == bad
    assert "verify: OK" not in out
    assert f"{a2}: size: {ta - 1} bytes, the header says {ta}" in err

    rc, out, err = run("inspect", d, "--verify")  # the same, the MAC aside
    assert rc == 1 and corrupt_lines(err) == bad
    assert sorted(line.split(": ")[1] for line in out.splitlines() if "not verified" in line) == \
        sorted(str(f) for f in (files["B"][0], files["B"][2]))

    wrong = tmp_path / "wrong"
    wrong.write_bytes(SECRET.strip())  # without its newline: another secret
    rc, out, err = run("inspect", d, "--verify", "--secret-file", wrong)
    assert rc == 1
    assert corrupt_lines(err) == dict(bad, **{str(files["B"][0]): "mac", str(files["B"][2]): "mac"})
    assert state(d) == before  # read-only: nothing removed, renamed or touched (the temp file too)

    for f in (a1, a2, foreign, garbage):
        f.unlink()
    rc, out, err = run("inspect", d, "--verify", "--secret-file", secret_file)
    assert rc == 0, err
    assert "verify: OK, 3 records pass every check\n" in out


def test_secret_file_errors(tmp_path, secret_file):
    d = tmp_path / "store"
    make_store_dir(d)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    rc, out, err = run("inspect", d, "--verify", "--secret-file", empty)
    assert rc == 1 and "--secret-file" in one_line(err) and "empty" in err
    rc, out, err = run("inspect", d, "--verify", "--secret-file", tmp_path / "nope")
    assert rc == 1 and "nope: No such file or directory" in one_line(err)
    c = tmp_path / "cache"
    make_persisted(c)
    rc, out, err = run("inspect", c, "--verify", "--secret-file", secret_file)
    assert rc == 1 and "not a prefix store's directory" in one_line(err)
    rc, out, err = run("inspect", c)  # a persisted cache's directory is still inspected as one
    assert rc == 0 and "kvcache cache in" in out


# -- verify_file, check by check -------------------------------------------------------------

def patch(offset, new):
    def damage(p):
        b = bytearray(p.read_bytes())
        b[offset:offset + len(new)] = new
        p.write_bytes(bytes(b))
    return damage


def resize(n):
    def damage(p):
        b = p.read_bytes()
        p.write_bytes(b[:n] if n <= len(b) else b + b"\0" * (n - len(b)))
    return damage


HA = header_bytes(A)
TA = total_bytes(A, False)
FAULTS = [  # (name, damage(path) of a CRC32C record of shape A, the check verify_file names)
    ("a row byte", lambda p: flip_bits(p, HA + 2 * 4 * 2 * 5 * 4 - 1, 1), "checksum"),
    ("the last value row", lambda p: flip_bits(p, TA - 5, 0x80), "checksum"),
    ("the trailer", lambda p: flip_bits(p, TA - 1, 1), "checksum"),
    ("magic", patch(0, b"KVCPREG\0"), "header"),
    ("version", patch(8, struct.pack("<H", 2)), "header"),
    ("flags", patch(10, struct.pack("<H", 4)), "header"),
    ("header_bytes", patch(12, struct.pack("<I", HA + 64)), "header"),
    ("n_layers", patch(16, struct.pack("<I", 2)), "header"),
    ("head_dim", patch(24, struct.pack("<I", 6)), "header"),
    ("row_bytes", patch(32, struct.pack("<I", 41)), "header"),
    ("dtype code", patch(36, b"\xee"), "header"),
    ("a pad byte after the dtype", patch(38, b"\1"), "header"),
    ("total", patch(40, struct.pack("<Q", TA + 1)), "header"),
    ("the key", lambda p: flip_bits(p, 48, 1), "key"),
    ("the parent", lambda p: flip_bits(p, 100, 1), "key"),
    ("a reserved byte", patch(120, b"\1"), "header"),
    ("a token id", lambda p: flip_bits(p, 128 + 4, 1), "key"),
    ("the padding after the token ids", patch(128 + 4 * 4 + 3, b"\1"), "header"),
    ("cut short", resize(TA - 1), "size"),
    ("one byte more", resize(TA + 1), "size"),
    ("only the fixed header", resize(128), "size"),
    ("empty", resize(0), "size"),
]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean") / "store"
    return make_store_dir(d)


@pytest.mark.parametrize("name,damage,check", FAULTS, ids=[f[0] for f in FAULTS])
def test_verify_file_names_the_failed_check(clean, tmp_path, name, damage, check):
    src = clean["A"][1]
    assert rec.verify_file(src) is None
    p = tmp_path / src.name
    shutil.copyfile(src, p)
    damage(p)
    why = rec.verify_file(p, key=bytes.fromhex(p.name[:-4]))
    assert why is not None and why.split(": ")[0] == check, why
    assert why != rec.MAC_UNCHECKED


def test_verify_file_of_hmac_records(clean, tmp_path):
    src = clean["B"][0]
    assert rec.verify_file(src) == rec.MAC_UNCHECKED
    assert rec.verify_file(src, SECRET) is None
    assert rec.verify_file(src, b"another").startswith("mac: ")
    p = tmp_path / src.name
    shutil.copyfile(src, p)
    flip_bits(p, header_bytes(B), 1)  # a row: only the MAC covers it
    assert rec.verify_file(p) == rec.MAC_UNCHECKED
    assert rec.verify_file(p, SECRET).startswith("mac: ")
    flip_bits(p, 52, 1)  # the key: found without the secret
    assert rec.verify_file(p).startswith("key: ")


def test_verify_file_checks_the_name(clean, tmp_path):
    src = clean["A"][0]
    key = bytes.fromhex(src.name[:-4])
    assert rec.verify_file(src, key=key) is None
    other = bytes.fromhex(clean["A"][1].name[:-4])
    assert rec.verify_file(src, key=other).startswith("key: named ")
    assert rec.verify_file(src, SECRET, key=key) is None  # a CRC32C record needs no secret
    link = tmp_path / "link.kvp"
    link.symlink_to(src)
    with pytest.raises(OSError):  # a symlink is not followed
        rec.verify_file(link)
    assert np.array_equal(rec.token_ids_of(src.read_bytes(), rec.Layout(**A, mac=False)),
                          TOKENS["A"][:4])  # the file of block 0
