from kvcache._ckvc cimport kvc_error
from kvcache._tier cimport HotLayer, Tier

cdef int write_back(Tier *t, HotLayer *L, Py_ssize_t b, Py_ssize_t rows, kvc_error *e) noexcept nogil
cdef int write_back_blocks(Tier *t, HotLayer *L, Py_ssize_t start, Py_ssize_t stop, bint check,
                           kvc_error *e) noexcept nogil
cdef int verify(Tier *t, HotLayer *L, Py_ssize_t b, kvc_error *e) noexcept nogil
cdef int take_slot(Tier *t, HotLayer *L, Py_ssize_t b, Py_ssize_t cursor, kvc_error *e) noexcept nogil
cdef int load_block(Tier *t, HotLayer *L, Py_ssize_t b, Py_ssize_t cursor, kvc_error *e) noexcept nogil
cdef void drop_disk_rows(Tier *t, HotLayer *L, Py_ssize_t b, Py_ssize_t keep) noexcept nogil
