"""The one error translator: native status codes to kvcache exceptions."""
from kvcache._ckvc cimport (
    KVC_OK, KVC_E_NOMEM, KVC_E_FULL, KVC_E_CLOSED, KVC_E_RANGE, KVC_E_INVALID, KVC_E_IO, KVC_E_CORRUPT,
)
from kvcache.errors import CacheClosedError, CacheFullError, ColdStoreError, CorruptionError

_DEFAULTS = {
    KVC_E_NOMEM: (MemoryError, "out of memory"),
    KVC_E_FULL: (CacheFullError, "the cache is full"),
    KVC_E_CLOSED: (CacheClosedError, "the cache is closed"),
    KVC_E_RANGE: (IndexError, "positions outside what is stored"),
    KVC_E_INVALID: (ValueError, "invalid argument"),
    KVC_E_IO: (ColdStoreError, "a cold file could not be written"),
    KVC_E_CORRUPT: (CorruptionError, "a cold block failed its checksum"),
}


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
