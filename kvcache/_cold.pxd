cdef struct ColdFiles:
    # One layer's pair of cold files (keys, values): row p of the layer lives
    # at row_offset(p, row_bytes) in both (kvcache._format).  fd < 0: no cold tier (yet).
    int fd_k
    int fd_v
    const char *map_k     # read-only shared mappings of the whole data range
    const char *map_v

cdef int write_all(int fd, const char *src, size_t n, size_t offset) noexcept nogil
cdef ColdFiles layer_files(object store, Py_ssize_t layer)
