"""The hot tier: per-layer slots in RAM, block tables, locks, and the calls into the copy loops.

Owns: each layer's arenas (``n_slots`` blocks of ``block_tokens`` rows), its
block table (per block: which slot holds it, how many of its rows the cold
files hold, their CRC32C), its length and lock; taking the locks around the
copy loops of kvcache._copy (one layer, or every layer on the thread pool,
all or nothing); truncation; seal and restore of a persisted layer; views
of the arenas; the statistics counters.  When every position fits in RAM (``tiered``
false), block b lives in slot b for good and nothing goes cold.  Otherwise
a store that needs a slot takes a free one or evicts the policy's victim
(kvcache._moves): one block of writes, only when a new block starts.
Must not touch: file layouts (kvcache._format), files (kvcache._cold),
victim choice (kvcache._policy), bytes outside kvcache._copy's loops.

All state of a layer is guarded by that layer's mutex; the GIL is never held
while a lock is taken, a byte is copied or a file is written.  Native
methods return a ``kvc_status`` and fill the caller's ``kvc_error`` record
where the failure happens; kvcache._status.raise_error turns it into an
exception.
"""
from libc.stdint cimport int32_t, uint64_t, UINT64_MAX
from libc.stdlib cimport calloc, free
from cpython.pyport cimport PY_SSIZE_T_MAX

from kvcache._ckvc cimport (
    KVC_OK, KVC_E_NOMEM, KVC_E_FULL, KVC_E_CLOSED, KVC_E_RANGE, KVC_E_CORRUPT,
    KVC_STAT_TOKENS_STORED, KVC_STAT_BYTES_STORED, KVC_STAT_TOKENS_READ,
    KVC_STAT_BYTES_READ, KVC_STAT_HOT_HITS, KVC_STAT_COLD_HITS, KVC_STAT_EVICTIONS,
    KVC_STAT_EVICTION_BLOCKS, KVC_STAT_PROMOTIONS, KVC_STAT_PROMOTION_BLOCKS,
    KVC_STAT_BYTES_TO_COLD, KVC_STAT_BYTES_FROM_COLD, KVC_STAT_COLD_BYTES, KVC_STAT_ROWS_HELD,
    kvc_error, kvc_error_clear, kvc_fail, kvc_pool_run, kvc_prefault,
    kvc_stats_new, kvc_stats_free, kvc_stats_add, kvc_stats_sub, kvc_stats_get,
    kvc_lock_init, kvc_lock_destroy, kvc_lock_acquire, kvc_lock_release,
)
from kvcache._arena cimport Arena, WritableArena
from kvcache._codec cimport RowFmt, Rows, convert_pair, row_format
from kvcache._codec import DTYPES
from kvcache._cold cimport ColdFiles, layer_files
from kvcache._copy cimport (
    AppendCheck, AppendJob, append_locked, append_task, check_room, close_layer, cold_fits, cut, moves_blocks, read_locked,
)
from kvcache._format cimport row_offset
from kvcache._moves cimport load_block, write_back_blocks
from kvcache._policy cimport POLICY_H2O, Block
from kvcache._policy import POLICIES
from kvcache._simd cimport simd_ops
from kvcache._status cimport check_status
from kvcache._tier cimport slot_rows

cdef enum:
    # store_layers calls moving fewer bytes than this copy on the calling thread:
    # waking a thread team costs more than it saves on a decode step (256 KiB at
    # 32 x 8 x 128), and stalls badly when the cores are busy with other work.
    PARALLEL_MIN_BYTES = 1 << 20

STAT_NAMES = {
    "tokens_stored": KVC_STAT_TOKENS_STORED,
    "bytes_stored": KVC_STAT_BYTES_STORED,
    "tokens_read": KVC_STAT_TOKENS_READ,
    "bytes_read": KVC_STAT_BYTES_READ,
    "hot_hits": KVC_STAT_HOT_HITS,
    "cold_hits": KVC_STAT_COLD_HITS,
    "evictions": KVC_STAT_EVICTIONS,
    "eviction_blocks": KVC_STAT_EVICTION_BLOCKS,
    "promotions": KVC_STAT_PROMOTIONS,
    "promotion_blocks": KVC_STAT_PROMOTION_BLOCKS,
    "bytes_to_cold": KVC_STAT_BYTES_TO_COLD,
    "bytes_from_cold": KVC_STAT_BYTES_FROM_COLD,
    "cold_bytes_on_disk": KVC_STAT_COLD_BYTES,
}


cdef inline bint _meets(const char *lo, const char *hi, const char *base, size_t n) noexcept nogil:
    return base != NULL and lo < base + n and base < hi


cdef int read_layer(Tier *t, Py_ssize_t layer, int kind, Py_ssize_t start, Py_ssize_t stop, Rows dst,
                    kvc_error *e, bint may_promote=True) noexcept nogil:
    """HotTier.read of the tier ``t`` (kvcache._blocks reads every layer on the
    pool, without promoting: saving a prefix leaves the cache's tiers as they are)."""
    cdef HotLayer *L = &t.layers[layer]
    cdef Py_ssize_t hot = 0, cold = 0
    cdef int status = KVC_OK
    cdef RowFmt out = row_format(kind, t.hot_fmt.n_heads, t.hot_fmt.head_dim)
    kvc_lock_acquire(&L.lock)
    if L.keys == NULL:
        status = kvc_fail(e, KVC_E_CLOSED, layer, -1)
    elif stop > L.length:
        status = kvc_fail(e, KVC_E_RANGE, layer, -1)
        e.held, e.asked = L.length, stop
    elif not t.tiered:  # one arena, block b in slot b: a single pass
        status = convert_pair(t.ops, False, &t.hot_fmt, slot_rows(t, L, 0, start), &out,
                              dst, stop - start)
        hot = stop - start
    else:
        status = read_locked(t, L, &out, start, stop, dst, e, &hot, &cold, may_promote)
    kvc_lock_release(&L.lock)
    if status == KVC_OK:
        kvc_stats_add(t.stats, KVC_STAT_TOKENS_READ, stop - start)
        kvc_stats_add(t.stats, KVC_STAT_BYTES_READ, 2 * (stop - start) * out.row_bytes)
        kvc_stats_add(t.stats, KVC_STAT_HOT_HITS, hot)
        kvc_stats_add(t.stats, KVC_STAT_COLD_HITS, cold)
    return status


cdef class HotTier:
    """The block-organised RAM arenas of every layer, and their cold tier.

    Parameters
    ----------
    config : CacheConfig
    prefault, threads
        As in the config (threads resolved to a number).
    """

    def __cinit__(self, config, bint prefault=True, int threads=1):
        cdef Py_ssize_t l, s
        cdef size_t arena
        cdef HotLayer *L
        # Sizes are multiplied as Python ints: a C product could wrap around
        # and make a small arena that later stores would overrun.
        capacity = config.hot_slots * config.block_tokens
        if 2 * config.n_layers * capacity * config.row_bytes > PY_SSIZE_T_MAX // 2:
            raise MemoryError(f"a hot tier of {config.n_layers} x {capacity} x "
                              f"{config.n_kv_heads * config.head_dim} floats is larger than this "
                              f"machine can address")
        policy = POLICIES[config.eviction_policy]
        self.t.n_layers = config.n_layers
        self.t.hot_fmt = row_format(DTYPES[config.dtype].code, config.n_kv_heads, config.head_dim)
        self.t.cold_fmt = row_format(DTYPES[config.cold_format].code, config.n_kv_heads, config.head_dim)
        self.t.row_bytes = self.t.hot_fmt.row_bytes
        self.t.block_tokens = config.block_tokens
        self.t.n_blocks = config.n_blocks
        self.t.n_slots = config.hot_slots
        self.t.capacity = self.t.n_slots * self.t.block_tokens
        self.t.max_len = config.max_seq_len
        self.t.tiered = config.tiered
        self.t.persist = config.persist
        self.t.cold_limit = UINT64_MAX if config.max_cold_bytes is None else config.max_cold_bytes
        self.t.policy.kind = policy.code
        self.t.policy.promote = config.promote_on_read and policy.promotes and config.tiered
        self.t.policy.block_tokens = self.t.block_tokens
        self.t.policy.sink_blocks = config.sink_blocks
        self.t.policy.recent = config.recent_window
        self.t.policy.w_recency = config.adaptive_recency_weight
        self.t.policy.w_frequency = config.adaptive_frequency_weight
        self.threads = threads
        self.t.ops = simd_ops()
        self.t.stats = kvc_stats_new()
        self.t.layers = <HotLayer *>calloc(self.t.n_layers, sizeof(HotLayer))
        if self.t.stats == NULL or self.t.layers == NULL:
            raise MemoryError("cannot allocate the hot tier's bookkeeping")
        for l in range(self.t.n_layers):
            L = &self.t.layers[l]
            L.index = l
            L.cold.fd_k = L.cold.fd_v = -1
            if kvc_lock_init(&L.lock) != 0:
                raise MemoryError("cannot create a layer lock")
            self.n_locks += 1
        arena = <size_t>self.t.capacity * <size_t>self.t.row_bytes
        self.arenas = [Arena(arena) for _ in range(2 * self.t.n_layers)]
        for l in range(self.t.n_layers):
            L = &self.t.layers[l]
            L.keys = (<Arena>self.arenas[2 * l]).ptr
            L.values = (<Arena>self.arenas[2 * l + 1]).ptr
            L.blocks = <Block *>calloc(self.t.n_blocks, sizeof(Block))
            L.owner = <int32_t *>calloc(self.t.n_slots, sizeof(int32_t))
            if self.t.policy.kind == POLICY_H2O:
                L.scores = <float *>calloc(self.t.n_blocks * self.t.block_tokens, sizeof(float))
            if (L.blocks == NULL or L.owner == NULL
                    or (self.t.policy.kind == POLICY_H2O and L.scores == NULL)):
                self._free_arenas()
                check_status(KVC_E_NOMEM, f"cannot allocate 2 x {self.t.n_layers} arenas of {arena} bytes")
            for s in range(self.t.n_blocks):
                L.blocks[s].slot = -1 if self.t.tiered else s  # all in RAM: block b in slot b for good
            for s in range(self.t.n_slots):
                L.owner[s] = -1 if self.t.tiered else s
        if prefault:
            with nogil:
                for l in range(self.t.n_layers):
                    kvc_prefault(self.t.layers[l].keys, arena)
                    kvc_prefault(self.t.layers[l].values, arena)

    def __dealloc__(self):
        cdef Py_ssize_t l
        if self.t.layers != NULL:
            self._free_arenas()
            for l in range(self.n_locks):
                kvc_lock_destroy(&self.t.layers[l].lock)
            free(self.t.layers)
            self.t.layers = NULL
        if self.t.stats != NULL:
            kvc_stats_free(self.t.stats)
            self.t.stats = NULL

    cdef bint overlaps(self, const char *lo, const char *hi) noexcept nogil:
        """True if bytes [lo, hi) meet a layer's arena or cold mapping: an input
        viewing the cache's own memory (from ``get(copy=False)``), which a store
        could overwrite before it has read it all."""
        cdef Py_ssize_t l
        cdef size_t arena = self.t.capacity * self.t.row_bytes
        cdef size_t mapped = row_offset(self.t.n_blocks * self.t.block_tokens, self.t.cold_fmt.row_bytes)
        cdef HotLayer *L
        for l in range(self.t.n_layers):
            L = &self.t.layers[l]
            if (_meets(lo, hi, L.keys, arena) or _meets(lo, hi, L.values, arena)
                    or _meets(lo, hi, L.cold.map_k, mapped) or _meets(lo, hi, L.cold.map_v, mapped)):
                return True
        return False

    cdef void _free_arenas(self) noexcept:
        """Free the block tables (the Arena objects go with their references)."""
        cdef Py_ssize_t l
        for l in range(self.t.n_layers):
            free(self.t.layers[l].blocks)
            free(self.t.layers[l].owner)
            free(self.t.layers[l].scores)
            self.t.layers[l].keys = self.t.layers[l].values = NULL
            self.t.layers[l].blocks = NULL
            self.t.layers[l].owner = NULL
            self.t.layers[l].scores = NULL

    def attach_cold(self, store):
        """Give every layer its cold files (a ColdStore)."""
        cdef Py_ssize_t l
        cdef ColdFiles f
        for l in range(self.t.n_layers):
            f = layer_files(store, l)
            with nogil:
                kvc_lock_acquire(&self.t.layers[l].lock)
                self.t.layers[l].cold = f
                kvc_lock_release(&self.t.layers[l].lock)

    def close(self):
        """Free the arenas (idempotent).  Waits for copies in flight to end."""
        cdef Py_ssize_t l
        cdef HotLayer *L
        if self.closed:
            return
        self.closed = True
        with nogil:
            for l in range(self.t.n_layers):
                L = &self.t.layers[l]
                kvc_lock_acquire(&L.lock)
                close_layer(L)
                kvc_lock_release(&L.lock)
        self.arenas = None  # freed now, or when the last view of them goes

    @property
    def n_layers(self):
        return self.t.n_layers

    @property
    def capacity(self):
        """Positions per layer the RAM arenas hold."""
        return self.t.capacity

    @property
    def row_bytes(self):
        return self.t.row_bytes

    @property
    def nbytes(self):
        return 0 if self.closed else 2 * self.t.n_layers * self.t.capacity * self.t.row_bytes

    def stat(self, str name):
        return kvc_stats_get(self.t.stats, STAT_NAMES[name])

    # -- stores --------------------------------------------------------------
    cdef int append(self, Py_ssize_t layer, int kind, Py_ssize_t n, Rows src, kvc_error *e) noexcept nogil:
        """Append n rows of format ``kind`` (FMT_*) to one layer."""
        cdef HotLayer *L = &self.t.layers[layer]
        cdef int status
        cdef uint64_t need = 0
        cdef RowFmt fmt = row_format(kind, self.t.hot_fmt.n_heads, self.t.hot_fmt.head_dim)
        kvc_lock_acquire(&L.lock)
        status = check_room(&self.t, L, n, &need, e)
        if status == KVC_OK:
            status = cold_fits(&self.t, need, layer, e)
        if status == KVC_OK:
            status = append_locked(&self.t, L, &fmt, n, src, e)
        kvc_lock_release(&L.lock)
        return status

    cdef int append_all(self, int kind, Py_ssize_t n, Rows src, Py_ssize_t k_layer_step,
                        Py_ssize_t v_layer_step, kvc_error *e, AppendCheck *check=NULL) noexcept nogil:
        """Append n rows of format ``kind`` to every layer (layer l's rows
        ``l * k_layer_step`` / ``l * v_layer_step`` bytes after ``src``): all
        layers or none (every lock held), and with ``check`` only if its
        verify accepts the source's checksums (see kvcache._copy.AppendCheck)."""
        cdef Py_ssize_t l
        cdef int status = KVC_OK
        cdef int threads = self.threads
        cdef uint64_t need = 0
        cdef AppendJob job
        cdef kvc_error one
        cdef RowFmt fmt = row_format(kind, self.t.hot_fmt.n_heads, self.t.hot_fmt.head_dim)
        cdef Py_ssize_t *old = <Py_ssize_t *>calloc(self.t.n_layers, sizeof(Py_ssize_t))
        job.status = <int *>calloc(self.t.n_layers, sizeof(int))
        job.errors = <kvc_error *>calloc(self.t.n_layers, sizeof(kvc_error))
        if old == NULL or job.status == NULL or job.errors == NULL:
            free(old)
            free(job.status)
            free(job.errors)
            return kvc_fail(e, KVC_E_NOMEM, -1, -1)
        for l in range(self.t.n_layers):  # ascending order: no deadlock with other lockers
            kvc_lock_acquire(&self.t.layers[l].lock)
            kvc_error_clear(&job.errors[l])
        for l in range(self.t.n_layers):  # a full cache names its fullest layer
            old[l] = self.t.layers[l].length
            kvc_error_clear(&one)
            if check_room(&self.t, &self.t.layers[l], n, &need, &one) != KVC_OK and (
                    status == KVC_OK or (one.code == KVC_E_FULL and e.code == KVC_E_FULL and one.held > e.held)):
                status = one.code
                e[0] = one
        if status == KVC_OK:
            status = cold_fits(&self.t, need, -1, e)
        if status == KVC_OK:
            job.tier = &self.t
            job.fmt = &fmt
            job.n = n
            job.src = src
            job.k_layer_step, job.v_layer_step = k_layer_step, v_layer_step
            job.check = check
            if 2 * n * self.t.n_layers * self.t.row_bytes < PARALLEL_MIN_BYTES and not moves_blocks(&self.t, n):
                threads = 1
            self.last_threads = kvc_pool_run(threads, self.t.n_layers, append_task, &job)
            for l in range(self.t.n_layers):
                if job.status[l] != KVC_OK:
                    status = job.status[l]
                    e[0] = job.errors[l]  # the first failing layer's own record
                    break
            if status == KVC_OK and check != NULL and not check.verify(check.ctx, check.crcs):
                status = kvc_fail(e, KVC_E_CORRUPT, -1, -1)
            if status != KVC_OK:  # undo the layers that succeeded
                for l in range(self.t.n_layers):
                    if self.t.layers[l].length != old[l]:
                        kvc_stats_sub(self.t.stats, KVC_STAT_TOKENS_STORED, n)
                        kvc_stats_sub(self.t.stats, KVC_STAT_BYTES_STORED, 2 * n * self.t.row_bytes)
                        cut(&self.t, &self.t.layers[l], old[l], self.t.layers[l].length)
        for l in range(self.t.n_layers):
            kvc_lock_release(&self.t.layers[l].lock)
        free(old)
        free(job.status)
        free(job.errors)
        return status

    # -- reads ---------------------------------------------------------------
    cdef int read(self, Py_ssize_t layer, int kind, Py_ssize_t start, Py_ssize_t stop, Rows dst,
                  kvc_error *e) noexcept nogil:
        """Copy rows [start, stop) of a layer out, as format ``kind`` (FMT_F32, or
        the stored format when both tiers share it).

        A row counts as a cold hit when its block was cold as the read found
        it, also when the read promotes the block to serve it."""
        return read_layer(&self.t, layer, kind, start, stop, dst, e)

    cdef int write_back_range(self, Py_ssize_t layer, Py_ssize_t start, Py_ssize_t stop,
                              bint check, kvc_error *e) noexcept nogil:
        """Make the cold files hold positions [start, stop), for views and flush.

        With ``check``, blocks already cold are verified too (views hand out
        their bytes without another look).
        """
        cdef HotLayer *L = &self.t.layers[layer]
        cdef int status
        kvc_lock_acquire(&L.lock)
        if L.keys == NULL:
            status = kvc_fail(e, KVC_E_CLOSED, layer, -1)
        elif stop > L.length:
            status = kvc_fail(e, KVC_E_RANGE, layer, -1)
            e.held, e.asked = L.length, stop
        else:
            status = write_back_blocks(&self.t, L, start, stop, check, e)
        kvc_lock_release(&L.lock)
        return status

    def arena_views(self, Py_ssize_t layer, Py_ssize_t start, Py_ssize_t stop):
        """uint8 ``[n, row_bytes]`` views of rows [start, stop) of a layer's arenas,
        when every position is in RAM (block b in slot b), else None."""
        cdef HotLayer *L = &self.t.layers[layer]
        cdef int status = KVC_OK
        if self.t.tiered:
            return None
        with nogil:
            kvc_lock_acquire(&L.lock)
            status = KVC_E_CLOSED if L.keys == NULL else (KVC_E_RANGE if stop > L.length else KVC_OK)
            kvc_lock_release(&L.lock)
        if status == KVC_E_RANGE:
            check_status(status, f"get: positions {start}:{stop} of layer {layer} were truncated meanwhile")
        check_status(status)
        arenas = self.arenas
        if arenas is None:  # closed since the check
            check_status(KVC_E_CLOSED)
        import numpy as np
        out = []
        for kind in range(2):
            buf = arenas[2 * layer + kind]
            out.append(np.frombuffer(buf, dtype=np.uint8,
                                     count=(stop - start) * self.t.row_bytes,
                                     offset=start * self.t.row_bytes).reshape(stop - start, self.t.row_bytes))
        self.account_view(layer, start, stop)
        return out

    def whole_arenas(self, Py_ssize_t layer):
        """Writable uint8 ``[capacity, row_bytes]`` views of a layer's two arenas, every
        row (for integrations that slice them as the layer grows), or None when
        positions do not stay in place (a tiered cache).  Not counted in stats."""
        arenas = self.arenas
        if self.t.tiered or arenas is None:
            return None
        import numpy as np
        return [np.frombuffer(WritableArena(arenas[2 * layer + kind]), dtype=np.uint8
                              ).reshape(self.t.capacity, self.t.row_bytes) for kind in range(2)]

    def account_view(self, Py_ssize_t layer, Py_ssize_t start, Py_ssize_t stop):
        """Count rows handed out as views (hot_hits / cold_hits by tier)."""
        cdef HotLayer *L = &self.t.layers[layer]
        cdef Py_ssize_t pos = start, b, cnt, hot = 0, B = self.t.block_tokens
        cdef Py_ssize_t rb = self.t.cold_fmt.row_bytes if self.t.tiered else self.t.row_bytes
        with nogil:
            kvc_lock_acquire(&L.lock)
            L.tick += 1
            while pos < stop:
                b = pos // B
                cnt = min(B - (pos - b * B), stop - pos)
                L.blocks[b].last_use = L.tick
                L.blocks[b].hits += 1
                if L.blocks[b].slot >= 0:
                    hot += cnt
                pos += cnt
            kvc_lock_release(&L.lock)
        kvc_stats_add(self.t.stats, KVC_STAT_TOKENS_READ, stop - start)
        kvc_stats_add(self.t.stats, KVC_STAT_BYTES_READ, 2 * (stop - start) * rb)
        kvc_stats_add(self.t.stats, KVC_STAT_HOT_HITS, hot)
        kvc_stats_add(self.t.stats, KVC_STAT_COLD_HITS, stop - start - hot)
        kvc_stats_add(self.t.stats, KVC_STAT_BYTES_FROM_COLD, 2 * (stop - start - hot) * rb)

    cdef int add_scores(self, Py_ssize_t layer, const float *acc, Py_ssize_t n, kvc_error *e) noexcept nogil:
        """h2o: add attention mass ``acc[p]`` to positions 0..n-1 of a layer."""
        cdef HotLayer *L = &self.t.layers[layer]
        cdef Py_ssize_t p, b, B = self.t.block_tokens
        cdef double mass
        cdef int status = KVC_OK
        kvc_lock_acquire(&L.lock)
        if L.keys == NULL:
            status = kvc_fail(e, KVC_E_CLOSED, layer, -1)
        elif n > L.length:
            status = kvc_fail(e, KVC_E_RANGE, layer, -1)
            e.held, e.asked = L.length, n
        elif L.scores != NULL:
            self.t.ops.add_rows(L.scores, acc, 1, n, n)
            for b in range((n + B - 1) // B):
                mass = 0
                for p in range(b * B, min(n, b * B + B)):
                    mass += acc[p]
                L.blocks[b].mass += mass
        kvc_lock_release(&L.lock)
        return status

    cdef int truncate(self, Py_ssize_t n, kvc_error *e) noexcept nogil:
        """Cut every layer to ``n`` positions, all or none (every lock held)."""
        cdef Py_ssize_t l
        cdef int status = KVC_OK
        for l in range(self.t.n_layers):  # ascending order, like append_all
            kvc_lock_acquire(&self.t.layers[l].lock)
            if self.t.layers[l].keys == NULL:
                status = kvc_fail(e, KVC_E_CLOSED, l, -1)  # a layer already closed: cut none
        for l in range(self.t.n_layers):
            if status == KVC_OK and self.t.layers[l].length > n:
                cut(&self.t, &self.t.layers[l], n, self.t.layers[l].length)
            kvc_lock_release(&self.t.layers[l].lock)
        return status

    cdef Py_ssize_t length(self, Py_ssize_t layer) noexcept nogil:
        """Positions stored in ``layer``, or -1 once closed."""
        cdef Py_ssize_t n
        kvc_lock_acquire(&self.t.layers[layer].lock)
        n = self.t.layers[layer].length if self.t.layers[layer].keys != NULL else -1
        kvc_lock_release(&self.t.layers[layer].lock)
        return n

    # -- persistence and inspection (with the GIL; rare) ---------------------
    cdef tuple seal(self, Py_ssize_t layer, kvc_error *e):
        """Close one layer of a persisted cache: under its lock, write every
        position to the cold files, take its block table, then close it, so
        that no store can land between the last write and the close.

        Returns its (length, block table), which records what is on disk even
        when the write-back failed (then ``e`` says how); None if the layer
        was closed already.
        """
        cdef HotLayer *L = &self.t.layers[layer]
        table = None
        with nogil:
            kvc_lock_acquire(&L.lock)
        try:
            if L.keys == NULL:
                kvc_fail(e, KVC_E_CLOSED, layer, -1)
            else:
                with nogil:
                    write_back_blocks(&self.t, L, 0, L.length, False, e)
                table = self._table(L)
                close_layer(L)
        finally:
            kvc_lock_release(&L.lock)
        return table

    def block_table(self, Py_ssize_t layer):
        """(length, [(slot, disk_rows, crc_k, crc_v) per block up to the end])."""
        cdef HotLayer *L = &self.t.layers[layer]
        with nogil:
            kvc_lock_acquire(&L.lock)
        try:
            return self._table(L)
        finally:
            kvc_lock_release(&L.lock)

    cdef tuple _table(self, HotLayer *L):
        """block_table's work; the caller holds the layer's lock."""
        cdef Py_ssize_t b, n = L.length
        cdef list rows = []
        for b in range((n + self.t.block_tokens - 1) // self.t.block_tokens):
            rows.append((L.blocks[b].slot, L.blocks[b].disk_rows, L.blocks[b].crc_k, L.blocks[b].crc_v))
        return n, rows

    cdef int restore(self, Py_ssize_t layer, Py_ssize_t length, list disk_rows, list crc_k, list crc_v,
                     kvc_error *e) except -1:
        """Reopen: a layer's length and its blocks, cold but for the sinks (RAM
        refills lazily).  Returns a status (``e`` filled on failure); raises
        ValueError for a table that does not fit the config."""
        cdef HotLayer *L = &self.t.layers[layer]
        cdef Py_ssize_t b, total = 0
        if length > self.t.max_len or len(disk_rows) != (length + self.t.block_tokens - 1) // self.t.block_tokens:
            raise ValueError(f"layer {layer}: an index of {len(disk_rows)} blocks for {length} positions "
                             f"does not fit max_seq_len={self.t.max_len}")
        for b in range(len(disk_rows)):
            if disk_rows[b] != min(self.t.block_tokens, length - b * self.t.block_tokens):
                raise ValueError(f"layer {layer}: block {b} has {disk_rows[b]} rows on disk, "
                                 f"expected every stored position")
            L.blocks[b].disk_rows = disk_rows[b]
            L.blocks[b].crc_k = crc_k[b]
            L.blocks[b].crc_v = crc_v[b]
            if not self.t.tiered:  # everything lives in RAM: read it back now
                L.blocks[b].slot = -1
                L.owner[b] = -1
            total += disk_rows[b]
        L.length = length
        kvc_stats_add(self.t.stats, KVC_STAT_ROWS_HELD, length)
        kvc_stats_add(self.t.stats, KVC_STAT_COLD_BYTES, 2 * total * self.t.cold_fmt.row_bytes)
        cdef int status = KVC_OK
        # Blocks that never leave RAM come back now: everything when the whole
        # context fits, else the sink blocks.
        cdef Py_ssize_t eager = len(disk_rows) if not self.t.tiered else min(len(disk_rows),
                                                                              self.t.policy.sink_blocks)
        with nogil:
            kvc_lock_acquire(&L.lock)
            for b in range(eager):
                status = load_block(&self.t, L, b, length, e)
                if status != KVC_OK:
                    break
            kvc_lock_release(&L.lock)
        return status

    def _debug_arenas(self):
        """Test hook: per layer (keys address, values address, nonzero bytes past the end).

        The last item proves arenas start zeroed and that stores write only
        their own rows (meaningful while every position is in RAM).
        """
        cdef Py_ssize_t l, i, nz, end = self.t.capacity * self.t.row_bytes
        cdef HotLayer *L
        out = []
        for l in range(self.t.n_layers):
            L = &self.t.layers[l]
            with nogil:
                kvc_lock_acquire(&L.lock)
                nz = 0
                if L.keys != NULL:
                    for i in range(L.length * self.t.row_bytes, end):
                        nz += (L.keys[i] != 0) + (L.values[i] != 0)
                kvc_lock_release(&L.lock)
            out.append((<size_t>L.keys, <size_t>L.values, nz))
        return out

    def _debug_hot_blocks(self, Py_ssize_t layer):
        """Test hook: the sorted block numbers a layer holds in RAM."""
        cdef HotLayer *L = &self.t.layers[layer]
        return sorted(L.owner[s] for s in range(self.t.n_slots) if L.owner[s] >= 0)
