"""An independent reader of the prefix store, written only from docs/format.md §7.

It does not import kvcache (only format_reader, the reader of §2 written the same way,
for CRC32C and the row layouts): it shows that the document is enough to compute prefix
keys (§7.1) and to parse and verify a record (§7.2) or a record file of a store's
directory (§7.3), returning its rows as numpy arrays.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence

import ml_dtypes
import numpy as np

from format_reader import DTYPE_CODES, crc32c, decode_rows, row_bytes

KEY_MAGIC = b"kvcache-prefix-v1\0"
MAGIC = b"KVCPREF\0"
VERSION = 1
FLAG_HMAC = 1
SUFFIX = ".kvp"
MARKER = "KVCACHE-PREFIX"


class RecordError(Exception):
    """A record failing a check of §7.2; ``check`` names it (size, header, key, ...)."""

    def __init__(self, check: str, message: str):
        super().__init__(f"{check}: {message}")
        self.check = check


# ---- §7.1 keys ----

def root(model: str, n_layers: int, n_kv_heads: int, head_dim: int, block_tokens: int, dtype: str,
         salt: bytes = b"") -> bytes:
    shape = f"{n_layers}x{n_kv_heads}x{head_dim}:{block_tokens}:{dtype}"
    return hashlib.sha256(KEY_MAGIC + model.encode("utf-8") + b"\0" + hashlib.sha256(salt).digest()
                          + shape.encode()).digest()


def keys(tokens: Sequence[int], model: str, n_layers: int, n_kv_heads: int, head_dim: int,
         block_tokens: int, dtype: str, salt: bytes = b"") -> List[bytes]:
    """One key per full block of ``tokens`` (Python ints in [0, 2**32))."""
    out, parent = [], root(model, n_layers, n_kv_heads, head_dim, block_tokens, dtype, salt)
    for i in range(len(tokens) // block_tokens):
        block = tokens[i * block_tokens:(i + 1) * block_tokens]
        parent = hashlib.sha256(parent + struct.pack(f"<{block_tokens}I", *block)).digest()
        out.append(parent)
    return out


# ---- §7.2 records ----

def header_bytes(block_tokens: int) -> int:
    return -(-(128 + 4 * block_tokens) // 64) * 64


def record_size(n_layers, n_kv_heads, head_dim, block_tokens, dtype, mac=False) -> int:
    return (header_bytes(block_tokens) + 2 * n_layers * block_tokens * row_bytes(dtype, n_kv_heads, head_dim)
            + (32 if mac else 4))


@dataclass
class Record:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str
    key: bytes
    parent: bytes
    tokens: List[int]
    rows: List[tuple]   # per layer: (key rows, value rows) as bytes, B rows of R bytes each

    def stored(self, layer: int):
        """Layer ``layer``'s (keys, values) in the stored representation, as
        ``get(layer, raw=True)`` gives it: float32 / float16 / bfloat16 arrays
        [B, H, D], or for int8 a pair (values int8 [B, H, D], scales float32 [B, H])."""
        return tuple(_stored(raw, self.dtype, self.n_kv_heads, self.head_dim) for raw in self.rows[layer])

    def widened(self, layer: int):
        """Layer ``layer``'s (keys, values) as float32 [B, H, D] (§2.3)."""
        return tuple(decode_rows(raw, self.dtype, self.n_kv_heads, self.head_dim) for raw in self.rows[layer])


def _stored(raw: bytes, dtype: str, h: int, d: int):
    r = row_bytes(dtype, h, d)
    a = np.frombuffer(raw, np.uint8).reshape(-1, r)
    if dtype == "int8":
        scales = np.ascontiguousarray(a[:, :4 * h]).view("<f4").reshape(-1, h)
        q = np.ascontiguousarray(a[:, 4 * h:4 * h + h * d]).view(np.int8).reshape(-1, h, d)
        return q, scales
    np_type = {"float32": "<f4", "float16": "<f2", "bfloat16": ml_dtypes.bfloat16}[dtype]
    return np.ascontiguousarray(a).view(np_type).reshape(-1, h, d)


def parse_record(data, *, n_layers: int, n_kv_heads: int, head_dim: int, block_tokens: int, dtype: str,
                 key: bytes, parent: Optional[bytes] = None, tokens: Optional[Sequence[int]] = None,
                 secret: Optional[bytes] = None) -> Record:
    """Check ``data`` as §7.2's list says, in its order, and return it; RecordError
    naming the first failed check.  ``parent`` / ``tokens`` None: not compared
    (a record read alone); the record's own SHA-256 chain is always checked."""
    data = bytes(data)
    L, H, D, B = n_layers, n_kv_heads, head_dim, block_tokens
    R, HB, mac = row_bytes(dtype, H, D), header_bytes(B), secret is not None
    body = HB + 2 * L * B * R
    total = body + (32 if mac else 4)
    if len(data) != total:                                              # 1
        raise RecordError("size", f"{len(data)} bytes, expected {total}")
    (magic, version, flags, hb, n_l, n_h, h_d, b_t, r_b, code, tot) = struct.unpack_from(
        "<8sHHIIIIIIBxxxQ", data, 0)
    want = (MAGIC, VERSION, FLAG_HMAC if mac else 0, HB, L, H, D, B, R, DTYPE_CODES[dtype], total)
    got = (magic, version, flags, hb, n_l, n_h, h_d, b_t, r_b, code, tot)
    names = ("magic", "version", "flags", "header_bytes", "n_layers", "n_kv_heads", "head_dim",
             "block_tokens", "row_bytes", "dtype", "total")
    for name, g, w in zip(names, got, want):                             # 2
        if g != w:
            raise RecordError("header", f"{name} {g!r}, expected {w!r}")
    if data[37:40] != bytes(3) or data[112:128] != bytes(16):
        raise RecordError("header", "nonzero padding or reserved bytes in the header")
    rec_key, rec_parent = data[48:80], data[80:112]
    if rec_key != key:                                                   # 3
        raise RecordError("key", f"{rec_key.hex()}, expected {key.hex()}")
    if parent is not None and rec_parent != parent:                      # 4
        raise RecordError("parent", f"{rec_parent.hex()}, expected {parent.hex()}")
    ids = data[128:128 + 4 * B]
    if tokens is not None and ids != struct.pack(f"<{B}I", *tokens):     # 5
        raise RecordError("tokens", "token ids differ from the prompt's")
    if hashlib.sha256(rec_parent + ids).digest() != rec_key:
        raise RecordError("tokens", "SHA-256(parent + token ids) is not the key")
    if data[128 + 4 * B:HB] != bytes(HB - 128 - 4 * B):                 # 6
        raise RecordError("padding", "nonzero padding after the token ids")
    if mac:                                                              # 7
        if not hmac.compare_digest(data[body:], hmac.new(secret, data[:body], hashlib.sha256).digest()):
            raise RecordError("mac", "HMAC-SHA256 mismatch")
    elif struct.unpack_from("<I", data, body)[0] != crc32c(data[:body]):
        raise RecordError("checksum", "CRC32C mismatch")
    step = B * R
    rows = [(data[HB + 2 * l * step:HB + (2 * l + 1) * step], data[HB + (2 * l + 1) * step:HB + (2 * l + 2) * step])
            for l in range(L)]
    return Record(L, H, D, B, dtype, rec_key, rec_parent, list(struct.unpack(f"<{B}I", ids)), rows)


# ---- §7.3 the directory ----

def record_files(directory) -> List[str]:
    """Names of the record files of a store's directory (the marker required)."""
    if not os.path.isfile(os.path.join(directory, MARKER)):
        raise RecordError("directory", f"{directory} has no {MARKER} marker")
    names = []
    for name in os.listdir(directory):
        stem = name[:-len(SUFFIX)]
        if name.endswith(SUFFIX) and len(stem) == 64 and all(c in "0123456789abcdef" for c in stem):
            names.append(name)
    return sorted(names)


def read_record(path, **shape) -> Record:
    """Read and check the record file ``path``: its key is the one its name gives."""
    name = os.path.basename(os.fspath(path))
    if not name.endswith(SUFFIX):
        raise RecordError("name", f"{name} is not <key>{SUFFIX}")
    with open(path, "rb") as f:
        data = f.read()
    return parse_record(data, key=bytes.fromhex(name[:-len(SUFFIX)]), **shape)
