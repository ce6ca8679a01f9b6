from kvcache._ckvc cimport kvc_error

cdef int check_status(int code, str detail=*, int err=*, object filename=*) except -1
cdef int raise_error(const kvc_error *e, str op, object path_of=*, Py_ssize_t block_tokens=*,
                     Py_ssize_t start=*) except -1
