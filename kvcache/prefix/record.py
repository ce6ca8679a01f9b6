"""Prefix records: the one binary format of a stored block, in every tier.

Owns: the record layout (docs/format.md, "Prefix records"), building a
record's header and trailer, and every check a record must pass before a
byte of it reaches a cache (size, header, key, parent, token ids, then the
CRC32C or, with a secret, the HMAC-SHA256).  RAM, disk and remote tiers
hold exactly these bytes.
Must not touch: where records live (kvcache.prefix.store and its tiers) or
the rows' meaning (the cache's dtype; kvcache._blocks copies them).
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from kvcache._codec import DTYPES, row_bytes as _row_bytes

MAGIC = b"KVCPREF\0"
VERSION = 1
FLAG_HMAC = 1
FIXED = 128            # bytes of the fixed header, before the token ids
ALIGN = 64             # the rows start on a multiple of this
CRC_BYTES, MAC_BYTES = 4, 32
_HEAD = struct.Struct("<8sHHIIIIIIBxxxQ32s32s16x")
assert _HEAD.size == FIXED
_CODES = {d.code: d.name for d in DTYPES.values()}

# What a failed check was (the store's counters and messages name them).
BAD_SIZE, BAD_HEADER, BAD_KEY, BAD_PARENT, BAD_TOKENS, BAD_CRC, BAD_MAC = (
    "size", "header", "key", "parent", "tokens", "checksum", "mac")


@dataclass(frozen=True)
class Layout:
    """Where everything sits in a record of one shape (all sizes in bytes)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str
    mac: bool          # an HMAC-SHA256 trailer instead of the CRC32C

    @property
    def row_bytes(self) -> int:
        return _row_bytes(self.dtype, self.n_kv_heads, self.head_dim)

    @property
    def header_bytes(self) -> int:
        return -(-(FIXED + 4 * self.block_tokens) // ALIGN) * ALIGN

    @property
    def rows_bytes(self) -> int:
        return 2 * self.n_layers * self.block_tokens * self.row_bytes

    @property
    def trailer_bytes(self) -> int:
        return MAC_BYTES if self.mac else CRC_BYTES

    @property
    def body_bytes(self) -> int:
        """Bytes the checksum covers: header and rows."""
        return self.header_bytes + self.rows_bytes

    @property
    def total(self) -> int:
        return self.body_bytes + self.trailer_bytes


def new_buffer(nbytes: int) -> np.ndarray:
    """A zeroed uint8 buffer for a record, 64-byte aligned, from kvcache's
    allocator (large ones are anonymous mappings with transparent huge pages
    asked for: a 32 MiB record faults in 16 pages, not 8192)."""
    from kvcache._arena import Arena, WritableArena
    arena: Any = WritableArena(Arena(max(nbytes, 1)))
    return np.frombuffer(arena, np.uint8)[:nbytes]


def write_header(buf: np.ndarray, layout: Layout, key: bytes, parent: bytes, tokens: np.ndarray) -> None:
    """Fill the header of ``buf`` (rows and trailer untouched)."""
    head = _HEAD.pack(MAGIC, VERSION, FLAG_HMAC if layout.mac else 0, layout.header_bytes,
                      layout.n_layers, layout.n_kv_heads, layout.head_dim, layout.block_tokens,
                      layout.row_bytes, DTYPES[layout.dtype].code, layout.total, key, parent)
    buf[:FIXED] = np.frombuffer(head, np.uint8)
    ids = np.ascontiguousarray(tokens, "<u4")
    buf[FIXED:FIXED + 4 * layout.block_tokens] = ids.view(np.uint8)
    buf[FIXED + 4 * layout.block_tokens:layout.header_bytes] = 0


def mac_of(secret: bytes, buf, n: int) -> bytes:
    """HMAC-SHA256 of ``buf[:n]`` under ``secret``."""
    return hmac.new(secret, memoryview(buf)[:n], hashlib.sha256).digest()


def seal(buf: Any, layout: Layout, secret: Optional[bytes], crc: Optional[int] = None) -> None:
    """Write the trailer: the HMAC (with ``secret``) or the CRC32C (given, or computed)."""
    n = layout.body_bytes
    if layout.mac:
        assert secret is not None, "a MAC record needs the secret"
        buf[n:n + MAC_BYTES] = np.frombuffer(mac_of(secret, buf, n), np.uint8)
    else:
        if crc is None:
            from kvcache._simd import crc32c
            crc = crc32c(memoryview(buf)[:n])
        buf[n:n + CRC_BYTES] = np.frombuffer(struct.pack("<I", crc), np.uint8)


def parse_header(buf) -> dict:
    """The header fields of a record (no check but its length), as a dict."""
    mv = memoryview(buf).cast("B")
    if len(mv) < FIXED:
        raise ValueError(f"a record of {len(mv)} bytes, shorter than its {FIXED}-byte header")
    (magic, version, flags, header_bytes, n_layers, n_kv_heads, head_dim, block_tokens, row_bytes,
     code, total, key, parent) = _HEAD.unpack_from(mv, 0)
    return dict(magic=magic, version=version, flags=flags, header_bytes=header_bytes,
                n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim,
                block_tokens=block_tokens, row_bytes=row_bytes, dtype=_CODES.get(code, code),
                total=total, key=key, parent=parent)


def other_seal(layout: Layout) -> Layout:
    """The layout of the same record sealed the other way (HMAC <-> CRC32C)."""
    return replace(layout, mac=not layout.mac)


def _sealed_otherwise(buf, layout: Layout, size: int) -> bool:
    """A record of ``size`` bytes starting with ``buf`` looks like one sealed the
    other way: written by a store with another secret setting (a secret where
    this one has none, or the reverse)."""
    other = other_seal(layout)
    if size != other.total or len(buf) < FIXED:
        return False
    h = parse_header(buf)
    return (h["magic"] == MAGIC and h["version"] == VERSION
            and h["flags"] == (FLAG_HMAC if other.mac else 0) and h["total"] == other.total)


def check_header(buf, layout: Layout, key: bytes, parent: bytes, tokens: Optional[np.ndarray],
                 size: Optional[int] = None) -> Optional[str]:
    """The first cheap check a record fails (BAD_*), or None: size, header fields,
    key, parent and token ids (``tokens`` None: checked against the key only).
    ``buf`` is the whole record, or with ``size`` (the record's length) its
    first ``layout.header_bytes`` bytes.  A record sealed the other way (HMAC
    vs CRC32C) fails as BAD_MAC: like one under another secret, it is a miss
    that is kept, not damage."""
    size = len(buf) if size is None else size
    if size != layout.total or len(buf) < layout.header_bytes:
        return BAD_MAC if _sealed_otherwise(buf, layout, size) else BAD_SIZE
    h = parse_header(buf)
    if (h["magic"] != MAGIC or h["version"] != VERSION or h["flags"] != (FLAG_HMAC if layout.mac else 0)
            or h["header_bytes"] != layout.header_bytes or h["n_layers"] != layout.n_layers
            or h["n_kv_heads"] != layout.n_kv_heads or h["head_dim"] != layout.head_dim
            or h["block_tokens"] != layout.block_tokens or h["row_bytes"] != layout.row_bytes
            or h["dtype"] != layout.dtype or h["total"] != layout.total):
        return BAD_HEADER
    if h["key"] != key:
        return BAD_KEY
    if h["parent"] != parent:
        return BAD_PARENT
    ids = bytes(memoryview(buf)[FIXED:FIXED + 4 * layout.block_tokens])
    if tokens is not None and ids != np.ascontiguousarray(tokens, "<u4").tobytes():
        return BAD_TOKENS
    if hashlib.sha256(parent + ids).digest() != key:  # the record names its own tokens
        return BAD_TOKENS
    if bytes(memoryview(buf)[FIXED + 4 * layout.block_tokens:layout.header_bytes]).strip(b"\0"):
        return BAD_HEADER
    return None


def stored_crc(buf, layout: Layout) -> int:
    """The CRC32C a record's trailer holds."""
    return struct.unpack_from("<I", memoryview(buf), layout.body_bytes)[0]


def check_mac(buf, layout: Layout, secret: bytes) -> bool:
    """True if the trailer is the HMAC of the rest under ``secret``."""
    n = layout.body_bytes
    return hmac.compare_digest(bytes(memoryview(buf)[n:n + MAC_BYTES]), mac_of(secret, buf, n))


def token_ids_of(buf, layout: Layout) -> np.ndarray:
    """The block's token ids a record holds."""
    return np.frombuffer(memoryview(buf)[FIXED:FIXED + 4 * layout.block_tokens], "<u4")
