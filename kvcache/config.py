"""CacheConfig: the shape and budgets of a cache, validated on construction."""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Optional, Union

DTYPES = ("float32",)
EVICTION_POLICIES = ("lru",)


def _positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool):
        raise TypeError(f"CacheConfig.{name}: expected an int, got bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"CacheConfig.{name}: expected an int, got {type(value).__name__} {value!r}") from None
    low = 0 if allow_zero else 1
    if n < low:
        raise ValueError(f"CacheConfig.{name}: expected an int >= {low}, got {n}")
    return n


def usable_cores() -> int:
    """CPU cores this process may run on (the default thread count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CacheConfig:
    """Shape and budgets of a :class:`~kvcache.TieredKVCache`.

    Parameters
    ----------
    n_layers, n_kv_heads, head_dim : int
        Model shape: each layer stores ``[n_kv_heads, head_dim]`` keys and
        values per token.
    max_seq_len : int
        Positions a layer may hold in all.
    hot_tokens : int or None
        Positions per layer kept in RAM; ``None`` keeps all of ``max_seq_len``.
        Until the cold tier exists, storing past it raises
        :class:`~kvcache.CacheFullError`.
    dtype : str
        Storage type; ``"float32"``.
    eviction_policy : str
        Which blocks leave RAM first; ``"lru"``.
    sink_tokens : int
        First positions that always stay in RAM (attention sinks).
    block_tokens : int
        Positions moved between tiers at a time.
    cold_dir : str, os.PathLike or None
        Where the cold tier keeps its files (``None``: a private temporary
        directory).
    threads : int or None
        Native threads for :meth:`~kvcache.TieredKVCache.store_layers`;
        ``None`` uses every core this process may run on.
    prefault : bool
        Touch every page of the RAM arenas at construction, so that no store
        pays a page fault (and fail early if they exceed physical memory).
        ``False`` reserves address space and commits pages as they fill.

    Raises
    ------
    TypeError, ValueError
        Naming the field, what it expects and what it got.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int
    hot_tokens: Optional[int] = None
    dtype: str = "float32"
    eviction_policy: str = "lru"
    sink_tokens: int = 0
    block_tokens: int = 256
    cold_dir: Optional[Union[str, os.PathLike]] = None
    threads: Optional[int] = None
    prefault: bool = True

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("n_layers", "n_kv_heads", "head_dim", "max_seq_len", "block_tokens"):
            fix(name, _positive_int(name, getattr(self, name)))
        fix("sink_tokens", _positive_int("sink_tokens", self.sink_tokens, allow_zero=True))
        if self.hot_tokens is not None:
            fix("hot_tokens", _positive_int("hot_tokens", self.hot_tokens))
            if self.hot_tokens > self.max_seq_len:
                raise ValueError(
                    f"CacheConfig.hot_tokens: expected at most max_seq_len={self.max_seq_len}, "
                    f"got {self.hot_tokens}")
        if self.sink_tokens > self.hot_capacity:
            raise ValueError(
                f"CacheConfig.sink_tokens: expected at most hot_tokens={self.hot_capacity}, "
                f"got {self.sink_tokens}")
        if self.threads is not None:
            fix("threads", _positive_int("threads", self.threads))
        for name, allowed in (("dtype", DTYPES), ("eviction_policy", EVICTION_POLICIES)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"CacheConfig.{name}: expected one of {allowed}, got {value!r}")
        if self.cold_dir is not None and not isinstance(self.cold_dir, (str, os.PathLike)):
            raise TypeError(
                f"CacheConfig.cold_dir: expected a path or None, got {type(self.cold_dir).__name__}")
        if not isinstance(self.prefault, bool):
            raise TypeError(f"CacheConfig.prefault: expected a bool, got {type(self.prefault).__name__}")

    @property
    def hot_capacity(self) -> int:
        """Positions per layer held in RAM."""
        return self.max_seq_len if self.hot_tokens is None else self.hot_tokens

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's keys (or values) in one layer."""
        return self.n_kv_heads * self.head_dim * 4

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's keys and values over every layer."""
        return 2 * self.n_layers * self.row_bytes
