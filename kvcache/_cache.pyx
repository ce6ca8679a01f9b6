"""TieredKVCache: the public cache object.

Owns: checking what callers pass (with the GIL) and the cache's lifetime
(create, open, flush, close; the persisted index itself is kvcache._persist's).  The copies
happen in kvcache._hot, without the GIL; a failed native call fills an
error record that kvcache._status.raise_error turns into the exception.
Must not touch: blocks, slots or file bytes (the engine's and the format's).
See docs/reliability.md, "Threads", for the concurrency contract.
"""
import os
import threading

import numpy as np

cimport numpy as cnp
from cpython.number cimport PyIndex_Check

from kvcache._arrays cimport (
    as_array, check_flag, check_out, check_rows, check_tokens, position, same_kind, unaliased,
)
from kvcache._ckvc cimport KVC_OK, KVC_E_CLOSED, kvc_error, kvc_error_clear
from kvcache._codec cimport FMT_F32, Rows
from kvcache._codec import DTYPES, unpack_rows
from kvcache._cold import ColdStore
from kvcache._format import file_name, read_index
from kvcache._hot cimport HotTier
from kvcache._hot import STAT_NAMES
from kvcache._persist cimport Persisted
from kvcache._simd cimport simd_ops
from kvcache._status cimport check_status, raise_error
from kvcache.config import CacheConfig, check_fits_in_ram, reopened_config, usable_cores
from kvcache.errors import CacheClosedError

cnp.import_array()


cdef inline Rows _rows(cnp.ndarray k, cnp.ndarray v, int axis, int token_rank):
    """Keys and values arrays as native rows: the step is the stride of the
    token axis ``axis`` in an array of rank ``token_rank``; a single token
    (lower rank) has none, and its step is never used."""
    cdef Rows r
    r.k = <char *>cnp.PyArray_DATA(k)
    r.v = <char *>cnp.PyArray_DATA(v)
    r.k_step = cnp.PyArray_STRIDE(k, axis) if cnp.PyArray_NDIM(k) == token_rank else 0
    r.v_step = cnp.PyArray_STRIDE(v, axis) if cnp.PyArray_NDIM(v) == token_rank else 0
    return r


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
    cdef object cold        # ColdStore, or None while every position is in RAM and no view was asked
    cdef Persisted persisted  # persist: the directory's index; else None
    cdef object index_lock  # serialises flush and close (the index's writers)
    cdef Py_ssize_t n_layers, n_heads, head_dim

    def __init__(self, config=None, *, _index=None, **kwargs):
        if config is None:
            config = CacheConfig(**kwargs)
        elif kwargs:
            raise TypeError("TieredKVCache: pass either a CacheConfig or its keywords, not both")
        elif not isinstance(config, CacheConfig):
            raise TypeError(f"TieredKVCache: expected a CacheConfig, got {type(config).__name__}")
        self.config = config
        self.index_lock = threading.Lock()
        self.n_layers = config.n_layers
        self.n_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        arena = 2 * config.n_layers * config.hot_capacity * config.row_bytes
        if config.prefault:
            check_fits_in_ram(arena)
        self.hot = HotTier(config, prefault=config.prefault,
                           threads=config.threads if config.threads is not None else usable_cores())
        if config.persist:
            self.persisted = Persisted(config, self.hot)
        if _index is not None:
            self._restore(_index)
        elif config.tiered or config.persist or config.cold_dir is not None:
            self._cold_store()
            if config.persist:
                # an empty index at once: a process lost before its first
                # flush leaves a directory open() reopens (empty), not a stray one
                self.flush()

    cdef object _cold_store(self):
        if self.cold is None:
            store = ColdStore(self.config, existing=False)  # releases the GIL: threads may race here
            if self.cold is None:
                self.cold = store
                self.hot.attach_cold(store)
            else:
                store.close()
        return self.cold

    def _restore(self, index):
        self.cold = ColdStore(self.config, existing=True)
        self.hot.attach_cold(self.cold)
        self.persisted.restore(self.cold, index)

    @classmethod
    def open(cls, cold_dir, **overrides):
        """Reopen a cache persisted in ``cold_dir`` (see ``persist`` and :meth:`flush`).

        Every position flushed before is there, byte-exact.  The blocks that
        never leave RAM (the sink blocks; every block when the whole context
        fits) are read back and verified at once; the rest refill RAM lazily,
        as they are read or stored.

        Parameters
        ----------
        cold_dir : str or os.PathLike
        **overrides
            CacheConfig fields to change (``hot_tokens``, ``eviction_policy``,
            ``threads``, ``max_seq_len``, the hot ``dtype``...).  The fields
            that define the files (``n_layers``, ``n_kv_heads``, ``head_dim``,
            ``block_tokens``, and the cold tier's dtype) may be given only
            with the stored values.

        Raises
        ------
        FileNotFoundError
            If ``cold_dir`` does not exist or holds no persisted cache.
        NotADirectoryError
            If ``cold_dir`` is a file.
        TypeError
            If ``cold_dir`` is not a path, or an override is not a CacheConfig
            field.
        ValueError
            If an override contradicts the stored files, is invalid, or is
            ``persist=False``.
        CorruptionError
            If the index or a file header is damaged, or a file is shorter
            than the index says.
        """
        if not isinstance(cold_dir, (str, os.PathLike)):
            raise TypeError(f"TieredKVCache.open: cold_dir expected a path, got {type(cold_dir).__name__}")
        index = read_index(cold_dir)
        return cls(reopened_config(index, cold_dir, overrides), _index=index)

    # -- lifetime ---------------------------------------------------------
    def close(self):
        """Free the cache's memory and its scratch files.  Idempotent; waits for
        stores and gets in flight.  With ``persist=True`` it flushes first."""
        with self.index_lock:  # a racing close() returns once this one is done
            if self.hot is None:
                return
            try:
                if self.config.persist and not self.hot.closed:
                    self.persisted.write(self.cold, True)
            finally:  # both idempotent
                self.hot.close()
                if self.cold is not None:
                    self.cold.close()

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

    def _path_of(self, layer, kind):
        """The path of a layer's keys (0) or values (1) file, or None without a cold tier."""
        return None if self.cold is None else os.path.join(self.cold.path, file_name(layer, kind))

    cdef int _fail(self, const kvc_error *rec, str op, Py_ssize_t start=-1) except -1:
        """Raise what a failed native call's record says (see kvcache._status)."""
        return raise_error(rec, op, self._path_of, self.config.block_tokens, start)

    # -- stores -----------------------------------------------------------
    cdef int _store(self, object layer, object keys, object values, bint batch) except -1:
        self._check_open()
        cdef Py_ssize_t l = self._layer(layer)
        cdef cnp.ndarray k = as_array(keys, "keys", False, True)
        cdef cnp.ndarray v = as_array(values, "values", False, True)
        cdef int kind = same_kind(k, v)
        cdef Py_ssize_t n = check_rows(k, "keys", 3, self.n_heads, self.head_dim, not batch)
        cdef Py_ssize_t nv = check_rows(v, "values", 3, self.n_heads, self.head_dim, not batch)
        check_tokens(n, nv)
        k, v = unaliased(self.hot, k), unaliased(self.hot, v)
        cdef Rows src = _rows(k, v, 0, 3)
        cdef kvc_error rec
        cdef int status
        kvc_error_clear(&rec)
        with nogil:
            status = self.hot.append(l, kind, n, src, &rec)
        if status != KVC_OK:
            self._fail(&rec, "store")
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
        cdef cnp.ndarray k = as_array(keys, "keys", False, True)
        cdef cnp.ndarray v = as_array(values, "values", False, True)
        cdef int kind = same_kind(k, v)
        check_rows(k, "keys", 4, self.n_heads, self.head_dim)
        check_rows(v, "values", 4, self.n_heads, self.head_dim)
        if k.shape[0] != self.n_layers or v.shape[0] != self.n_layers:
            raise ValueError(f"keys/values: expected {self.n_layers} layers on axis 0, "
                             f"got {k.shape[0]} and {v.shape[0]}")
        cdef Py_ssize_t n = k.shape[1]
        check_tokens(n, v.shape[1])
        k, v = unaliased(self.hot, k), unaliased(self.hot, v)
        cdef Rows src = _rows(k, v, 1, 4)
        cdef Py_ssize_t k_layer_step = cnp.PyArray_STRIDE(k, 0), v_layer_step = cnp.PyArray_STRIDE(v, 0)
        cdef kvc_error rec
        cdef int status
        kvc_error_clear(&rec)
        with nogil:
            status = self.hot.append_all(kind, n, src, k_layer_step, v_layer_step, &rec)
        if status != KVC_OK:
            self._fail(&rec, "store")

    # -- reads ------------------------------------------------------------
    def get(self, layer, start=0, stop=None, out=None, copy=True, raw=False):
        """Return one layer's keys and values for positions ``start:stop``.

        Positions come back in order and byte-exact whichever tier holds them.
        A cold block is checked against its CRC32C the first time it is read
        after being written (or after a reopen).

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
        copy : bool
            ``False`` returns read-only zero-copy views instead of copies: of
            the RAM arenas while every position fits there (``hot_tokens=None``),
            else of the cold tier's memory-mapped files (positions still only in
            RAM are first written to them, without fsync).  A view keeps its
            memory alive: it stays valid after :meth:`close` and for as long as
            it is referenced, and shows the stored positions until they are
            truncated and stored again.  Views show the stored representation
            of the tier they view: other than float32, they need ``raw=True``.
            A bool: anything else raises ``TypeError``.
        raw : bool
            Return the stored representation instead of float32 (both tiers
            must store the same dtype): float16 arrays, ``ml_dtypes.bfloat16``
            arrays, or for int8 a pair ``(values int8 [n, n_kv_heads, head_dim],
            scales float32 [n, n_kv_heads])`` for keys and one for values.

        Returns
        -------
        keys, values : numpy.ndarray
            ``[stop - start, n_kv_heads, head_dim]`` float32, in position order
            (converted from the stored dtype by the SIMD header), or see ``raw``.

        Raises
        ------
        TypeError
            A layer, ``start`` or ``stop`` that is not an int (or None), a
            ``copy`` or ``raw`` that is not a bool, an ``out`` that is not a
            pair of float32 arrays.
        IndexError
            A layer, ``start`` or ``stop`` outside what is stored.
        ValueError
            ``start > stop``; an ``out`` of the wrong shape, read-only,
            overlapping or not C-contiguous in its last two dimensions;
            ``out`` with ``raw`` or ``copy=False``; ``raw`` with two stored
            dtypes; ``copy=False`` of a reduced dtype without ``raw``.
        CorruptionError
            If a cold block fails its checksum (the message names file and block).
        ColdStoreError
            If ``copy=False`` cannot write the files.
        """
        self._check_open()
        cdef Py_ssize_t l = self._layer(layer)
        check_flag("copy", copy)
        check_flag("raw", raw)
        cdef Py_ssize_t length = self._length(l)
        cdef Py_ssize_t a = position("start", start, length, 0)
        cdef Py_ssize_t b = position("stop", stop, length, length)
        if a > b:
            raise ValueError(f"get: expected start <= stop, got start={a} > stop={b}")
        cdef Py_ssize_t n = b - a
        cdef cnp.ndarray ko, vo
        cdef cnp.npy_intp dims[3]
        cdef int status
        cdef kvc_error rec
        cdef Rows dst
        c = self.config
        if raw and copy and c.dtype != c.cold_format:
            raise ValueError(f"get(raw=True): the hot tier stores {c.dtype} and the cold tier "
                             f"{c.cold_format}; raw reads need one stored dtype")
        if (raw or not copy) and out is not None:
            raise ValueError("get: out= takes float32 copies; it excludes raw=True and copy=False")
        if not copy:
            shown = c.cold_format if c.tiered else c.dtype
            if shown != "float32" and not raw:
                raise ValueError(f"get(copy=False): views show the stored {shown}; pass raw=True")
            return self._views(l, a, b)
        if raw and c.dtype != "float32":
            return self._read_raw(l, a, b)
        if out is None:
            dims[0] = n
            dims[1] = self.n_heads
            dims[2] = self.head_dim
            ko = cnp.PyArray_EMPTY(3, dims, cnp.NPY_FLOAT32, 0)
            vo = cnp.PyArray_EMPTY(3, dims, cnp.NPY_FLOAT32, 0)
        else:
            ko, vo = check_out(out, n, self.n_heads, self.head_dim)
        if n == 0:
            return (ko, vo) if out is None else out
        dst = _rows(ko, vo, 0, 3)
        kvc_error_clear(&rec)
        with nogil:
            status = self.hot.read(l, FMT_F32, a, b, dst, &rec)
        if status != KVC_OK:
            self._fail(&rec, "get", a)
        return (ko, vo) if out is None else out

    cdef tuple _views(self, Py_ssize_t l, Py_ssize_t a, Py_ssize_t b):
        """Views of the stored rows: of the RAM arenas while every position fits
        there, else of the cold files (rows only in RAM written there first)."""
        rows = self.hot.arena_views(l, a, b)
        if rows is not None:
            return (unpack_rows(rows[0], self.config.dtype, self.n_heads, self.head_dim),
                    unpack_rows(rows[1], self.config.dtype, self.n_heads, self.head_dim))
        cold = self._cold_store()
        cdef int status
        cdef kvc_error rec
        kvc_error_clear(&rec)
        with nogil:
            status = self.hot.write_back_range(l, a, b, True, &rec)
        if status != KVC_OK:
            self._fail(&rec, "view", a)
        self.hot.account_view(l, a, b)
        fmt = self.config.cold_format
        return (unpack_rows(cold.view(l, 0, a, b), fmt, self.n_heads, self.head_dim),
                unpack_rows(cold.view(l, 1, a, b), fmt, self.n_heads, self.head_dim))

    cdef tuple _read_raw(self, Py_ssize_t l, Py_ssize_t a, Py_ssize_t b):
        cdef Py_ssize_t rb = self.config.row_bytes
        cdef cnp.ndarray kb = np.empty((b - a, rb), np.uint8)
        cdef cnp.ndarray vb = np.empty((b - a, rb), np.uint8)
        cdef int kind = DTYPES[self.config.dtype].code
        cdef int status = KVC_OK
        cdef kvc_error rec
        cdef Rows dst = _rows(kb, vb, 0, 2)
        kvc_error_clear(&rec)
        if b > a:
            with nogil:
                status = self.hot.read(l, kind, a, b, dst, &rec)
        if status != KVC_OK:
            self._fail(&rec, "get", a)
        fmt = self.config.dtype
        return (unpack_rows(kb, fmt, self.n_heads, self.head_dim),
                unpack_rows(vb, fmt, self.n_heads, self.head_dim))

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
        if n < 0:  # closed (or being closed) by another thread since the caller's check
            check_status(KVC_E_CLOSED)
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
        cdef kvc_error rec
        kvc_error_clear(&rec)
        with nogil:
            status = self.hot.truncate(m, &rec)
        if status != KVC_OK:
            self._fail(&rec, "truncate")

        if self.config.persist and self.persisted.covers(m):
            self.flush()  # the index must not promise rows that stores will now overwrite

    def reset(self):
        """Forget every position (statistics are kept; they count the cache's lifetime)."""
        self.truncate(0)

    def flush(self):
        """Make every position stored so far durable (``persist=True`` only).

        Writes the blocks still only in RAM to the cold files, fsyncs them,
        then atomically replaces the index (written to a temporary file,
        fsync'd, renamed, directory fsync'd).  A crash at any moment leaves
        either the previous flush or this one.

        Raises
        ------
        ValueError
            If the cache was not created with ``persist=True``.
        ColdStoreError
            If the files cannot be written or synced.
        """
        self._check_open()
        if not self.config.persist:
            raise ValueError("flush: this cache was created with persist=False; nothing is kept")
        with self.index_lock:  # one index writer at a time (flush, close)
            self.persisted.write(self.cold, False)

    def update_scores(self, layer, attn):
        """Add attention weights to the "h2o" policy's per-position scores.

        Parameters
        ----------
        layer : int
        attn : array_like
            float32 ``[n_heads, n_queries, n_positions]`` attention weights
            (summed over heads and queries, in the SIMD header) or an
            already reduced ``[n_positions]``; position p of the layer gets
            column p.  ``n_positions`` may not exceed ``layer_len(layer)``.
            With another policy it is accepted and has no effect.
        """
        self._check_open()
        cdef Py_ssize_t l = self._layer(layer)
        a = np.asarray(attn) if not isinstance(attn, np.ndarray) else attn
        if a.dtype != np.float32:
            raise TypeError(f"attn: expected dtype float32, got {a.dtype}")
        if a.ndim not in (1, 3):
            raise ValueError(f"attn: expected shape [n_heads, n_queries, n_positions] or "
                             f"[n_positions], got {list(a.shape)}")
        cdef Py_ssize_t n = a.shape[a.ndim - 1]
        if n > self._length(l):
            raise ValueError(f"attn: expected at most {self._length(l)} positions (layer {l} holds "
                             f"that many), got {n}")
        if a.ndim == 3 and a.shape[0] * a.shape[1] == 0 or n == 0:
            return
        rows = np.ascontiguousarray(a.reshape(-1, n))
        cdef float[::1] acc = np.zeros(n, np.float32)
        cdef const float[:, ::1] r = rows
        cdef int status
        cdef kvc_error rec
        kvc_error_clear(&rec)
        with nogil:
            simd_ops().add_rows(&acc[0], &r[0, 0], <size_t>r.shape[0], <size_t>n, <size_t>n)
            status = self.hot.add_scores(l, &acc[0], n, &rec)
        if status != KVC_OK:
            self._fail(&rec, "scores", 0)

    def _hot_tier(self):
        """Test hook: the HotTier behind this cache."""
        return self.hot

    def _whole_arenas(self, layer):
        """Integrations: writable uint8 views of all the rows of a layer's arenas
        (keys, values) while every position stays in RAM, else None; tensor
        libraries refuse read-only memory.  Never write through them; rows past
        ``layer_len(layer)`` hold nothing meaningful."""
        self._check_open()
        return self.hot.whole_arenas(self._layer(layer))

    def _cold_dir(self):
        """Test hook: the cold tier's directory, or None while there is none."""
        return None if self.cold is None else self.cold.path

    # -- accounting -------------------------------------------------------
    def stats(self):
        """Counters since creation, as a dict of ints.

        ``tokens_stored`` / ``tokens_read`` count token rows summed over layers
        (a ``store_layers`` of T tokens adds ``n_layers * T``); ``bytes_*``
        count key and value bytes; ``hot_hits`` / ``cold_hits`` split the rows
        read by the tier holding them when the read found them (a cold block
        that a read promotes to RAM counts as cold); ``evictions`` / ``promotions``
        count rows moved out of / back into RAM (``eviction_blocks`` /
        ``promotion_blocks`` the blocks); ``bytes_to_cold`` /
        ``bytes_from_cold`` the token bytes written to / copied out of the
        cold files; ``cold_bytes_on_disk`` the token bytes the cold files hold
        for stored positions.  Each counter is exact; a snapshot taken while
        other threads store is not a single instant.
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
        from kvcache.config import MAX_THREADS, _positive_int
        self._check_open()
        self.hot.threads = _positive_int("threads", value, high=MAX_THREADS)
