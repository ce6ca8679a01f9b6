"""The cold tier's files: creation, headers, mappings, the persisted index.

A cache's cold directory holds, per layer, a keys file and a values file
(``layer0003.keys``...).  Each starts with a HEADER_BYTES header (magic,
format version, the config's fingerprint, which layer and tensor it holds,
a CRC32 of the header) followed by the layer's rows at fixed offsets:
position p at ``HEADER_BYTES + p * row_bytes``.  Fixed offsets mean no
allocator and no free-space search: a block is written where its positions
live.  Files are written with ``pwrite`` (a full disk is an error, never a
SIGBUS) and read through read-only shared mappings.

With ``persist=True`` an ``index.json`` (written to a temporary name,
fsync'd, renamed, directory fsync'd) records each layer's length and, per
block, the rows on disk and their CRC32C checksums.
"""
import errno as _errno
import fcntl
import json
import os
import shutil
import struct
import tempfile
import weakref
import zlib

from cpython.buffer cimport PyBUF_WRITABLE
from libc.errno cimport errno, EINTR, EIO
from posix.mman cimport mmap, munmap, PROT_READ, MAP_SHARED, MAP_FAILED
from posix.unistd cimport pwrite

from kvcache.errors import ColdStoreError, CorruptionError

MAGIC = b"KVCACHE\x00"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
INDEX_MAGIC = "kvcache-index"
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "int8": 3}
KINDS = ("keys", "values")
HEADER_SIZE = HEADER_BYTES  # where a cold file's rows start (HEADER_BYTES, for Python)
_HEADER = struct.Struct("<8sIIIIIIII")  # magic, version, kind, layer, n_layers, heads, head_dim, block, dtype
# What a cold file's header records about the rows it holds ("cold_format": their dtype).
FINGERPRINT_FIELDS = ("n_layers", "n_kv_heads", "head_dim", "block_tokens", "cold_format")


cdef int write_all(int fd, const char *src, size_t n, size_t offset) noexcept nogil:
    """pwrite ``n`` bytes at ``offset``, resuming partial writes: 0 or an errno."""
    cdef ssize_t w
    while n > 0:
        w = pwrite(fd, src, n, offset)
        if w < 0:
            if errno == EINTR:
                continue
            return errno
        if w == 0:
            return EIO
        src += w
        n -= w
        offset += w
    return 0


cdef void export_bytes(Py_buffer *view, object owner, char *ptr, Py_ssize_t nbytes, bint readonly):
    """Fill a buffer request with ``nbytes`` bytes at ``ptr``, owned by ``owner``."""
    view.buf = ptr
    view.obj = owner
    view.len = nbytes
    view.readonly = readonly
    view.itemsize = 1
    view.format = "B"
    view.ndim = 1
    view.shape = &view.len
    view.strides = &view.itemsize
    view.suboffsets = NULL
    view.internal = NULL


cdef class ColdMap:
    """A read-only shared mapping of one cold file; exports it as a buffer.

    Arrays returned by ``get(..., copy=False)`` view it and keep it alive, so
    they stay valid (never dangling) after the cache closes.
    """
    cdef char *addr
    cdef readonly Py_ssize_t length
    cdef int exports

    def __cinit__(self, int fd, Py_ssize_t length):
        cdef void *p = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise ColdStoreError(errno, f"cannot map a cold file: {os.strerror(errno)}")
        self.addr = <char *>p
        self.length = length

    def __dealloc__(self):
        if self.addr != NULL:
            munmap(self.addr, self.length)

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("cold tier views are read-only")
        export_bytes(view, self, self.addr, self.length, True)

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef ColdFiles layer_files(object store, Py_ssize_t layer):
    """The native handles of one layer's files in ``store`` (a ColdStore)."""
    cdef ColdFiles f
    f.fd_k = store.fds[2 * layer]
    f.fd_v = store.fds[2 * layer + 1]
    f.map_k = (<ColdMap>store.maps[2 * layer]).addr
    f.map_v = (<ColdMap>store.maps[2 * layer + 1]).addr
    return f


def _header(config, int kind, int layer):
    h = _HEADER.pack(MAGIC, FORMAT_VERSION, kind, layer, config.n_layers, config.n_kv_heads,
                     config.head_dim, config.block_tokens, DTYPE_CODES[config.cold_format])
    h += struct.pack("<I", zlib.crc32(h))
    return h + bytes(HEADER_BYTES - len(h))


def _check_header(path, data, config, int kind, int layer):
    if len(data) < _HEADER.size + 4 or data[:8] != MAGIC:
        raise CorruptionError(_errno.EINVAL, "not a kvcache cold file (bad magic)", path)
    if struct.unpack_from("<I", data, _HEADER.size)[0] != zlib.crc32(data[:_HEADER.size]):
        raise CorruptionError(_errno.EINVAL, "cold file header checksum mismatch", path)
    _, version, k, l, *shape = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise CorruptionError(_errno.EINVAL, f"cold file format version {version}, "
                                             f"expected {FORMAT_VERSION}", path)
    stored = dict(zip(FINGERPRINT_FIELDS, shape))
    stored["cold_format"] = {v: k for k, v in DTYPE_CODES.items()}.get(stored["cold_format"],
                                                                      stored["cold_format"])
    for name, value in stored.items():  # open() refused overrides of these: the index disagrees
        if getattr(config, name) != value:
            raise CorruptionError(_errno.EINVAL, f"written with {name}={value!r}, but the index "
                                                 f"says {name}={getattr(config, name)!r}", path)
    if (k, l) != (kind, layer):
        raise CorruptionError(_errno.EINVAL, f"holds {KINDS[k] if k < 2 else k} of layer {l}, "
                                             f"expected {KINDS[kind]} of layer {layer}", path)


def _release(fds, lock, path, created_dir, names):
    """Close a store's files; remove the scratch ones (and a private directory);
    then let go of the directory's lock."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    if created_dir:
        shutil.rmtree(path, ignore_errors=True)
    else:
        for name in names:
            try:
                os.unlink(os.path.join(path, name))
            except OSError:
                pass
    for fd in lock:
        os.close(fd)
    lock.clear()


def _lock_dir(path):
    """An fd of ``path`` holding an exclusive flock: one live cache per directory.

    The lock is on the directory, never on a file that gets mapped, so views
    that outlive close() do not keep it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ColdStoreError(exc.errno, f"cannot open cold_dir: {exc.strerror}", path) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (_errno.EWOULDBLOCK, _errno.EAGAIN):
            raise ColdStoreError(_errno.EBUSY, "cold_dir is in use by another open cache (in this "
                                 "process or another); close that one first", path) from None
        if exc.errno in (_errno.ENOLCK, _errno.EOPNOTSUPP, _errno.ENOSYS):
            return None  # a file system without flock: no protection, no failure
        raise ColdStoreError(exc.errno, f"cannot lock cold_dir: {exc.strerror}", path) from exc
    return fd


class ColdStore:
    """The files of one cache's cold tier.

    Parameters
    ----------
    config : CacheConfig
    existing : bool
        Open the files of a persisted cache instead of creating new ones.
    """

    def __init__(self, config, existing=False):
        self.config = config
        self.row_bytes = config.cold_row_bytes
        self.map_bytes = HEADER_BYTES + config.n_blocks * config.block_tokens * self.row_bytes
        self.fds = []
        self.maps = []
        self._lock = []
        created_dir = False
        if config.cold_dir is None:
            self.path = tempfile.mkdtemp(prefix="kvcache-")  # 0700
            created_dir = True
        else:
            self.path = os.path.abspath(config.cold_dir)  # a later chdir must not move it
            if not existing:
                created_dir = self._prepare_dir()
        # Before the finalizer: a store refused here must not remove another's files.
        lock = _lock_dir(self.path)
        if lock is not None:
            self._lock.append(lock)
        names = [self.file_name(l, kind) for l in range(config.n_layers) for kind in range(2)]
        # Files are closed, and scratch files removed, when the store goes, however
        # it goes (close, garbage collection, interpreter exit).
        self._finalizer = weakref.finalize(self, _release, self.fds, self._lock, self.path,
                                           created_dir and not config.persist,
                                           [] if config.persist else names)
        try:
            for l in range(config.n_layers):
                for kind in range(2):
                    self.fds.append(self._open_file(l, kind, existing))
            self.maps = [ColdMap(fd, self.map_bytes) for fd in self.fds]
        except BaseException:
            self.close()
            raise

    def _prepare_dir(self):
        path = self.path
        try:
            if os.path.isdir(path):
                if os.listdir(path):
                    if os.path.exists(os.path.join(path, INDEX_NAME)):
                        raise FileExistsError(
                            _errno.EEXIST, "cold_dir holds a persisted cache; reopen it with "
                            "TieredKVCache.open(cold_dir), or choose an empty directory", path)
                    raise FileExistsError(_errno.EEXIST, "cold_dir is not empty; a cache needs a "
                                          "directory of its own", path)
                os.chmod(path, 0o700)
                return False
            if os.path.exists(path):
                raise NotADirectoryError(_errno.ENOTDIR, "cold_dir is not a directory", path)
            os.makedirs(path, mode=0o700)
            os.chmod(path, 0o700)  # makedirs' mode is filtered by the umask
            return True
        except (FileExistsError, NotADirectoryError):
            raise
        except OSError as exc:
            raise ColdStoreError(exc.errno, f"cannot use cold_dir: {exc.strerror}", path) from exc

    def file_name(self, layer, kind):
        return f"layer{layer:04d}.{KINDS[kind]}"

    def _open_file(self, layer, kind, existing):
        path = os.path.join(self.path, self.file_name(layer, kind))
        try:
            if existing:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ColdStoreError(exc.errno, f"cannot open a cold file: {exc.strerror}", path) from exc
        try:
            if existing:
                _check_header(path, os.pread(fd, HEADER_BYTES, 0), self.config, kind, layer)
            else:
                os.pwrite(fd, _header(self.config, kind, layer), 0)
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, CorruptionError):
                raise
            raise ColdStoreError(exc.errno, f"cannot write a cold file header: {exc.strerror}",
                                 path) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    def file_sizes(self, layer):
        return [os.fstat(self.fds[2 * layer + kind]).st_size for kind in range(2)]

    def path_of(self, layer, kind):
        return os.path.join(self.path, self.file_name(layer, kind))

    def view(self, layer, kind, start, stop):
        """A read-only uint8 ``[stop - start, row_bytes]`` array over rows of one file."""
        import numpy as np
        return np.frombuffer(self.maps[2 * layer + kind], dtype=np.uint8,
                             count=(stop - start) * self.row_bytes,
                             offset=HEADER_BYTES + start * self.row_bytes
                             ).reshape(stop - start, self.row_bytes)

    def fsync(self):
        for fd, name in zip(self.fds, [self.file_name(l, k) for l in range(self.config.n_layers)
                                       for k in range(2)]):
            try:
                os.fsync(fd)
            except OSError as exc:
                raise ColdStoreError(exc.errno, f"cannot sync a cold file: {exc.strerror}",
                                     os.path.join(self.path, name)) from exc

    def write_index(self, layers):
        """Atomically replace the index: ``layers`` is a list of dicts per layer."""
        c = self.config
        body = json.dumps({
            "magic": INDEX_MAGIC, "version": FORMAT_VERSION,
            "config": {name: getattr(c, name) for name in INDEX_CONFIG_FIELDS},
            "layers": layers,
        }, separators=(",", ":"))
        data = (body + "\n" + f"{zlib.crc32(body.encode()):08x}\n").encode()
        tmp = os.path.join(self.path, INDEX_NAME + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(self.path, INDEX_NAME))
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise ColdStoreError(exc.errno, f"cannot write the cold index: {exc.strerror}",
                                 tmp) from exc

    def close(self):
        """Close the files; scratch files (and a private directory) are removed."""
        self.maps = []  # views handed out keep their mapping alive
        self._finalizer()


# Config fields the index records (all but where it lives and run-time knobs).
INDEX_CONFIG_FIELDS = ("n_layers", "n_kv_heads", "head_dim", "max_seq_len", "hot_tokens", "dtype",
                       "cold_dtype", "eviction_policy", "sink_tokens", "block_tokens", "max_cold_bytes",
                       "recent_tokens", "adaptive_recency_weight", "adaptive_frequency_weight",
                       "promote_on_read")


def read_index(path):
    """The index of a persisted cache directory, checked; or a clear error."""
    p = os.path.join(os.fspath(path), INDEX_NAME)
    if os.path.exists(os.fspath(path)) and not os.path.isdir(os.fspath(path)):
        raise NotADirectoryError(_errno.ENOTDIR, "not a directory: expected a persisted kvcache "
                                 "directory", os.fspath(path))
    if not os.path.isdir(os.fspath(path)):
        raise FileNotFoundError(_errno.ENOENT, "no such cache directory", os.fspath(path))
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(_errno.ENOENT, "not a persisted kvcache directory "
                                "(no index.json; was the cache flushed?)", os.fspath(path)) from None
    try:
        body, crc, rest = raw.decode().rsplit("\n", 2)
        if rest:
            raise ValueError("bytes after the checksum line")
        if int(crc, 16) != zlib.crc32(body.encode()):
            raise ValueError("checksum mismatch")
        index = json.loads(body)
        if not isinstance(index, dict) or index.get("magic") != INDEX_MAGIC:
            raise ValueError("bad magic")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptionError(_errno.EINVAL, f"corrupt cache index ({exc})", p) from None
    if index.get("version") != FORMAT_VERSION:
        raise CorruptionError(_errno.EINVAL, f"index format version {index.get('version')}, "
                                             f"expected {FORMAT_VERSION}", p)
    try:
        _check_index(index, path)
    except (ValueError, TypeError) as exc:
        raise CorruptionError(_errno.EINVAL, f"corrupt cache index ({exc})", p) from None
    return index


def _check_index(index, path):
    """Raise ValueError for an index that passed its checksum but is not one this
    version writes (another tool, an edit by hand): reopening trusts its every number."""
    from kvcache.config import CacheConfig
    config = index.get("config")
    if not isinstance(config, dict) or set(INDEX_CONFIG_FIELDS) - set(config):
        raise ValueError(f"config: expected the fields {list(INDEX_CONFIG_FIELDS)}")
    c = CacheConfig(**{name: config[name] for name in INDEX_CONFIG_FIELDS}, cold_dir=path, persist=True)
    layers, B = index.get("layers"), c.block_tokens
    if not isinstance(layers, list) or len(layers) != c.n_layers:
        raise ValueError(f"layers: expected a list of {c.n_layers}, got {type(layers).__name__} "
                         f"of {len(layers) if isinstance(layers, list) else 0}")
    for l, entry in enumerate(layers):
        length = entry.get("length") if isinstance(entry, dict) else None
        if type(length) is not int or not 0 <= length <= c.max_seq_len:
            raise ValueError(f"layer {l}: expected a length of 0..max_seq_len={c.max_seq_len}, got {length!r}")
        n = -(-length // B)
        want = {"rows": [min(B, length - b * B) for b in range(n)]}
        for key in ("rows", "crc_k", "crc_v"):
            got = entry.get(key)
            if not isinstance(got, list) or len(got) != n or any(
                    type(x) is not int or not 0 <= x <= 0xFFFFFFFF for x in got):
                raise ValueError(f"layer {l}: {key} expected {n} ints for {length} positions, got {got!r:.80}")
        if entry["rows"] != want["rows"]:
            raise ValueError(f"layer {l}: rows expected {want['rows']!r:.80}, got {entry['rows']!r:.80}")
