cdef enum:
    ARENA_ALIGN = 64  # bytes: one cache line, and the widest vector (AVX-512)

cdef class Arena:
    cdef char *ptr
    cdef readonly Py_ssize_t nbytes

cdef class WritableArena:
    cdef Arena arena

cdef class ColdMap:
    cdef char *addr
    cdef readonly Py_ssize_t length

cdef void export_bytes(Py_buffer *view, object owner, char *ptr, Py_ssize_t nbytes, bint readonly)
