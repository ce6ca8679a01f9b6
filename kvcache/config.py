"""CacheConfig: the shape and budgets of a cache, validated on construction."""
from __future__ import annotations

import dataclasses
import numbers
import operator
import os
import sys
from dataclasses import dataclass
from typing import Optional, Union

from kvcache._codec import DTYPES as _DTYPE_TABLE, row_bytes as _row_bytes
from kvcache._policy import POLICIES as _POLICY_TABLE

DTYPES = tuple(_DTYPE_TABLE)  # names, from the one table (kvcache._codec.DTYPES)
MAX_THREADS = 2**31 - 1  # a C int; the pool itself runs at most 64 helpers
EVICTION_POLICIES = tuple(_POLICY_TABLE)  # from the one table (kvcache._policy.POLICIES)


def _positive_int(name: str, value, *, allow_zero: bool = False, high: int = sys.maxsize) -> int:
    if isinstance(value, bool):
        raise TypeError(f"CacheConfig.{name}: expected an int, got bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"CacheConfig.{name}: expected an int, got {type(value).__name__} {value!r}") from None
    low = 0 if allow_zero else 1
    if n < low:
        raise ValueError(f"CacheConfig.{name}: expected an int >= {low}, got {n}")
    if n > high:
        raise ValueError(f"CacheConfig.{name}: expected an int <= {high}, got {n}")
    return n


def _choice(name: str, value, allowed) -> str:
    if not isinstance(value, str):
        raise TypeError(f"CacheConfig.{name}: expected a str, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"CacheConfig.{name}: expected one of {allowed}, got {value!r}")
    return value


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
        Otherwise a multiple of ``block_tokens`` leaving room for the sink
        blocks plus two: older blocks then move to the cold tier on disk.
    dtype : str
        How the hot tier stores keys and values: ``"float32"``, ``"float16"``,
        ``"bfloat16"`` (round to nearest even) or ``"int8"`` (symmetric, one
        float32 scale per token and head).  ``get`` returns float32 either way.
    cold_dtype : str or None
        How the cold tier stores them (``None``: as ``dtype``); blocks are
        converted when they move between the tiers.
    eviction_policy : str
        Which hot block goes cold when a layer needs a slot:
        ``"lru"`` the least recently stored or read; ``"adaptive"`` the lowest
        ``adaptive_frequency_weight * gets + adaptive_recency_weight * last_tick``;
        ``"h2o"`` the lowest attention mass (see ``update_scores``) outside the
        ``recent_tokens`` window.
    sink_tokens : int
        First positions that always stay in RAM (attention sinks).
    block_tokens : int
        Positions moved between tiers at a time.
    cold_dir : str, os.PathLike or None
        Directory of the cold tier's files, owned by the cache (created 0700
        if missing; must be empty or not exist for a new cache).  ``None``: a
        private temporary directory, removed on close.
    persist : bool
        Keep ``cold_dir`` after close: :meth:`~kvcache.TieredKVCache.flush`
        and close make the cache durable, and
        :meth:`~kvcache.TieredKVCache.open` reopens it.  Needs ``cold_dir``.
    max_cold_bytes : int or None
        Bound on the token bytes the cold tier holds (all layers); a store
        that could exceed it raises :class:`~kvcache.CacheFullError`.
    recent_tokens : int or None
        ``"h2o"``: the last positions that never go cold (default a quarter
        of ``hot_tokens``).
    adaptive_recency_weight, adaptive_frequency_weight : float
        ``"adaptive"``: weights of a block's last access tick (one tick per
        store or get call on its layer) and of its number of gets.
    promote_on_read : bool
        ``"lru"`` and ``"adaptive"``: a get copying a cold block brings it
        back to RAM when it outranks the block it would displace (never for
        gets touching more cold blocks than half the hot slots: scans do not
        flush the hot tier).
    threads : int or None
        Native threads for :meth:`~kvcache.TieredKVCache.store_layers`;
        ``None`` uses every core this process may run on.
    prefault : bool
        Touch every page of the RAM arenas at construction, so that no store
        pays a page fault (and fail early if they exceed physical memory).
        ``False`` reserves address space and commits pages as they fill.

    Raises
    ------
    TypeError
        A field of the wrong type (a float or str for an int, a non-str
        dtype, a non-bool flag...), naming the field and what it got.
    ValueError
        A value out of range (ints below their minimum or above
        ``sys.maxsize``, an unknown dtype or policy, inconsistent tiers...),
        naming the field, what it expects and what it got.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int
    hot_tokens: Optional[int] = None
    dtype: str = "float32"
    cold_dtype: Optional[str] = None
    eviction_policy: str = "lru"
    sink_tokens: int = 0
    block_tokens: int = 256
    cold_dir: Optional[Union[str, os.PathLike]] = None
    threads: Optional[int] = None
    prefault: bool = True
    persist: bool = False
    max_cold_bytes: Optional[int] = None
    recent_tokens: Optional[int] = None
    adaptive_recency_weight: float = 1.0
    adaptive_frequency_weight: float = 16.0
    promote_on_read: bool = True

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
        if self.tiered:
            B = self.block_tokens
            if self.hot_tokens % B:
                raise ValueError(f"CacheConfig.hot_tokens: expected a multiple of block_tokens={B}, "
                                 f"got {self.hot_tokens}")
            need = (self.sink_blocks + 2) * B
            if self.hot_tokens < need:
                raise ValueError(
                    f"CacheConfig.hot_tokens: expected at least {need} (sink blocks + 2 blocks of "
                    f"{B}) for a cache larger than RAM, got {self.hot_tokens}")
        if self.sink_tokens > self.hot_capacity:
            raise ValueError(
                f"CacheConfig.sink_tokens: expected at most hot_tokens={self.hot_capacity}, "
                f"got {self.sink_tokens}")
        if self.max_cold_bytes is not None:
            fix("max_cold_bytes", _positive_int("max_cold_bytes", self.max_cold_bytes, allow_zero=True))
        if self.recent_tokens is not None:
            fix("recent_tokens", _positive_int("recent_tokens", self.recent_tokens, allow_zero=True))
        for name in ("adaptive_recency_weight", "adaptive_frequency_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"CacheConfig.{name}: expected a number, got {type(value).__name__}")
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"CacheConfig.{name}: expected a finite number >= 0, got {value!r}")
            fix(name, float(value))
        if self.threads is not None:
            fix("threads", _positive_int("threads", self.threads, high=MAX_THREADS))
        for name, allowed in (("dtype", DTYPES), ("eviction_policy", EVICTION_POLICIES),
                              ("cold_dtype", DTYPES)):
            if getattr(self, name) is not None or name != "cold_dtype":
                _choice(name, getattr(self, name), allowed)
        if self.cold_dir is not None and not isinstance(self.cold_dir, (str, os.PathLike)):
            raise TypeError(
                f"CacheConfig.cold_dir: expected a path or None, got {type(self.cold_dir).__name__}")
        if self.cold_dir is not None and not os.fspath(self.cold_dir):
            raise ValueError(f"CacheConfig.cold_dir: expected a path or None, got {self.cold_dir!r}")
        for name in ("prefault", "persist", "promote_on_read"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CacheConfig.{name}: expected a bool, "
                                f"got {type(getattr(self, name)).__name__}")
        if self.persist and self.cold_dir is None:
            raise ValueError("CacheConfig.persist: expected a cold_dir to persist to, got cold_dir=None")

    @property
    def hot_capacity(self) -> int:
        """Positions per layer held in RAM."""
        return self.max_seq_len if self.hot_tokens is None else self.hot_tokens

    @property
    def tiered(self) -> bool:
        """True when part of the context may live in the cold tier."""
        return self.hot_capacity < self.max_seq_len

    @property
    def sink_blocks(self) -> int:
        """Blocks holding the sink positions (pinned in RAM)."""
        return -(-self.sink_tokens // self.block_tokens)

    @property
    def n_blocks(self) -> int:
        """Blocks per layer covering ``max_seq_len``."""
        return -(-self.max_seq_len // self.block_tokens)

    @property
    def hot_slots(self) -> int:
        """Blocks per layer the RAM arenas hold."""
        return self.hot_capacity // self.block_tokens if self.tiered else self.n_blocks

    @property
    def recent_window(self) -> int:
        """``recent_tokens``, or its default (a quarter of the hot tier)."""
        return self.hot_capacity // 4 if self.recent_tokens is None else self.recent_tokens

    @property
    def cold_format(self) -> str:
        """The cold tier's storage type (``cold_dtype``, else ``dtype``)."""
        return self.dtype if self.cold_dtype is None else self.cold_dtype

    def dtype_row_bytes(self, dtype: str) -> int:
        """Bytes of one token's keys (or values) in one layer, stored as ``dtype``.

        int8 rows hold the ``n_kv_heads`` float32 scales first, then the
        values, padded to a multiple of 4 bytes so that every row's scales
        are aligned."""
        return _row_bytes(dtype, self.n_kv_heads, self.head_dim)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's keys (or values) in one layer, in the hot tier."""
        return self.dtype_row_bytes(self.dtype)

    @property
    def cold_row_bytes(self) -> int:
        """The same in the cold tier."""
        return self.dtype_row_bytes(self.cold_format)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's keys and values over every layer, in the hot tier."""
        return 2 * self.n_layers * self.row_bytes


def check_fits_in_ram(arena_bytes):
    """MemoryError if prefaulted arenas of ``arena_bytes`` exceed this machine's RAM."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if arena_bytes > ram:
        raise MemoryError(
            f"the hot tier needs {arena_bytes / 2**30:.1f} GiB but this machine has "
            f"{ram / 2**30:.1f} GiB of RAM; lower hot_tokens or max_seq_len, or pass prefault=False")


def reopened_config(index, cold_dir, overrides):
    """The CacheConfig of a persisted cache being reopened: its index's fields with
    ``overrides`` (TieredKVCache.open's keywords) applied, checked against its files."""
    from kvcache._format import INDEX_CONFIG_FIELDS
    if overrides.get("persist", True) is not True:
        raise ValueError(f"TieredKVCache.open: a reopened cache always persists, "
                         f"got persist={overrides['persist']!r}")
    stored = index["config"]
    for name in ("n_layers", "n_kv_heads", "head_dim", "block_tokens"):
        if name in overrides and overrides[name] != stored[name]:
            raise ValueError(f"TieredKVCache.open: {os.fspath(cold_dir)} holds {name}={stored[name]!r}, "
                             f"got {name}={overrides[name]!r}")
    files = stored["cold_dtype"] or stored["dtype"]
    asked = overrides.get("cold_dtype", stored["cold_dtype"]) or overrides.get("dtype", stored["dtype"])
    if asked != files:
        raise ValueError(f"TieredKVCache.open: {os.fspath(cold_dir)} holds {files} cold files, "
                         f"got dtype/cold_dtype asking for {asked}")
    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"TieredKVCache.open: unknown config fields {sorted(unknown)}")
    args = {name: stored[name] for name in INDEX_CONFIG_FIELDS}
    args.update(overrides)
    args.update(cold_dir=cold_dir, persist=True)
    longest = max([entry["length"] for entry in index["layers"]] + [0])
    if args["max_seq_len"] < longest:
        raise ValueError(f"TieredKVCache.open: max_seq_len={args['max_seq_len']} is below the "
                         f"{longest} positions stored")
    return CacheConfig(**args)
