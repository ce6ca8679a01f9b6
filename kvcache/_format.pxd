cdef enum:
    HEADER_BYTES = 4096   # every cold file starts with one page of header

cdef inline size_t row_offset(Py_ssize_t pos, Py_ssize_t row_bytes) noexcept nogil:
    """Where position ``pos`` of a layer starts in its cold files."""
    return HEADER_BYTES + <size_t>pos * <size_t>row_bytes
