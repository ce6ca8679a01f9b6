"""An independent reader of a persisted cache directory, written only from docs/format.md.

It does not import kvcache: it exists to show that the document is enough to read, and
verify, what a ``TieredKVCache(persist=True)`` leaves on disk. ``read_cache(dir)`` checks
the index (§3), every cold file's header (§2.1), size and block CRC32C (§3.4), and
returns each layer's keys and values widened to float32 (§2.3) with the raw rows.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

HEADER_BYTES = 4096
MAGIC = b"KVCACHE\0"
VERSION = 1
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "int8": 3}
KINDS = ("keys", "values")  # header kind 0, 1
CONFIG_FIELDS = (
    "n_layers", "n_kv_heads", "head_dim", "max_seq_len", "hot_tokens", "dtype", "cold_dtype",
    "eviction_policy", "sink_tokens", "block_tokens", "max_cold_bytes", "recent_tokens",
    "adaptive_recency_weight", "adaptive_frequency_weight", "promote_on_read",
)


class FormatError(Exception):
    """The directory is not a valid persisted cache (format version 1)."""


# ---- CRC32C (Castagnoli): reflected poly 0x82F63B78, init and xorout 0xFFFFFFFF ----

def _make_table(poly: int) -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(poly), t >> 1).astype(np.uint32)
    return t


_T = _make_table(0x82F63B78)
_TL = [int(x) for x in _T]


def _shift_tables(m: int) -> list[list[int]]:
    """Tables for the linear map 'feed m zero bytes' on a raw CRC state, one per state byte."""
    s = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None]).ravel()
    for _ in range(m):
        s = _T[s & 0xFF] ^ (s >> 8)
    return [[int(x) for x in s[256 * k: 256 * (k + 1)]] for k in range(4)]


def crc32c(data) -> int:
    """CRC32C of a bytes-like object. Large inputs run as ~sqrt(n) numpy lanes, recombined."""
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    n = buf.size
    if n < 1024:
        c = 0xFFFFFFFF
        for b in buf.tobytes():
            c = _TL[(c ^ b) & 0xFF] ^ (c >> 8)
        return c ^ 0xFFFFFFFF
    # The raw CRC (init 0, no xorout) is linear and ignores leading zeros; init 0xFFFFFFFF
    # equals xoring the first 4 bytes with 0xFF. Pad in front to K lanes of m bytes, run
    # all lanes at once, then fold them in order: acc = shift_m(acc) ^ lane.
    lanes = int(np.sqrt(n)) + 1
    m = -(-n // lanes)
    msg = np.zeros(lanes * m, dtype=np.uint8)
    msg[lanes * m - n:] = buf
    msg[lanes * m - n: lanes * m - n + 4] ^= 0xFF
    cols = msg.reshape(lanes, m).T.copy()
    s = np.zeros(lanes, dtype=np.uint32)
    for i in range(m):
        s = _T[(s ^ cols[i]) & 0xFF] ^ (s >> 8)
    t0, t1, t2, t3 = _shift_tables(m)
    acc = 0
    for c in s.tolist():
        acc = t0[acc & 0xFF] ^ t1[(acc >> 8) & 0xFF] ^ t2[(acc >> 16) & 0xFF] ^ t3[acc >> 24] ^ c
    return acc ^ 0xFFFFFFFF


# ---- decoding rows (§2.3) ----

def row_bytes(fmt: str, h: int, d: int) -> int:
    n = h * d
    return {"float32": 4 * n, "float16": 2 * n, "bfloat16": 2 * n}.get(fmt, 4 * h + 4 * -(-n // 4))


def _half_to_float32(h16: np.ndarray) -> np.ndarray:
    h = h16.astype(np.uint32)
    sign, exp, man = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
    normal = sign | ((exp + 112) << 23) | (man << 13)
    sub = (man.astype(np.float32) * np.float32(2.0 ** -24)).view(np.uint32) | sign  # exact
    special = sign | 0x7F800000 | (man << 13)  # inf (man == 0) or NaN, payload kept
    bits = np.where(exp == 0, sub, np.where(exp == 31, special, normal)).astype(np.uint32)
    return bits.view(np.float32)


def decode_rows(raw: bytes, fmt: str, h: int, d: int) -> np.ndarray:
    """Rows in cold format ``fmt`` -> float32 [n, h, d], bit for bit as the library widens."""
    r, n_el = row_bytes(fmt, h, d), h * d
    a = np.frombuffer(raw, dtype=np.uint8).reshape(-1, r)
    if fmt == "float32":
        out = a.view("<f4").astype(np.float32)
    elif fmt == "float16":
        out = _half_to_float32(a.view("<u2"))
    elif fmt == "bfloat16":
        out = (a.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        scale = np.ascontiguousarray(a[:, : 4 * h]).view("<f4").astype(np.float32)
        q = a[:, 4 * h: 4 * h + n_el].view(np.int8).reshape(-1, h, d).astype(np.float32)
        with np.errstate(all="ignore"):  # a max|x| near FLT_MAX may overflow to inf: data
            out = q * scale[:, :, None]
    return np.ascontiguousarray(out, dtype=np.float32).reshape(-1, h, d)


# ---- index (§3) and files (§2) ----

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_index(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        body, crc, rest = text.rsplit("\n", 2)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: unreadable index layout: {e}") from None
    if rest != "" or len(crc) != 8 or any(ch not in "0123456789abcdef" for ch in crc):
        raise FormatError(f"{path}: index must end in '\\n<8 lowercase hex>\\n'")
    if zlib.crc32(body.encode("utf-8")) != int(crc, 16):
        raise FormatError(f"{path}: index checksum mismatch")
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise FormatError(f"{path}: index body is not JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("magic") != "kvcache-index" or obj.get("version") != VERSION \
            or not _is_int(obj.get("version")):
        raise FormatError(f"{path}: not a kvcache index of version {VERSION}")
    cfg = obj.get("config")
    if not isinstance(cfg, dict) or any(k not in cfg for k in CONFIG_FIELDS):
        raise FormatError(f"{path}: config missing or incomplete")
    for k in ("n_layers", "n_kv_heads", "head_dim", "block_tokens", "max_seq_len"):
        if not _is_int(cfg[k]) or cfg[k] < 1:
            raise FormatError(f"{path}: config.{k} must be an int >= 1, got {cfg[k]!r}")
    if cfg["dtype"] not in DTYPE_CODES or (cfg["cold_dtype"] is not None and cfg["cold_dtype"] not in DTYPE_CODES):
        raise FormatError(f"{path}: bad dtype / cold_dtype")
    layers, b = obj.get("layers"), cfg["block_tokens"]
    if not isinstance(layers, list) or len(layers) != cfg["n_layers"]:
        raise FormatError(f"{path}: layers must be an array of n_layers objects")
    for i, lay in enumerate(layers):
        if not isinstance(lay, dict):
            raise FormatError(f"{path}: layers[{i}] is not an object")
        length = lay.get("length")
        if not _is_int(length) or not 0 <= length <= cfg["max_seq_len"]:
            raise FormatError(f"{path}: layers[{i}].length {length!r} out of range")
        nb = -(-length // b)
        for key in ("rows", "crc_k", "crc_v"):
            v = lay.get(key)
            if not isinstance(v, list) or len(v) != nb or not all(_is_int(x) and 0 <= x <= 0xFFFFFFFF for x in v):
                raise FormatError(f"{path}: layers[{i}].{key} must be {nb} ints in 0..0xFFFFFFFF")
        if lay["rows"] != [min(b, length - j * b) for j in range(nb)]:
            raise FormatError(f"{path}: layers[{i}].rows {lay['rows']} do not match length {length}")
    return obj


def check_header(path: str, head: bytes, cfg: dict, fmt: str, kind: int, layer: int) -> None:
    if len(head) < HEADER_BYTES:
        raise FormatError(f"{path}: shorter than the {HEADER_BYTES}-byte header")
    if head[:8] != MAGIC:
        raise FormatError(f"{path}: bad magic {head[:8]!r}")
    f = struct.unpack_from("<10I", head, 8)  # version, kind, layer, L, H, D, B, dtype, crc
    if zlib.crc32(head[:40]) != f[8]:
        raise FormatError(f"{path}: header CRC mismatch")
    if f[0] != VERSION:
        raise FormatError(f"{path}: format version {f[0]}, expected {VERSION}")
    want = (cfg["n_layers"], cfg["n_kv_heads"], cfg["head_dim"], cfg["block_tokens"], DTYPE_CODES[fmt])
    for name, got, exp in zip(("n_layers", "n_kv_heads", "head_dim", "block_tokens", "dtype"), f[3:8], want):
        if got != exp:
            raise FormatError(f"{path}: header {name} {got}, the index says {exp}")
    if f[1] != kind:
        raise FormatError(f"{path}: header kind {f[1]}, the file name says {kind} ({KINDS[kind]})")
    if f[2] != layer:
        raise FormatError(f"{path}: header layer {f[2]}, the file name says {layer}")


@dataclass
class Layer:
    length: int
    keys: np.ndarray     # float32 [length, H, D]
    values: np.ndarray
    keys_raw: bytes      # the length * R stored bytes, in the cold format
    values_raw: bytes


@dataclass
class Cache:
    config: dict
    cold_format: str
    row_bytes: int
    layers: list


def read_cache(directory: str, verify: bool = True) -> Cache:
    """Read and check a persisted cache directory; FormatError on any failed check."""
    obj = read_index(os.path.join(directory, "index.json"))
    cfg = obj["config"]
    fmt = cfg["cold_dtype"] if cfg["cold_dtype"] is not None else cfg["dtype"]
    h, d, b = cfg["n_kv_heads"], cfg["head_dim"], cfg["block_tokens"]
    r = row_bytes(fmt, h, d)
    out = []
    for l, lay in enumerate(obj["layers"]):
        length, got = lay["length"], {}
        for kind, name in enumerate(KINDS):
            path = os.path.join(directory, f"layer{l:04d}.{name}")
            try:
                with open(path, "rb") as f:
                    head = f.read(HEADER_BYTES)
                    check_header(path, head, cfg, fmt, kind, l)
                    data = f.read(length * r)
            except OSError as e:
                raise FormatError(f"{path}: {e}") from None
            if len(data) < length * r:
                raise FormatError(f"{path}: {HEADER_BYTES + len(data)} bytes, index needs "
                                  f"{HEADER_BYTES + length * r}")
            crcs = lay["crc_k" if kind == 0 else "crc_v"]
            for j, (rows, want) in enumerate(zip(lay["rows"], crcs)):
                if verify and crc32c(data[j * b * r: (j * b + rows) * r]) != want:
                    raise FormatError(f"{path}: block {j}: CRC32C mismatch")
            got[name] = data
        out.append(Layer(length, decode_rows(got["keys"], fmt, h, d), decode_rows(got["values"], fmt, h, d),
                         got["keys"], got["values"]))
    return Cache(cfg, fmt, r, out)
