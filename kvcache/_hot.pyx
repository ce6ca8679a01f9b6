"""The hot tier: per-layer key/value arenas in RAM, filled without the GIL.

Every layer owns two 64-byte aligned arenas (keys, values) of ``capacity``
rows; a row is one token of one layer (``n_kv_heads * head_dim`` floats).
All state of a layer is guarded by that layer's mutex; the GIL is never held
while a lock is taken or a byte is copied.  Methods return ``kvc_status``
codes; ``kvcache._status.check_status`` turns them into exceptions.
"""
from kvcache._ckvc cimport (
    KVC_OK, KVC_E_NOMEM, KVC_E_FULL, KVC_E_CLOSED, KVC_E_RANGE,
    KVC_STAT_TOKENS_STORED, KVC_STAT_BYTES_STORED, KVC_STAT_TOKENS_READ,
    KVC_STAT_BYTES_READ, KVC_STAT_HOT_HITS, KVC_STAT_COLD_HITS, KVC_STAT_EVICTIONS,
    kvc_copy_fn, kvc_task_fn, kvc_pool_run, kvc_alloc, kvc_free, kvc_prefault, kvc_alloc_live_bytes, kvc_alloc_live_blocks,
    kvc_stats_new, kvc_stats_free, kvc_stats_add, kvc_stats_get,
    kvc_lock_init, kvc_lock_destroy, kvc_lock_acquire, kvc_lock_release,
)
from kvcache._simd cimport simd_ops
from kvcache._status cimport check_status
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdlib cimport calloc, free

cdef enum:
    ARENA_ALIGN = 64  # bytes: one cache line, and the widest vector (AVX-512)
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
}


def allocator_live():
    """(bytes, blocks) held by kvcache's aligned allocator in this process."""
    return kvc_alloc_live_bytes(), kvc_alloc_live_blocks()


cdef inline void copy_rows(kvc_copy_fn copy, char *dst, Py_ssize_t dst_step,
                           const char *src, Py_ssize_t src_step,
                           Py_ssize_t n, Py_ssize_t row_bytes, Py_ssize_t row_floats) noexcept nogil:
    cdef Py_ssize_t i
    if dst_step == row_bytes and src_step == row_bytes:
        copy(dst, src, <size_t>(n * row_floats))  # one long copy when both sides are dense
    else:
        for i in range(n):
            copy(dst + i * dst_step, src + i * src_step, <size_t>row_floats)


cdef struct AppendJob:
    # One store_layers call, shared by the pool threads: task l copies layer l.
    HotLayer *layers
    kvc_copy_fn copy_nt
    Py_ssize_t n, row_bytes, row_floats
    const char *k
    const char *v
    Py_ssize_t k_layer_step, k_step, v_layer_step, v_step


cdef void append_task(void *ctx, size_t l) noexcept nogil:
    cdef AppendJob *j = <AppendJob *>ctx
    cdef HotLayer *L = &j.layers[l]
    copy_rows(j.copy_nt, L.keys + L.length * j.row_bytes, j.row_bytes,
              j.k + <Py_ssize_t>l * j.k_layer_step, j.k_step, j.n, j.row_bytes, j.row_floats)
    copy_rows(j.copy_nt, L.values + L.length * j.row_bytes, j.row_bytes,
              j.v + <Py_ssize_t>l * j.v_layer_step, j.v_step, j.n, j.row_bytes, j.row_floats)


cdef class HotTier:
    """RAM arenas for ``n_layers`` layers of ``capacity`` rows of ``row_floats`` floats."""

    def __cinit__(self, n_layers, capacity, row_floats, bint prefault=True, int threads=1):
        cdef Py_ssize_t l
        cdef size_t arena
        # Sizes are multiplied as Python ints: a C product could wrap around
        # and make a small arena that later stores would overrun.
        if min(n_layers, capacity, row_floats) < 1:
            raise ValueError("HotTier sizes must be positive")
        if 2 * n_layers * capacity * row_floats * 4 > PY_SSIZE_T_MAX // 2:
            raise MemoryError(f"a hot tier of {n_layers} x {capacity} x {row_floats} floats "
                              f"is larger than this machine can address")
        self.n_layers = n_layers
        self.capacity = capacity
        self.row_floats = row_floats
        self.row_bytes = row_floats * 4
        self.threads = threads
        self.ops = simd_ops()
        self.stats = kvc_stats_new()
        self.layers = <HotLayer *>calloc(self.n_layers, sizeof(HotLayer))
        if self.stats == NULL or self.layers == NULL:
            raise MemoryError("cannot allocate the hot tier's bookkeeping")
        for l in range(self.n_layers):
            if kvc_lock_init(&self.layers[l].lock) != 0:
                raise MemoryError("cannot create a layer lock")
            self.n_locks += 1
        arena = <size_t>capacity * <size_t>self.row_bytes
        for l in range(self.n_layers):
            self.layers[l].keys = <char *>kvc_alloc(arena, ARENA_ALIGN)
            self.layers[l].values = <char *>kvc_alloc(arena, ARENA_ALIGN)
            if self.layers[l].keys == NULL or self.layers[l].values == NULL:
                self._free_arenas()
                check_status(KVC_E_NOMEM, f"cannot allocate 2 x {n_layers} arenas of {arena} bytes")
        if prefault:
            with nogil:
                for l in range(self.n_layers):
                    kvc_prefault(self.layers[l].keys, arena)
                    kvc_prefault(self.layers[l].values, arena)

    def __dealloc__(self):
        cdef Py_ssize_t l
        if self.layers != NULL:
            self._free_arenas()
            for l in range(self.n_locks):
                kvc_lock_destroy(&self.layers[l].lock)
            free(self.layers)
            self.layers = NULL
        if self.stats != NULL:
            kvc_stats_free(self.stats)
            self.stats = NULL

    cdef void _free_arenas(self) noexcept:
        cdef Py_ssize_t l
        for l in range(self.n_layers):
            kvc_free(self.layers[l].keys)
            kvc_free(self.layers[l].values)
            self.layers[l].keys = NULL
            self.layers[l].values = NULL

    def close(self):
        """Free the arenas (idempotent).  Waits for copies in flight to end."""
        cdef Py_ssize_t l
        if self.closed:
            return
        self.closed = True
        with nogil:
            for l in range(self.n_layers):
                kvc_lock_acquire(&self.layers[l].lock)
                kvc_free(self.layers[l].keys)
                kvc_free(self.layers[l].values)
                self.layers[l].keys = NULL
                self.layers[l].values = NULL
                self.layers[l].length = 0
                kvc_lock_release(&self.layers[l].lock)

    @property
    def nbytes(self):
        return 0 if self.closed else 2 * self.n_layers * self.capacity * self.row_bytes

    def stat(self, str name):
        return kvc_stats_get(self.stats, STAT_NAMES[name])

    cdef int append(self, Py_ssize_t layer, Py_ssize_t n,
                    const char *k, Py_ssize_t k_step, const char *v, Py_ssize_t v_step) noexcept nogil:
        cdef HotLayer *L = &self.layers[layer]
        cdef int status = KVC_OK
        kvc_lock_acquire(&L.lock)
        if L.keys == NULL:
            status = KVC_E_CLOSED
        elif n > self.capacity - L.length:
            status = KVC_E_FULL
        else:
            copy_rows(self.ops.copy_nt, L.keys + L.length * self.row_bytes, self.row_bytes,
                      k, k_step, n, self.row_bytes, self.row_floats)
            copy_rows(self.ops.copy_nt, L.values + L.length * self.row_bytes, self.row_bytes,
                      v, v_step, n, self.row_bytes, self.row_floats)
            L.length += n
        kvc_lock_release(&L.lock)
        if status == KVC_OK:
            kvc_stats_add(self.stats, KVC_STAT_TOKENS_STORED, n)
            kvc_stats_add(self.stats, KVC_STAT_BYTES_STORED, 2 * n * self.row_bytes)
        return status

    cdef int append_all(self, Py_ssize_t n,
                        const char *k, Py_ssize_t k_layer_step, Py_ssize_t k_step,
                        const char *v, Py_ssize_t v_layer_step, Py_ssize_t v_step) noexcept nogil:
        """Append n rows to every layer: all layers or none (every lock held)."""
        cdef Py_ssize_t l
        cdef int status = KVC_OK
        cdef int threads = self.threads
        cdef HotLayer *L
        cdef AppendJob job
        for l in range(self.n_layers):  # ascending order: no deadlock with other lockers
            kvc_lock_acquire(&self.layers[l].lock)
        for l in range(self.n_layers):
            L = &self.layers[l]
            if L.keys == NULL:
                status = KVC_E_CLOSED
                break
            if n > self.capacity - L.length:
                status = KVC_E_FULL
                break
        if status == KVC_OK:
            job.layers = self.layers
            job.copy_nt = self.ops.copy_nt
            job.n = n
            job.row_bytes = self.row_bytes
            job.row_floats = self.row_floats
            job.k, job.k_layer_step, job.k_step = k, k_layer_step, k_step
            job.v, job.v_layer_step, job.v_step = v, v_layer_step, v_step
            if 2 * n * self.n_layers * self.row_bytes < PARALLEL_MIN_BYTES:
                threads = 1
            self.last_threads = kvc_pool_run(threads, self.n_layers, append_task, &job)
        for l in range(self.n_layers):
            if status == KVC_OK:
                self.layers[l].length += n
            kvc_lock_release(&self.layers[l].lock)
        if status == KVC_OK:
            kvc_stats_add(self.stats, KVC_STAT_TOKENS_STORED, n * self.n_layers)
            kvc_stats_add(self.stats, KVC_STAT_BYTES_STORED, 2 * n * self.n_layers * self.row_bytes)
        return status

    cdef int read(self, Py_ssize_t layer, Py_ssize_t start, Py_ssize_t stop,
                  char *k, Py_ssize_t k_step, char *v, Py_ssize_t v_step) noexcept nogil:
        cdef HotLayer *L = &self.layers[layer]
        cdef int status = KVC_OK
        cdef Py_ssize_t n = stop - start
        kvc_lock_acquire(&L.lock)
        if L.keys == NULL:
            status = KVC_E_CLOSED
        elif stop > L.length:
            status = KVC_E_RANGE
        else:
            copy_rows(self.ops.copy, k, k_step, L.keys + start * self.row_bytes, self.row_bytes,
                      n, self.row_bytes, self.row_floats)
            copy_rows(self.ops.copy, v, v_step, L.values + start * self.row_bytes, self.row_bytes,
                      n, self.row_bytes, self.row_floats)
        kvc_lock_release(&L.lock)
        if status == KVC_OK:
            kvc_stats_add(self.stats, KVC_STAT_TOKENS_READ, n)
            kvc_stats_add(self.stats, KVC_STAT_BYTES_READ, 2 * n * self.row_bytes)
            kvc_stats_add(self.stats, KVC_STAT_HOT_HITS, n)
        return status

    cdef int truncate(self, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t l
        cdef int status = KVC_OK
        for l in range(self.n_layers):
            kvc_lock_acquire(&self.layers[l].lock)
            if self.layers[l].keys == NULL:
                status = KVC_E_CLOSED
            elif self.layers[l].length > n:
                self.layers[l].length = n
            kvc_lock_release(&self.layers[l].lock)
        return status

    cdef Py_ssize_t length(self, Py_ssize_t layer) noexcept nogil:
        """Positions stored in ``layer``, or -1 once closed."""
        cdef Py_ssize_t n
        kvc_lock_acquire(&self.layers[layer].lock)
        n = self.layers[layer].length if self.layers[layer].keys != NULL else -1
        kvc_lock_release(&self.layers[layer].lock)
        return n

    def _debug_arenas(self):
        """Test hook: per layer (keys address, values address, nonzero bytes past the end).

        The last item proves arenas start zeroed and that stores write only
        their own rows.
        """
        cdef Py_ssize_t l, i, nz, end = self.capacity * self.row_bytes
        cdef HotLayer *L
        out = []
        for l in range(self.n_layers):
            L = &self.layers[l]
            with nogil:
                kvc_lock_acquire(&L.lock)
                nz = 0
                if L.keys != NULL:
                    for i in range(L.length * self.row_bytes, end):
                        nz += (L.keys[i] != 0) + (L.values[i] != 0)
                kvc_lock_release(&L.lock)
            out.append((<size_t>L.keys, <size_t>L.values, nz))
        return out
