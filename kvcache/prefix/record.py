"""Prefix records: the one binary format of a stored block, in every tier.

Owns: the record layout (docs/format.md, "Prefix records"), building a
record's header and trailer, and every check a record must pass before a
byte of it reaches a cache (size, header, key, parent, token ids, then the
CRC32C or, with a secret, the HMAC-SHA256).  RAM, disk and remote tiers
hold exactly these bytes.  ``verify_file`` runs every check on one record
file, its shape taken from its own header (``kvcache inspect --verify``).
Must not touch: where records live (kvcache.prefix.store and its tiers) or
the rows' meaning (the cache's dtype; kvcache._blocks copies them).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
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
_PADS = ((37, 40), (112, FIXED))  # the fixed header's zero bytes: after the dtype code, reserved

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


def new_buffer(nbytes: int) -> Any:
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
    mv = memoryview(buf)
    if bytes(mv[FIXED + 4 * layout.block_tokens:layout.header_bytes]).strip(b"\0") or any(
            bytes(mv[a:b]).strip(b"\0") for a, b in _PADS):
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


MAC_UNCHECKED = "mac unchecked"  # verify_file's answer for an HMAC record it has no secret for


def verify_file(path, secret: Optional[bytes] = None, key: Optional[bytes] = None) -> Optional[str]:
    """Every check of one record file, on its own: what ``kvcache inspect --verify`` runs.

    The record's shape comes from its own header (a directory may hold
    records of several shapes), then it must pass what ``load`` checks:
    its size against the header's total, the header fields (magic,
    version, flags, the sizes they imply, zero padding), its key against
    SHA-256(parent + token ids), and its CRC32C or, given ``secret``, its
    HMAC-SHA256.

    Parameters
    ----------
    path : str or os.PathLike
        The record file.
    secret : bytes, optional
        The secret of a store writing HMAC records.
    key : bytes, optional
        The key the file should hold (the disk tier names a file by its key).

    Returns
    -------
    str or None
        None if the record passes every check; else the first failing one as
        ``"<check>: <what was found>"``, ``<check>`` one of ``size``,
        ``header``, ``key``, ``checksum``, ``mac``; :data:`MAC_UNCHECKED` for
        an HMAC record without ``secret`` that passes every other check.

    Raises
    ------
    OSError
        The file cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"{BAD_SIZE}: not a regular file"
        buf = new_buffer(st.st_size)
        view, got = memoryview(buf), 0
        while got < st.st_size:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                break
            got += n
        buf = buf[:got]
    finally:
        os.close(fd)
    if got < FIXED:
        return f"{BAD_SIZE}: {got} bytes, shorter than the {FIXED}-byte fixed header"
    h = parse_header(buf)
    if h["magic"] != MAGIC:
        return f"{BAD_HEADER}: magic {h['magic']!r}, expected {MAGIC!r}"
    if h["version"] != VERSION:
        return f"{BAD_HEADER}: version {h['version']}, expected {VERSION}"
    if h["flags"] & ~FLAG_HMAC:
        return f"{BAD_HEADER}: flags {h['flags']:#x}, expected 0 or {FLAG_HMAC}"
    if not isinstance(h["dtype"], str):
        return f"{BAD_HEADER}: dtype code {h['dtype']}, expected one of {sorted(_CODES)}"
    for name in ("n_layers", "n_kv_heads", "head_dim", "block_tokens"):
        if h[name] < 1:
            return f"{BAD_HEADER}: {name}={h[name]}, expected >= 1"
    layout = Layout(h["n_layers"], h["n_kv_heads"], h["head_dim"], h["block_tokens"], h["dtype"],
                    bool(h["flags"] & FLAG_HMAC))
    for name in ("header_bytes", "row_bytes", "total"):
        if h[name] != getattr(layout, name):
            return (f"{BAD_HEADER}: {name}={h[name]}, expected {getattr(layout, name)} for "
                    f"{layout.n_layers}x{layout.n_kv_heads}x{layout.head_dim}:"
                    f"{layout.block_tokens}:{layout.dtype}")
    if got != layout.total:
        return f"{BAD_SIZE}: {got} bytes, the header says {layout.total}"
    why = check_header(buf, layout, h["key"], h["parent"], None)
    if why == BAD_TOKENS:
        return f"{BAD_KEY}: the key is not SHA-256(parent + token ids)"
    if why is not None:
        return f"{BAD_HEADER}: non-zero padding or reserved bytes"
    if key is not None and h["key"] != key:
        return f"{BAD_KEY}: named {key.hex()[:16]}..., holds the record of {h['key'].hex()[:16]}..."
    if not layout.mac:
        from kvcache._simd import crc32c
        crc = crc32c(memoryview(buf)[:layout.body_bytes])
        if crc != stored_crc(buf, layout):
            return f"{BAD_CRC}: CRC32C {stored_crc(buf, layout):#010x} stored, {crc:#010x} computed"
        return None
    if secret is None:
        return MAC_UNCHECKED
    if not check_mac(buf, layout, secret):
        return f"{BAD_MAC}: the HMAC-SHA256 does not match under this secret (another secret, or forged)"
    return None
