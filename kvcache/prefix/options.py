"""The prefix store's options, checked before anything is made (and, for the
remote tier, before redis is imported).

Owns: the type and range checks of PrefixStore's arguments and their
messages.  Must not touch: the tiers themselves.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional

from kvcache.prefix.remote import DEFAULT_BACKOFF  # no redis import

REMOTE_ERRORS = ("miss", "raise")


def _int_option(name: str, value, low: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"PrefixStore.{name}: expected an int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    if value < low:
        raise ValueError(f"PrefixStore.{name}: expected an int >= {low}, got {value}")
    return value


def _path_option(name: str, value) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"PrefixStore.{name}: expected a path or None, got {type(value).__name__}")
    path = os.fspath(value)
    if not path:
        raise ValueError(f"PrefixStore.{name}: expected a path or None, got {value!r}")
    return os.fsdecode(path)


def _seconds(name: str, value, or_none: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"PrefixStore.{name}: expected seconds (a number){or_none}, "
                        f"got {type(value).__name__}")
    seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"PrefixStore.{name}: expected seconds > 0, got {value!r}")
    return seconds


def _remote_options(remote, ttl, errors, timeout, backoff) -> dict:
    """The remote tier's options, checked (before redis is imported)."""
    given = [n for n, v, default in (("remote_ttl", ttl, None), ("remote_errors", errors, "miss"),
                                     ("remote_timeout", timeout, None),
                                     ("remote_backoff", backoff, None)) if v != default]
    if remote is None:
        if given:
            raise ValueError(f"PrefixStore.{given[0]}: given without remote= (no remote tier)")
        return {}
    if isinstance(remote, str) and not remote:
        raise ValueError("PrefixStore.remote: expected a URL or a redis client, got ''")
    ttl = _int_option("remote_ttl", ttl, 1, allow_none=True)
    if not isinstance(errors, str):
        raise TypeError(f"PrefixStore.remote_errors: expected 'miss' or 'raise', got {type(errors).__name__}")
    if errors not in REMOTE_ERRORS:
        raise ValueError(f"PrefixStore.remote_errors: expected 'miss' or 'raise', got {errors!r}")
    timeout = None if timeout is None else _seconds("remote_timeout", timeout, " or None")
    if timeout is not None and not isinstance(remote, str):
        raise ValueError("PrefixStore.remote_timeout: applies to a client built from a URL; a ready "
                         "client keeps its own timeouts (socket_timeout, socket_connect_timeout)")
    if backoff is None:
        backoff = DEFAULT_BACKOFF
    if not isinstance(backoff, (tuple, list)) or len(backoff) != 2:
        raise TypeError(f"PrefixStore.remote_backoff: expected (first, longest) in seconds, got "
                        f"{backoff!r}")
    first, longest = (_seconds("remote_backoff", b) for b in backoff)
    if first > longest:
        raise ValueError(f"PrefixStore.remote_backoff: expected first <= longest, got {tuple(backoff)!r}")
    return dict(ttl=ttl, timeout=timeout, raise_errors=errors == "raise", backoff=(first, longest))
