from libc.stdint cimport int32_t, uint64_t
from kvcache._ckvc cimport kvc_lock, kvc_stats, kvc_simd_ops
from kvcache._codec cimport RowFmt
from kvcache._cold cimport ColdFiles
from kvcache._policy cimport Block, Policy

cdef struct HotLayer:
    char *keys          # [n_slots * block_tokens, row] float32, 64-byte aligned; NULL once closed
    char *values
    Py_ssize_t length   # positions stored; all fields are guarded by `lock`
    kvc_lock lock
    Block *blocks       # [n_blocks]: where each block lives
    int32_t *owner      # [n_slots]: block held by each hot slot, or -1
    float *scores       # h2o: attention mass per position [n_blocks * block_tokens], else NULL
    uint64_t tick       # one per store or get call on this layer (recency clock)
    ColdFiles cold
    int err             # errno of the last failed cold write
    Py_ssize_t bad_block  # block of the last checksum failure


cdef struct Tier:
    # Everything the GIL-free store and read paths need, shared by pool threads.
    HotLayer *layers
    kvc_stats *stats
    kvc_simd_ops *ops
    Policy policy
    RowFmt hot_fmt, cold_fmt
    Py_ssize_t n_layers, row_bytes   # row_bytes: hot_fmt.row_bytes
    Py_ssize_t block_tokens, n_blocks, n_slots, capacity, max_len
    bint tiered, persist, promote
    uint64_t cold_limit     # max_cold_bytes, or UINT64_MAX


cdef class HotTier:
    cdef Tier t
    cdef object arenas      # [Arena] keys, values of each layer; None once closed
    cdef readonly bint closed
    cdef int n_locks
    cdef public int threads
    cdef readonly int last_threads   # threads the last store_layers ran on (written under every lock)

    cdef int append(self, Py_ssize_t layer, int kind, Py_ssize_t n,
                    const char *k, Py_ssize_t k_step, const char *v, Py_ssize_t v_step) noexcept nogil
    cdef int append_all(self, int kind, Py_ssize_t n,
                        const char *k, Py_ssize_t k_layer_step, Py_ssize_t k_step,
                        const char *v, Py_ssize_t v_layer_step, Py_ssize_t v_step) noexcept nogil
    cdef int read(self, Py_ssize_t layer, int kind, Py_ssize_t start, Py_ssize_t stop,
                  char *k, Py_ssize_t k_step, char *v, Py_ssize_t v_step) noexcept nogil
    cdef int write_back_range(self, Py_ssize_t layer, Py_ssize_t start, Py_ssize_t stop,
                              bint check) noexcept nogil
    cdef int add_scores(self, Py_ssize_t layer, const float *acc, Py_ssize_t n) noexcept nogil
    cdef int truncate(self, Py_ssize_t n) noexcept nogil
    cdef Py_ssize_t length(self, Py_ssize_t layer) noexcept nogil
    cdef bint overlaps(self, const char *lo, const char *hi) noexcept nogil
    cdef void _free_arenas(self) noexcept
    cdef tuple _table(self, HotLayer *L)
