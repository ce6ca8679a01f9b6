"""The one error translator: a native error record (or a bare status code) to an exception.

Owns: the mapping from ``kvc_status`` codes to kvcache's exceptions, and the
messages built from a ``kvc_error`` record (include/kvc_status.h).  Native
code fills the record where a failure happens, under the lock guarding what
it describes; :func:`raise_error` reads only the record, never the engine.
Must not touch: engine state, files.
"""
import os

from kvcache._ckvc cimport (
    KVC_OK, KVC_E_NOMEM, KVC_E_FULL, KVC_E_CLOSED, KVC_E_RANGE, KVC_E_INVALID, KVC_E_IO, KVC_E_CORRUPT,
    KVC_LIMIT_SEQ_LEN, KVC_LIMIT_COLD_BYTES, KVC_LIMIT_SLOTS, kvc_error,
)
from kvcache.errors import CacheClosedError, CacheFullError, ColdStoreError, CorruptionError

_DEFAULTS = {
    KVC_E_NOMEM: (MemoryError, "out of memory"),
    KVC_E_FULL: (CacheFullError, "the cache is full"),
    KVC_E_CLOSED: (CacheClosedError, "this TieredKVCache is closed"),
    KVC_E_RANGE: (IndexError, "positions outside what is stored"),
    KVC_E_INVALID: (ValueError, "invalid argument"),
    KVC_E_IO: (ColdStoreError, "a cold file could not be written"),
    KVC_E_CORRUPT: (CorruptionError, "a cold block failed its checksum"),
}

# What the failed call was, as the translator's callers name it: (prefix of the
# message, what it says about the cache's state afterwards).
OPS = {
    "store": ("", " (nothing was stored)"),
    "get": ("get: ", ""),
    "view": ("get(copy=False): ", ""),
    "flush": ("flush: ", "; every position stored stays readable, and the directory keeps its "
                         "last flush"),
    "close": ("close: ", "; the cache is closed, and the directory keeps its last flush"),
    "open": ("open: ", ""),
    "scores": ("update_scores: ", ""),
    "truncate": ("truncate: ", ""),
}
_FILE_KINDS = ("keys", "values")


cdef int check_status(int code, str detail=None, int err=0, object filename=None) except -1:
    """Return 0 for KVC_OK, else raise the exception mapped to ``code``.

    ``detail`` replaces the generic message when the caller knows more
    (what was expected and what came).  OSError-derived errors carry
    ``err`` (an errno) and ``filename``.
    """
    if code == KVC_OK:
        return 0
    exc_type, message = _DEFAULTS.get(code, (RuntimeError, f"kvcache internal status {code}"))
    if issubclass(exc_type, OSError):
        raise exc_type(err, detail or message, filename)
    raise exc_type(detail or message)


cdef int raise_error(const kvc_error *e, str op, object path_of=None, Py_ssize_t block_tokens=0,
                     Py_ssize_t start=-1) except -1:
    """Raise the exception a filled record describes (return 0 if it holds no failure).

    Parameters
    ----------
    e : the record the native call filled
    op : a key of :data:`OPS`, what the caller was doing
    path_of : callable ``(layer, kind) -> path`` naming the cold files, or None
    block_tokens : positions per block, to name a block's positions
    start : a read's first position (KVC_E_RANGE), or -1
    """
    cdef int code = e.code
    if code == KVC_OK:
        return 0
    prefix, after = OPS[op]
    layer, block = e.layer, e.block
    kind = _FILE_KINDS[e.file_kind] if 0 <= e.file_kind < 2 else None
    filename = None
    if path_of is not None and layer >= 0:
        filename = path_of(layer, e.file_kind if kind is not None else 0)
    if code == KVC_E_FULL:
        if e.limit_kind == KVC_LIMIT_SEQ_LEN:
            msg = (f"layer {layer} holds {e.held} positions; {e.asked} more would exceed "
                   f"max_seq_len={e.limit}")
        elif e.limit_kind == KVC_LIMIT_COLD_BYTES:
            where = f" for layer {layer}" if layer >= 0 else " over every layer"
            msg = (f"up to {e.asked} more cold bytes{where} would exceed max_cold_bytes={e.limit} "
                   f"(the cold tier holds {e.held})")
        elif e.limit_kind == KVC_LIMIT_SLOTS:
            msg = f"layer {layer}: every hot slot holds a pinned block (sink or recent window)"
        else:
            msg = _DEFAULTS[code][1]
        raise CacheFullError(prefix + msg + after)
    if code == KVC_E_IO:
        what = f"the cold {kind} file" if kind is not None else "the cold files"
        raise ColdStoreError(e.err, f"{prefix}cannot write {what} of layer {layer}: "
                                    f"{os.strerror(e.err) if e.err else 'unknown error'}{after}", filename)
    if code == KVC_E_CORRUPT:
        first = block * block_tokens
        raise CorruptionError(0, f"{prefix}block {block} (positions {first}..{first + block_tokens - 1}) "
                                 f"of layer {layer} failed its CRC32C check ({kind} file)", filename)
    if code == KVC_E_RANGE and start >= 0:
        raise IndexError(f"{prefix}positions {start}:{e.asked} of layer {layer} were truncated "
                         f"meanwhile (it holds {e.held})")
    if code == KVC_E_CLOSED:
        raise CacheClosedError(_DEFAULTS[code][1])
    exc_type, message = _DEFAULTS.get(code, (RuntimeError, f"kvcache internal status {code}"))
    if issubclass(exc_type, OSError):
        raise exc_type(e.err, prefix + message + after, filename)
    raise exc_type(prefix + message + after)
