"""Exceptions raised by kvcache.

Each one also inherits the builtin a caller would catch without knowing
kvcache (``except ValueError`` catches a :class:`CacheFullError`).
"""


class KVCacheError(Exception):
    """Base class of every kvcache-specific error."""


class CacheFullError(KVCacheError, ValueError):
    """A store needs more positions than the cache can hold.

    Raised before anything is written: the cache keeps exactly what it held.
    Until the cold tier lands, the limit is ``hot_tokens`` per layer.
    """


class CacheClosedError(KVCacheError, ValueError):
    """The cache was used after :meth:`TieredKVCache.close`."""


class CorruptionError(KVCacheError, OSError):
    """Stored data failed its integrity check."""


__all__ = ["KVCacheError", "CacheFullError", "CacheClosedError", "CorruptionError"]
