from kvcache._ckvc cimport kvc_error
from kvcache._codec cimport Rows
from kvcache._copy cimport AppendCheck
from kvcache._tier cimport HotLayer, Tier


cdef int read_layer(Tier *t, Py_ssize_t layer, int kind, Py_ssize_t start, Py_ssize_t stop, Rows dst,
                    kvc_error *e, bint may_promote=*) noexcept nogil


cdef class HotTier:
    cdef Tier t
    cdef object arenas      # [Arena] keys, values of each layer; None once closed
    cdef readonly bint closed
    cdef int n_locks
    cdef public int threads
    cdef readonly int last_threads   # threads the last store_layers ran on (written under every lock)

    cdef int append(self, Py_ssize_t layer, int kind, Py_ssize_t n, Rows src, kvc_error *e) noexcept nogil
    cdef int append_all(self, int kind, Py_ssize_t n, Rows src, Py_ssize_t k_layer_step,
                        Py_ssize_t v_layer_step, kvc_error *e, AppendCheck *check=*) noexcept nogil
    cdef int read(self, Py_ssize_t layer, int kind, Py_ssize_t start, Py_ssize_t stop, Rows dst,
                  kvc_error *e) noexcept nogil
    cdef int write_back_range(self, Py_ssize_t layer, Py_ssize_t start, Py_ssize_t stop,
                              bint check, kvc_error *e) noexcept nogil
    cdef int add_scores(self, Py_ssize_t layer, const float *acc, Py_ssize_t n, kvc_error *e) noexcept nogil
    cdef int truncate(self, Py_ssize_t n, kvc_error *e) noexcept nogil
    cdef Py_ssize_t length(self, Py_ssize_t layer) noexcept nogil
    cdef bint overlaps(self, const char *lo, const char *hi) noexcept nogil
    cdef void _free_arenas(self) noexcept
    cdef tuple _table(self, HotLayer *L)
    cdef tuple seal(self, Py_ssize_t layer, kvc_error *e)
    cdef int restore(self, Py_ssize_t layer, Py_ssize_t length, list disk_rows, list crc_k, list crc_v,
                     kvc_error *e) except -1
