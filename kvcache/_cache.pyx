"""TieredKVCache: the public cache object.

Validation happens here, with the GIL; the copies happen in kvcache._hot,
without it.  See README.md, "Thread safety", for the concurrency contract.
"""
import numpy as np

cimport numpy as cnp
from cpython.number cimport PyIndex_Check

from kvcache._arrays cimport as_array, check_rows
from kvcache._ckvc cimport KVC_OK, KVC_E_FULL, KVC_E_RANGE
from kvcache._hot cimport HotTier
from kvcache._hot import STAT_NAMES
from kvcache._status cimport check_status
from kvcache.config import CacheConfig, usable_cores
from kvcache.errors import CacheClosedError

cnp.import_array()


cdef class TieredKVCache:
    """A key/value cache for every layer of a transformer, filled position by position.

    Build it from a :class:`~kvcache.CacheConfig` or from the same keywords::

        cache = TieredKVCache(n_layers=32, n_kv_heads=8, head_dim=128, max_seq_len=4096)

    Each layer has its own cursor: ``store`` appends at that layer's end and
    ``get`` reads any stored range in position order.  It is a context manager;
    :meth:`close` (or leaving the ``with`` block, or garbage collection)
    frees its memory, after which every method raises
    :class:`~kvcache.CacheClosedError`.

    Parameters
    ----------
    config : CacheConfig, optional
        The configuration; or pass CacheConfig's keywords instead.

    Notes
    -----
    Inputs are float32 arrays (numpy, torch CPU tensors, any buffer) whose
    last two dimensions ``[n_kv_heads, head_dim]`` are C-contiguous; the
    leading dimensions may have any stride.  Nothing is converted silently.
    """

    cdef readonly object config
    cdef object __weakref__
    cdef HotTier hot
    cdef Py_ssize_t n_layers, n_heads, head_dim

    def __init__(self, config=None, **kwargs):
        if config is None:
            config = CacheConfig(**kwargs)
        elif kwargs:
            raise TypeError("TieredKVCache: pass either a CacheConfig or its keywords, not both")
        elif not isinstance(config, CacheConfig):
            raise TypeError(f"TieredKVCache: expected a CacheConfig, got {type(config).__name__}")
        self.config = config
        self.n_layers = config.n_layers
        self.n_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        arena = 2 * config.n_layers * config.hot_capacity * config.row_bytes
        if config.prefault:
            _check_fits_in_ram(arena)
        self.hot = HotTier(config.n_layers, config.hot_capacity, config.n_kv_heads * config.head_dim,
                           prefault=config.prefault,
                           threads=config.threads if config.threads is not None else usable_cores())

    # -- lifetime ---------------------------------------------------------
    def close(self):
        """Free the cache's memory.  Idempotent; waits for stores and gets in flight."""
        if self.hot is not None:
            self.hot.close()

    @property
    def closed(self):
        """True once :meth:`close` has run."""
        return self.hot.closed

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        c = self.config
        state = "closed" if self.hot.closed else f"seq_len={self.seq_len}"
        return (f"<TieredKVCache {c.n_layers} layers x {c.n_kv_heads} heads x {c.head_dim}, "
                f"hot_tokens={c.hot_capacity}, {state}>")

    cdef inline int _check_open(self) except -1:
        if self.hot.closed:
            raise CacheClosedError("this TieredKVCache is closed")
        return 0

    cdef inline Py_ssize_t _layer(self, object layer) except -1:
        cdef Py_ssize_t l
        if not PyIndex_Check(layer) or isinstance(layer, bool):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        try:
            l = layer
        except OverflowError:
            l = -1
        if l < 0 or l >= self.n_layers:
            raise IndexError(f"layer: expected 0 <= layer < {self.n_layers}, got {l}")
        return l

    cdef int _raise_store(self, int status, Py_ssize_t layer, Py_ssize_t n) except -1:
        if status == KVC_E_FULL:
            if layer < 0:  # store_layers: name the fullest layer
                layer = max(range(self.n_layers), key=self.layer_len)
            have = self.layer_len(layer)
            where = f"layer {layer}"
            c = self.config
            limit = ("hot_tokens=" if c.hot_capacity < c.max_seq_len else "max_seq_len=") + str(c.hot_capacity)
            return check_status(status, f"{where} holds {have} positions; {n} more would exceed "
                                        f"{limit} (nothing was stored)")
        return check_status(status)

    # -- stores -----------------------------------------------------------
    cdef int _store(self, object layer, object keys, object values, bint batch) except -1:
        self._check_open()
        cdef Py_ssize_t l = self._layer(layer)
        cdef cnp.ndarray k = as_array(keys, "keys", False)
        cdef cnp.ndarray v = as_array(values, "values", False)
        cdef Py_ssize_t n = check_rows(k, "keys", 3, self.n_heads, self.head_dim, not batch)
        cdef Py_ssize_t nv = check_rows(v, "values", 3, self.n_heads, self.head_dim, not batch)
        _check_tokens(n, nv)
        # A single token has no token axis; its step is never used.
        cdef Py_ssize_t k_step = cnp.PyArray_STRIDE(k, 0) if cnp.PyArray_NDIM(k) == 3 else 0
        cdef Py_ssize_t v_step = cnp.PyArray_STRIDE(v, 0) if cnp.PyArray_NDIM(v) == 3 else 0
        cdef int status
        with nogil:
            status = self.hot.append(l, n, <const char *>cnp.PyArray_DATA(k), k_step,
                                     <const char *>cnp.PyArray_DATA(v), v_step)
        if status != KVC_OK:
            self._raise_store(status, l, n)
        return 0

    def store(self, layer, keys, values):
        """Append tokens to one layer at that layer's cursor.

        Parameters
        ----------
        layer : int
            ``0 <= layer < n_layers``.
        keys, values : array_like
            One token ``[n_kv_heads, head_dim]`` or several
            ``[T, n_kv_heads, head_dim]``, float32.

        Raises
        ------
        CacheFullError
            If the layer has no room for them (nothing is stored).
        TypeError, ValueError, IndexError
            For a bad layer, dtype, shape or layout.
        """
        self._store(layer, keys, values, False)

    def store_batch(self, layer, keys, values):
        """Append ``[T, n_kv_heads, head_dim]`` keys and values to one layer.

        Same as :meth:`store` with a batch; the copy runs without the GIL.
        """
        self._store(layer, keys, values, True)

    def store_layers(self, keys, values):
        """Append ``[n_layers, T, n_kv_heads, head_dim]`` to every layer in one call.

        Layers are copied in parallel on native threads (see :attr:`threads`),
        with the GIL released.  All layers are stored, or none: if any layer
        lacks room, :class:`~kvcache.CacheFullError` is raised and nothing is
        written.
        """
        self._check_open()
        cdef cnp.ndarray k = as_array(keys, "keys", False)
        cdef cnp.ndarray v = as_array(values, "values", False)
        check_rows(k, "keys", 4, self.n_heads, self.head_dim)
        check_rows(v, "values", 4, self.n_heads, self.head_dim)
        if k.shape[0] != self.n_layers or v.shape[0] != self.n_layers:
            raise ValueError(f"keys/values: expected {self.n_layers} layers on axis 0, "
                             f"got {k.shape[0]} and {v.shape[0]}")
        cdef Py_ssize_t n = k.shape[1]
        _check_tokens(n, v.shape[1])
        cdef int status
        with nogil:
            status = self.hot.append_all(
                n, <const char *>cnp.PyArray_DATA(k), cnp.PyArray_STRIDE(k, 0), cnp.PyArray_STRIDE(k, 1),
                <const char *>cnp.PyArray_DATA(v), cnp.PyArray_STRIDE(v, 0), cnp.PyArray_STRIDE(v, 1))
        if status != KVC_OK:
            self._raise_store(status, -1, n)

    # -- reads ------------------------------------------------------------
    def get(self, layer, start=0, stop=None, out=None):
        """Return one layer's keys and values for positions ``start:stop``.

        Parameters
        ----------
        layer : int
        start, stop : int or None
            Positions, like a slice (negative counts from the layer's end);
            ``stop=None`` means everything stored.  Out-of-range values raise
            instead of being clipped.
        out : tuple of two arrays, optional
            ``(keys_out, values_out)``, each writable float32
            ``[stop - start, n_kv_heads, head_dim]``; filled and returned, and
            nothing is allocated.

        Returns
        -------
        keys, values : numpy.ndarray
            ``[stop - start, n_kv_heads, head_dim]`` float32, in position order.
        """
        self._check_open()
        cdef Py_ssize_t l = self._layer(layer)
        cdef Py_ssize_t length = self._length(l)
        cdef Py_ssize_t a = _position("start", start, length, 0)
        cdef Py_ssize_t b = _position("stop", stop, length, length)
        if a > b:
            raise ValueError(f"get: expected start <= stop, got start={a} > stop={b}")
        cdef Py_ssize_t n = b - a
        cdef cnp.ndarray ko, vo
        cdef cnp.npy_intp dims[3]
        if out is None:
            dims[0] = n
            dims[1] = self.n_heads
            dims[2] = self.head_dim
            ko = cnp.PyArray_EMPTY(3, dims, cnp.NPY_FLOAT32, 0)
            vo = cnp.PyArray_EMPTY(3, dims, cnp.NPY_FLOAT32, 0)
        else:
            ko, vo = self._check_out(out, n)
        if n == 0:
            return (ko, vo) if out is None else out
        cdef int status
        with nogil:
            status = self.hot.read(l, a, b, <char *>cnp.PyArray_DATA(ko), cnp.PyArray_STRIDE(ko, 0),
                                   <char *>cnp.PyArray_DATA(vo), cnp.PyArray_STRIDE(vo, 0))
        if status == KVC_E_RANGE:
            check_status(status, f"get: positions {a}:{b} of layer {l} were truncated meanwhile")
        check_status(status)
        return (ko, vo) if out is None else out

    cdef tuple _check_out(self, object out, Py_ssize_t n):
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out: expected a (keys_out, values_out) pair, got {type(out).__name__}")
        cdef cnp.ndarray ko = as_array(out[0], "out[0]", True)
        cdef cnp.ndarray vo = as_array(out[1], "out[1]", True)
        for name, a in (("out[0]", ko), ("out[1]", vo)):
            if check_rows(a, name, 3, self.n_heads, self.head_dim) != n:
                raise ValueError(f"{name}: expected shape [{n}, {self.n_heads}, {self.head_dim}], "
                                 f"got {list((<object>a).shape)}")
        if n and np.may_share_memory(ko, vo):
            raise ValueError("out: keys_out and values_out overlap")
        return ko, vo

    # -- positions --------------------------------------------------------
    @property
    def seq_len(self):
        """Positions every layer holds (the shortest layer's length)."""
        self._check_open()
        return min(self.layer_len(l) for l in range(self.n_layers))

    def layer_len(self, layer):
        """Positions stored in ``layer``."""
        self._check_open()
        return self._length(self._layer(layer))

    cdef Py_ssize_t _length(self, Py_ssize_t l) except -1:
        cdef Py_ssize_t n
        with nogil:
            n = self.hot.length(l)
        if n < 0:  # closed by another thread since the caller's check
            self._check_open()
        return n

    def truncate(self, n):
        """Drop positions ``>= n`` in every layer (rollback); shorter layers are unchanged."""
        self._check_open()
        if not PyIndex_Check(n) or isinstance(n, bool):
            raise TypeError(f"truncate: expected an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"truncate: expected n >= 0, got {n}")
        cdef Py_ssize_t m = min(n, self.config.max_seq_len)
        cdef int status
        with nogil:
            status = self.hot.truncate(m)
        check_status(status)

    def reset(self):
        """Forget every position (statistics are kept; they count the cache's lifetime)."""
        self.truncate(0)

    def _hot_tier(self):
        """Test hook: the HotTier behind this cache."""
        return self.hot

    # -- accounting -------------------------------------------------------
    def stats(self):
        """Counters since creation, as a dict of ints.

        ``tokens_stored`` / ``tokens_read`` count token rows summed over layers
        (a ``store_layers`` of T tokens adds ``n_layers * T``); ``bytes_*``
        count key and value bytes; ``hot_hits`` / ``cold_hits`` split the rows
        read by the tier that served them; ``evictions`` counts rows moved to
        the cold tier.  Each counter is exact; a snapshot taken while other
        threads store is not a single instant.
        """
        self._check_open()
        return {name: self.hot.stat(name) for name in STAT_NAMES}

    @property
    def nbytes(self):
        """Bytes of RAM the key/value arenas hold."""
        self._check_open()
        return self.hot.nbytes

    @property
    def threads(self):
        """Native threads :meth:`store_layers` uses (settable)."""
        self._check_open()
        return self.hot.threads

    @threads.setter
    def threads(self, value):
        from kvcache.config import _positive_int
        self._check_open()
        self.hot.threads = _positive_int("threads", value)


cdef inline int _check_tokens(Py_ssize_t n_keys, Py_ssize_t n_values) except -1:
    if n_keys == 0 or n_values == 0:
        raise ValueError(f"{'keys' if n_keys == 0 else 'values'}: expected at least one token, got 0")
    if n_values != n_keys:
        raise ValueError(f"values: expected {n_keys} tokens like keys, got {n_values}")
    return 0


cdef Py_ssize_t _position(str name, object value, Py_ssize_t length, Py_ssize_t default) except? -1:
    if value is None:
        return default
    if not PyIndex_Check(value) or isinstance(value, bool):
        raise TypeError(f"get: {name} expected an int or None, got {type(value).__name__}")
    cdef Py_ssize_t p
    try:
        p = value
    except OverflowError:
        raise IndexError(f"get: {name}={value} is outside the {length} positions stored") from None
    if p < 0:
        p += length
    if p < 0 or p > length:
        raise IndexError(f"get: {name}={value} is outside the {length} positions stored")
    return p


def _check_fits_in_ram(arena_bytes):
    import os
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if arena_bytes > ram:
        raise MemoryError(
            f"the hot tier needs {arena_bytes / 2**30:.1f} GiB but this machine has "
            f"{ram / 2**30:.1f} GiB of RAM; lower hot_tokens or max_seq_len, or pass prefault=False")
