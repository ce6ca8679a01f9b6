from kvcache._hot cimport HotTier

cdef class Persisted:
    cdef HotTier hot
    cdef object config
    cdef list durable       # per-layer lengths the last index records
    cdef bytes written      # the bytes of the last index written or read

    cdef int restore(self, object cold, dict index) except -1
    cdef int write(self, object cold, bint seal) except -1
    cdef bint covers(self, Py_ssize_t n)
