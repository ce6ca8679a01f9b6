cimport numpy as cnp

cdef cnp.ndarray as_array(object obj, str name, bint writable, bint any_float=*)
cdef int array_kind(cnp.ndarray a)
cdef Py_ssize_t check_rows(cnp.ndarray a, str name, int ndim, Py_ssize_t n_heads,
                           Py_ssize_t head_dim, bint or_single=*) except -1
