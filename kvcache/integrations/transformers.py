"""TieredCache: a ``transformers`` Cache backed by a :class:`kvcache.TieredKVCache`.

Needs the ``transformers`` extra (``pip install "kvcache[transformers]"``)::

    from kvcache.integrations.transformers import TieredCache

    cache = TieredCache(config=model.config, max_seq_len=4096, hot_tokens=1024, block_tokens=256)
    out = model.generate(input_ids, cache=cache, max_new_tokens=64)   # or past_key_values=cache
    print(cache.kv.stats())

Prefix reuse: with ``prefix_store=`` (a :class:`kvcache.PrefixStore` of the
cache's shape, shared by every request and, through its ``disk_dir``, by
every process), ``load_prefix`` copies the longest stored prefix of a prompt
into the empty cache and ``generate`` computes only the rest (it feeds the
model the prompt tokens past ``get_seq_length()``); ``save_prefix`` stores
the full blocks of what the cache then holds::

    L, H, D = model_shape(model.config)
    store = PrefixStore("org/name@rev", n_layers=L, n_kv_heads=H, head_dim=D, block_tokens=256,
                        dtype="float16", disk_dir="/var/tmp/kv-prefix")
    cache = TieredCache(config=model.config, max_seq_len=4096, block_tokens=256, dtype="float16",
                        prefix_store=store)
    reused = cache.load_prefix(input_ids)                # positions not recomputed
    out = model.generate(input_ids, cache=cache, max_new_tokens=64)
    cache.save_prefix(out)                               # prompt + output, full blocks

Keys and values cross the boundary without needless copies: a decode step's
one-token states are stored straight from the model's tensors, and while the
whole context is in RAM in the model's dtype, ``update`` returns tensors that
view the cache's arenas (nothing re-copied per step).  Otherwise (part of the
context in the cold tier, or a storage dtype other than the model's) each
step reads the context into reused float32 buffers, converted by the SIMD
header.  Batch size 1 only; CPU tensors only.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcache import PrefixStore, TieredKVCache
from kvcache._codec import DTYPES
from kvcache.prefix.keys import token_ids

# torch dtypes that are store inputs, from the one dtype table
_TORCH_DTYPES = {getattr(torch, d.torch): d.name for d in DTYPES.values() if d.torch is not None}


def model_shape(config):
    """(layers, key/value heads, head_dim) of a transformers model config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def _rows_to_torch(rows, dtype: str, n_heads: int, head_dim: int) -> torch.Tensor:
    """uint8 ``[n, row_bytes]`` rows of a float dtype as a ``[1, heads, n, head_dim]`` tensor, no copy."""
    info = DTYPES[dtype]
    assert info.torch is not None, dtype  # callers pass a dtype torch has
    # viewed as an integer of the same size, then as the torch dtype (numpy has no bfloat16)
    t = torch.from_numpy(rows.view(f"<i{info.itemsize}").reshape(rows.shape[0], n_heads, head_dim))
    return t.view(getattr(torch, info.torch)).permute(1, 0, 2).unsqueeze(0)


def _to_numpy(t: torch.Tensor):
    """A CPU tensor as a numpy array without a copy (bfloat16 as ml_dtypes')."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TieredLayer(CacheLayerMixin):
    """One decoder layer of a :class:`TieredCache`."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, kv: TieredKVCache, layer: int):
        super().__init__()
        self.kv = kv
        self.layer = layer
        # reused float32 (keys, values) for the copying path
        self._buffers: Optional[Tuple[np.ndarray, np.ndarray]] = None
        # [1, heads, capacity, head_dim] tensors over the arenas, when every position is in RAM
        self._arenas: Optional[Tuple[torch.Tensor, ...]] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        cfg = self.kv.config
        rows = self.kv._whole_arenas(self.layer) if cfg.dtype == _TORCH_DTYPES.get(self.dtype) else None
        if rows is not None:  # every position stays in RAM, in the model's dtype: slice the arenas
            self._arenas = tuple(_rows_to_torch(r, cfg.dtype, cfg.n_kv_heads, cfg.head_dim) for r in rows)
        self.is_initialized = True

    def _check(self, key_states, value_states) -> None:
        """Refuse what the cache cannot store, before anything changes (the layer's dtype included)."""
        cfg = self.kv.config
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"TieredCache: {name} expected a torch.Tensor, got {type(t).__name__}")
            if t.ndim == 4 and t.shape[0] != 1:
                raise ValueError(f"TieredCache: expected batch size 1, got {t.shape[0]}")
            if t.ndim != 4 or t.shape[1] != cfg.n_kv_heads or t.shape[3] != cfg.head_dim:
                raise ValueError(f"TieredCache: {name} expected shape [1, {cfg.n_kv_heads}, T, "
                                 f"{cfg.head_dim}], got {list(t.shape)}")
            if t.device.type != "cpu":
                raise ValueError(f"TieredCache: expected CPU tensors, got {t.device}")
            if t.dtype not in _TORCH_DTYPES:
                raise TypeError(f"TieredCache: {name} expected dtype float32, float16 or bfloat16, "
                                f"got {t.dtype}")
        if value_states.shape != key_states.shape or value_states.dtype != key_states.dtype:
            raise ValueError(f"TieredCache: value_states expected {list(key_states.shape)} "
                             f"{key_states.dtype} like key_states, got {list(value_states.shape)} "
                             f"{value_states.dtype}")
        if self.is_initialized and key_states.dtype != self.dtype:
            raise TypeError(f"TieredCache: key_states expected {self.dtype} like the earlier updates "
                            f"of layer {self.layer}, got {key_states.dtype}")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._check(key_states, value_states)
        # [1, heads, T, head_dim] -> [T, heads, head_dim]: a view for one token,
        # one copy for a prompt (the cache wants each token's heads contiguous).
        k = key_states.detach()[0].transpose(0, 1)
        v = value_states.detach()[0].transpose(0, 1)
        if k.shape[0] > 1 or not k.is_contiguous() or not v.is_contiguous():
            k, v = k.contiguous(), v.contiguous()
        self.kv.store(self.layer, _to_numpy(k), _to_numpy(v))
        if not self.is_initialized:  # after the store: a refused first update leaves the layer fresh
            self.lazy_initialization(key_states, value_states)
        n = self.kv.layer_len(self.layer)
        if self._arenas is not None:  # no copy: what attention reads is the cache itself
            self.keys, self.values = self._arenas[0][:, :, :n], self._arenas[1][:, :, :n]
        else:
            self.keys, self.values = self._context(n)
        return self.keys, self.values

    def _context(self, n):
        """The layer's whole context as ``[1, heads, n, head_dim]`` tensors, copied."""
        kv, cfg = self.kv, self.kv.config
        if self._buffers is None or self._buffers[0].shape[0] < n:
            cap = max(n, 2 * (0 if self._buffers is None else self._buffers[0].shape[0]))
            cap = min(cap, cfg.max_seq_len)
            self._buffers = tuple(np.empty((cap, cfg.n_kv_heads, cfg.head_dim), np.float32) for _ in range(2))
        ko, vo = (b[:n] for b in self._buffers)
        kv.get(self.layer, 0, n, out=(ko, vo))
        return tuple(torch.from_numpy(a).permute(1, 0, 2).unsqueeze(0).to(self.dtype) for a in (ko, vo))

    def get_seq_length(self) -> int:
        return self.kv.layer_len(self.layer)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.kv.config.max_seq_len

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TieredCache crops every layer at once: call TieredCache.crop")

    def reset(self) -> None:
        self.keys = self.values = None  # TieredCache.reset forgets the positions

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        _check_single(beam_idx.tolist(), "reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError(f"TieredCache: batch size 1 only, got a repeat of {repeats}")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        _check_single(indices.tolist(), "batch_select_indices")


def _index(what, value) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} expected an int, got {type(value).__name__}")


def _prefix_ids(ids, what: str):
    """Token ids of one sequence (refusing a batch of several by name), as uint32."""
    name = f"TieredCache.{what}: token ids"
    shape = getattr(ids, "shape", None)
    if shape is not None and len(shape) == 2 and shape[0] != 1:
        raise ValueError(f"{name}: batch size 1 only, got shape {list(shape)}")
    if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"{name}: batch size 1 only, got {len(ids)} sequences")
        ids = ids[0]
    return token_ids(ids, name)


def _check_store(store, kv: TieredKVCache) -> None:
    """Refuse a prefix store that does not fit ``kv`` with the store's own check."""
    if not isinstance(store, PrefixStore):
        raise TypeError(f"TieredCache: prefix_store expected a kvcache.PrefixStore or None, "
                        f"got {type(store).__name__}")
    try:
        store._check_cache(kv, "load")
    except ValueError as e:
        why = str(e).partition(": ")[2] or str(e)  # drop the "PrefixStore.load: " prefix
        raise ValueError(f"TieredCache: prefix_store does not fit this cache: {why}") from None


def _check_single(indices, what):
    if list(indices) != [0]:
        raise ValueError(f"TieredCache.{what}: batch size 1 only, got indices {list(indices)}")


class TieredCache(Cache):
    """A ``transformers.Cache`` whose keys and values live in a :class:`kvcache.TieredKVCache`.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config: layers, key/value heads (grouped-query attention
        included) and head_dim are read from it.
    max_seq_len : int
        Positions the cache may hold.
    prefix_store : kvcache.PrefixStore, optional
        Enables :meth:`load_prefix` and :meth:`save_prefix`.  Its n_layers,
        n_kv_heads, head_dim, block_tokens and dtype must be the cache's
        (else ValueError naming the field).  Shared: :meth:`close` leaves
        it open.
    **options
        Any other :class:`kvcache.CacheConfig` field: ``hot_tokens``,
        ``block_tokens``, ``dtype``, ``cold_dtype``, ``cold_dir``,
        ``eviction_policy``, ``sink_tokens``, ``threads``...

    Notes
    -----
    Semantics are DynamicCache's: ``update`` appends and returns the whole
    context; ``crop(-k)`` drops the last k positions (``crop(n >= 0)``
    keeps n, as ``DynamicCache.crop`` once did); ``reset`` forgets
    everything.  ``kv`` is the underlying TieredKVCache (stats, close).
    """

    def __init__(self, config, max_seq_len: int, *, prefix_store: Optional[PrefixStore] = None,
                 **options):
        n_layers, n_kv_heads, head_dim = model_shape(config)
        self.kv = TieredKVCache(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim,
                                max_seq_len=max_seq_len, **options)
        if prefix_store is not None:
            try:
                _check_store(prefix_store, self.kv)
            except BaseException:
                self.kv.close()
                raise
        self.prefix_store = prefix_store
        super().__init__(layers=[TieredLayer(self.kv, l) for l in range(n_layers)])

    def _store(self, what: str) -> PrefixStore:
        if self.prefix_store is None:
            raise RuntimeError(f"TieredCache.{what}: this cache has no prefix store; create it with "
                               f"TieredCache(..., prefix_store=kvcache.PrefixStore(...))")
        return self.prefix_store

    def load_prefix(self, input_ids) -> int:
        """Copy the longest stored prefix of ``input_ids`` into this empty cache.

        Then ``model.generate(input_ids, cache=cache)`` (or
        ``past_key_values=cache``) computes only the positions past it: given
        a cache holding ``get_seq_length()`` positions, generate feeds the
        model ``input_ids[:, get_seq_length():]``.

        Parameters
        ----------
        input_ids : torch tensor, numpy integer array or list of int
            The whole prompt, shape ``[T]`` or ``[1, T]`` (batch size 1).

        Returns
        -------
        int
            Positions loaded: a multiple of ``block_tokens``, except that at
            most ``T - 1`` are (the model must compute the last prompt token
            to predict the next); 0 when nothing is stored.

        Raises
        ------
        RuntimeError
            The cache has no ``prefix_store``.
        ValueError
            A batch of more than one sequence; a cache that is not empty
            (``reset()`` it first); bad token ids (TypeError for ids that
            are not ints).
        """
        store = self._store("load_prefix")
        ids = _prefix_ids(input_ids, "load_prefix")
        held = max(self.kv.layer_len(l) for l in range(self.kv.config.n_layers))
        if held:
            raise ValueError(f"TieredCache.load_prefix: expected an empty cache (call reset() first), "
                             f"got one holding {held} positions")
        return store.load(self.kv, ids)

    def save_prefix(self, token_ids) -> int:
        """Store the full blocks of ``token_ids`` that the prefix store lacks.

        Parameters
        ----------
        token_ids : torch tensor, numpy integer array or list of int
            The ids at this cache's positions ``0..T-1``, shape ``[T]`` or
            ``[1, T]``: after ``generate``, its output sequence (prompt and
            new tokens).  Blocks past what the cache holds (generate does not
            store its last token) are not saved.

        Returns
        -------
        int
            Blocks added to the store.

        Raises
        ------
        RuntimeError
            The cache has no ``prefix_store``.
        ValueError
            A batch of more than one sequence; bad token ids.
        """
        store = self._store("save_prefix")
        return store.save(self.kv, _prefix_ids(token_ids, "save_prefix"))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        n, layer_idx = len(self.layers), _index("TieredCache: layer_idx", layer_idx)
        if not 0 <= layer_idx < n:  # a list would take -1 as the last layer
            raise IndexError(f"TieredCache: layer_idx expected 0 <= layer_idx < {n}, got {layer_idx}")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def crop(self, max_length: int) -> None:
        max_length = _index("TieredCache.crop: max_length", max_length)
        n = self.kv.seq_len
        self.kv.truncate(max(0, n + max_length) if max_length < 0 else max_length)

    def reset(self) -> None:
        super().reset()
        self.kv.reset()

    def close(self) -> None:
        """Free the cache's memory (and its scratch files); the prefix store stays open."""
        for layer in self.layers:
            if isinstance(layer, TieredLayer):
                layer._arenas = layer.keys = layer.values = None
        self.kv.close()
