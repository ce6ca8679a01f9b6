"""Exceptions raised by kvcache.

Each one also inherits the builtin a caller would catch without knowing
kvcache (``except ValueError`` catches a :class:`CacheFullError`).
"""


class KVCacheError(Exception):
    """Base class of every kvcache-specific error."""


class CacheFullError(KVCacheError, ValueError):
    """A store needs more positions than the cache can hold.

    Raised before anything is written: the cache keeps exactly what it held.
    The limits are ``max_seq_len`` positions per layer and ``max_cold_bytes``.
    """


class CacheClosedError(KVCacheError, ValueError):
    """The cache was used after :meth:`TieredKVCache.close`."""


class CorruptionError(KVCacheError, OSError):
    """Stored data failed its integrity check (the message names file and block),
    or a cold directory does not hold what its index says."""


class ColdStoreError(KVCacheError, OSError):
    """A cold file could not be created, written or read (disk full, permissions...).

    The store that hit it stored nothing; every token stored before stays readable.
    """


class RemoteTierError(KVCacheError, OSError):
    """The prefix store's remote tier (Redis) failed a call: unreachable, timed
    out, or refused the command (the message names the server and the call).

    Raised only by a store made with ``remote_errors="raise"``; by default
    (``"miss"``) the call goes on with what the local tiers hold.  A load that
    raises it leaves the cache empty; a save that raises it has stored every
    block in the local tiers all the same.
    """


__all__ = ["KVCacheError", "CacheFullError", "CacheClosedError", "CorruptionError", "ColdStoreError",
           "RemoteTierError"]
