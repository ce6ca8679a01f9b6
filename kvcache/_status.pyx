"""The one error translator: native status codes to kvcache exceptions."""
from kvcache._ckvc cimport KVC_OK, KVC_E_NOMEM, KVC_E_FULL, KVC_E_CLOSED, KVC_E_RANGE, KVC_E_INVALID
from kvcache.errors import CacheClosedError, CacheFullError

_DEFAULTS = {
    KVC_E_NOMEM: (MemoryError, "out of memory"),
    KVC_E_FULL: (CacheFullError, "the cache is full"),
    KVC_E_CLOSED: (CacheClosedError, "the cache is closed"),
    KVC_E_RANGE: (IndexError, "positions outside what is stored"),
    KVC_E_INVALID: (ValueError, "invalid argument"),
}


cdef int check_status(int code, str detail=None) except -1:
    """Return 0 for KVC_OK, else raise the exception mapped to ``code``.

    ``detail`` replaces the generic message when the caller knows more
    (what was expected and what came).
    """
    if code == KVC_OK:
        return 0
    exc_type, message = _DEFAULTS.get(code, (RuntimeError, f"kvcache internal status {code}"))
    raise exc_type(detail or message)
