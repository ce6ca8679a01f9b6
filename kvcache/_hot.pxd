from kvcache._ckvc cimport kvc_lock, kvc_stats, kvc_simd_ops

cdef struct HotLayer:
    char *keys          # [capacity, row] float32, 64-byte aligned; NULL once closed
    char *values
    Py_ssize_t length   # positions stored; written under `lock`
    kvc_lock lock


cdef class HotTier:
    cdef HotLayer *layers
    cdef kvc_stats *stats
    cdef kvc_simd_ops *ops
    cdef readonly Py_ssize_t n_layers, capacity, row_floats, row_bytes
    cdef readonly bint closed
    cdef int n_locks
    cdef public int threads
    cdef readonly int last_threads   # threads the last store_layers ran on (written under every lock)

    cdef int append(self, Py_ssize_t layer, Py_ssize_t n,
                    const char *k, Py_ssize_t k_step, const char *v, Py_ssize_t v_step) noexcept nogil
    cdef int append_all(self, Py_ssize_t n,
                        const char *k, Py_ssize_t k_layer_step, Py_ssize_t k_step,
                        const char *v, Py_ssize_t v_layer_step, Py_ssize_t v_step) noexcept nogil
    cdef int read(self, Py_ssize_t layer, Py_ssize_t start, Py_ssize_t stop,
                  char *k, Py_ssize_t k_step, char *v, Py_ssize_t v_step) noexcept nogil
    cdef int truncate(self, Py_ssize_t n) noexcept nogil
    cdef Py_ssize_t length(self, Py_ssize_t layer) noexcept nogil
    cdef void _free_arenas(self) noexcept
