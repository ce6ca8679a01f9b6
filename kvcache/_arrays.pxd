cimport numpy as cnp
from kvcache._hot cimport HotTier

cdef cnp.ndarray as_array(object obj, str name, bint writable, bint any_float=*)
cdef int array_kind(cnp.ndarray a)
cdef Py_ssize_t check_rows(cnp.ndarray a, str name, int ndim, Py_ssize_t n_heads,
                           Py_ssize_t head_dim, bint or_single=*) except -1
cdef int same_kind(cnp.ndarray k, cnp.ndarray v) except -1
cdef int check_tokens(Py_ssize_t n_keys, Py_ssize_t n_values) except -1
cdef int check_flag(str name, object value) except -1
cdef Py_ssize_t position(str name, object value, Py_ssize_t length, Py_ssize_t default) except? -1
cdef tuple check_out(object out, Py_ssize_t n, Py_ssize_t n_heads, Py_ssize_t head_dim)
cdef cnp.ndarray unaliased(HotTier hot, cnp.ndarray a)
