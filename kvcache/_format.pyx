"""The on-disk format of a cold directory: the one module that knows its layout.

Owns: file names, the cold files' header (building and checking it), where a
position's rows live (``row_offset``), and the persisted index: building it
from the block tables, writing it atomically, reading and checking it, and
verifying the files against it (``kvcache inspect --verify``).  docs/format.md
describes all of it, well enough to write a reader in another language.
Must not touch: open files, mappings, locks or the engine's state (the cold
tier, kvcache._cold, does the I/O of a live cache).
"""
import errno as _errno
import json
import os
import struct
import zlib

from kvcache._codec import DTYPES
from kvcache.errors import ColdStoreError, CorruptionError

MAGIC = b"KVCACHE\x00"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
INDEX_MAGIC = "kvcache-index"
KINDS = ("keys", "values")
HEADER_SIZE = HEADER_BYTES  # where a cold file's rows start, for Python
# magic, version, kind, layer, n_layers, n_kv_heads, head_dim, block_tokens, dtype code; then a CRC-32
_HEADER = struct.Struct("<8sIIIIIIII")
# What a cold file's header records about the rows it holds ("cold_format": their dtype).
FINGERPRINT_FIELDS = ("n_layers", "n_kv_heads", "head_dim", "block_tokens", "cold_format")
# Config fields the index records (all but where it lives and run-time knobs).
INDEX_CONFIG_FIELDS = ("n_layers", "n_kv_heads", "head_dim", "max_seq_len", "hot_tokens", "dtype",
                       "cold_dtype", "eviction_policy", "sink_tokens", "block_tokens", "max_cold_bytes",
                       "recent_tokens", "adaptive_recency_weight", "adaptive_frequency_weight",
                       "promote_on_read")


def file_name(layer, kind):
    """The name of a layer's keys (kind 0) or values (kind 1) file."""
    return f"layer{layer:04d}.{KINDS[kind]}"


def file_names(n_layers):
    """Every cold file's name, in (layer, kind) order."""
    return [file_name(l, kind) for l in range(n_layers) for kind in range(2)]


def file_bytes(length, row_bytes):
    """The smallest size of a cold file holding ``length`` positions."""
    return row_offset(length, row_bytes)


# -- the cold files' header ------------------------------------------------------
def header(config, int kind, int layer):
    """The HEADER_BYTES a cold file starts with."""
    h = _HEADER.pack(MAGIC, FORMAT_VERSION, kind, layer, config.n_layers, config.n_kv_heads,
                     config.head_dim, config.block_tokens, DTYPES[config.cold_format].code)
    h += struct.pack("<I", zlib.crc32(h))
    return h + bytes(HEADER_BYTES - len(h))


def check_header(path, data, config, int kind, int layer):
    """Raise CorruptionError unless ``data`` (a file's first bytes) is the header of
    that layer's ``kind`` file for ``config``."""
    if len(data) < _HEADER.size + 4 or data[:8] != MAGIC:
        raise CorruptionError(_errno.EINVAL, "not a kvcache cold file (bad magic)", path)
    if struct.unpack_from("<I", data, _HEADER.size)[0] != zlib.crc32(data[:_HEADER.size]):
        raise CorruptionError(_errno.EINVAL, "cold file header checksum mismatch", path)
    _, version, k, l, *shape = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise CorruptionError(_errno.EINVAL, f"cold file format version {version}, "
                                             f"expected {FORMAT_VERSION}", path)
    stored = dict(zip(FINGERPRINT_FIELDS, shape))
    names = {info.code: name for name, info in DTYPES.items()}
    stored["cold_format"] = names.get(stored["cold_format"], stored["cold_format"])
    for name, value in stored.items():  # open() refused overrides of these: the index disagrees
        if getattr(config, name) != value:
            raise CorruptionError(_errno.EINVAL, f"written with {name}={value!r}, but the index "
                                                 f"says {name}={getattr(config, name)!r}", path)
    if (k, l) != (kind, layer):
        raise CorruptionError(_errno.EINVAL, f"holds {KINDS[k] if k < 2 else k} of layer {l}, "
                                             f"expected {KINDS[kind]} of layer {layer}", path)


def check_size(path, size, length, row_bytes):
    """Raise CorruptionError if a file of ``size`` bytes is too short for ``length`` positions."""
    need = file_bytes(length, row_bytes)
    if size < need:
        raise CorruptionError(0, f"cold file holds {size} bytes; the index needs {need} for "
                                 f"{length} positions", path)


# -- the index ---------------------------------------------------------------------
def index_entry(length, blocks, block_tokens):
    """The index's record of a layer, from its block table ``[(slot, disk_rows, crc_k,
    crc_v)]``: the prefix its files hold (complete blocks, then the partial one;
    stores that ran since the write-back are not on disk)."""
    B = block_tokens
    keep = 0
    for _, rows, _, _ in blocks:
        keep += rows
        if rows < B:
            break
    keep = min(keep, length)
    nb = (keep + B - 1) // B
    return {"length": keep,
            "rows": [min(B, keep - i * B) for i in range(nb)],
            "crc_k": [k for _, _, k, _ in blocks[:nb]],
            "crc_v": [v for _, _, _, v in blocks[:nb]]}


def index_bytes(config, layers):
    """The bytes of an index: its JSON body, a newline, the body's CRC-32 in hex, a newline."""
    body = json.dumps({
        "magic": INDEX_MAGIC, "version": FORMAT_VERSION,
        "config": {name: getattr(config, name) for name in INDEX_CONFIG_FIELDS},
        "layers": layers,
    }, separators=(",", ":"))
    return (body + "\n" + f"{zlib.crc32(body.encode()):08x}\n").encode()


def write_index(path, config, layers):
    """Atomically replace the index of directory ``path``: written to a temporary
    name, fsync'd, renamed over the old one, the directory fsync'd."""
    data = index_bytes(config, layers)
    tmp = os.path.join(path, INDEX_NAME + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(path, INDEX_NAME))
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise ColdStoreError(exc.errno, f"cannot write the cold index: {exc.strerror}", tmp) from exc


def read_index(path):
    """The index of a persisted cache directory, checked; or a clear error."""
    path = os.fspath(path)
    p = os.path.join(path, INDEX_NAME)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(_errno.ENOTDIR, "not a directory: expected a persisted kvcache "
                                 "directory", path)
    if not os.path.isdir(path):
        raise FileNotFoundError(_errno.ENOENT, "no such cache directory", path)
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(_errno.ENOENT, "not a persisted kvcache directory "
                                "(no index.json; was the cache flushed?)", path) from None
    try:
        body, crc, rest = raw.decode().rsplit("\n", 2)
        if rest:
            raise ValueError("bytes after the checksum line")
        if len(crc) != 8 or crc.strip("0123456789abcdef"):
            raise ValueError("checksum line: expected 8 lowercase hex digits")
        if int(crc, 16) != zlib.crc32(body.encode()):
            raise ValueError("checksum mismatch")
        index = json.loads(body)
        if not isinstance(index, dict) or index.get("magic") != INDEX_MAGIC:
            raise ValueError("bad magic")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptionError(_errno.EINVAL, f"corrupt cache index ({exc})", p) from None
    if type(index.get("version")) is not int or index["version"] != FORMAT_VERSION:
        raise CorruptionError(_errno.EINVAL, f"index format version {index.get('version')}, "
                                             f"expected {FORMAT_VERSION}", p)
    try:
        _check_layers(index, index_config(index, path))
    except (ValueError, TypeError) as exc:
        raise CorruptionError(_errno.EINVAL, f"corrupt cache index ({exc})", p) from None
    return index


def index_config(index, path):
    """The CacheConfig an index records (ValueError / TypeError if it is not one)."""
    from kvcache.config import CacheConfig
    config = index.get("config")
    if not isinstance(config, dict) or set(INDEX_CONFIG_FIELDS) != set(config):
        raise ValueError(f"config: expected the fields {list(INDEX_CONFIG_FIELDS)}, got "
                         f"{sorted(config) if isinstance(config, dict) else type(config).__name__}")
    return CacheConfig(**{name: config[name] for name in INDEX_CONFIG_FIELDS}, cold_dir=path, persist=True)


def _check_layers(index, c):
    """Raise ValueError for layers that passed the index's checksum but are not what
    this version writes (another tool, an edit by hand): reopening trusts their every number."""
    layers, B = index.get("layers"), c.block_tokens
    if not isinstance(layers, list) or len(layers) != c.n_layers:
        raise ValueError(f"layers: expected a list of {c.n_layers}, got {type(layers).__name__} "
                         f"of {len(layers) if isinstance(layers, list) else 0}")
    for l, entry in enumerate(layers):
        length = entry.get("length") if isinstance(entry, dict) else None
        if type(length) is not int or not 0 <= length <= c.max_seq_len:
            raise ValueError(f"layer {l}: expected a length of 0..max_seq_len={c.max_seq_len}, got {length!r}")
        n = -(-length // B)
        want = [min(B, length - b * B) for b in range(n)]
        for key in ("rows", "crc_k", "crc_v"):
            got = entry.get(key)
            if not isinstance(got, list) or len(got) != n or any(
                    type(x) is not int or not 0 <= x <= 0xFFFFFFFF for x in got):
                raise ValueError(f"layer {l}: {key} expected {n} ints for {length} positions, got {got!r:.80}")
        if entry["rows"] != want:
            raise ValueError(f"layer {l}: rows expected {want!r:.80}, got {entry['rows']!r:.80}")


def verify_layer(path, config, layer, entry, check_blocks):
    """Check one layer's two files in directory ``path`` against its index entry.

    Raises FileNotFoundError for a missing file and CorruptionError for a bad
    header or a file too short; with ``check_blocks``, returns the blocks whose
    CRC32C does not match as ``[(file path, block, first position, last position)]``.
    Returns ``(sizes of the two files, bad blocks, blocks checked)``.
    """
    from kvcache._simd import crc32c
    rb, B = config.cold_row_bytes, config.block_tokens
    sizes, bad, checked = [], [], 0
    for kind in range(2):
        name = os.path.join(path, file_name(layer, kind))
        with open(name, "rb") as f:
            check_header(name, f.read(HEADER_BYTES), config, kind, layer)
            size = os.fstat(f.fileno()).st_size
            check_size(name, size, entry["length"], rb)
            sizes.append(size)
            if check_blocks:
                crcs = entry["crc_k" if kind == 0 else "crc_v"]
                for b, rows in enumerate(entry["rows"]):
                    data = os.pread(f.fileno(), rows * rb, row_offset(b * B, rb))
                    checked += 1
                    if crc32c(data) != crcs[b]:
                        bad.append((name, b, b * B, b * B + rows - 1))
    return sizes, bad, checked
