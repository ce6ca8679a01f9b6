from kvcache._ckvc cimport kvc_simd_ops

cdef enum:
    # How a row (one token of one layer, keys or values) is laid out.
    FMT_F32 = 0
    FMT_F16 = 1
    FMT_BF16 = 2
    FMT_I8 = 3      # n_heads float32 scales, then the int8 values, padded to 4 bytes

cdef struct RowFmt:
    int kind
    Py_ssize_t row_bytes
    Py_ssize_t n_heads, head_dim

cdef RowFmt row_format(int kind, Py_ssize_t n_heads, Py_ssize_t head_dim) noexcept nogil
cdef int convert_rows(const kvc_simd_ops *ops, bint streaming,
                      const RowFmt *src_fmt, const char *src, Py_ssize_t src_step,
                      const RowFmt *dst_fmt, char *dst, Py_ssize_t dst_step,
                      Py_ssize_t n) noexcept nogil

cdef struct Rows:
    # Keys and values of the same positions: where each starts, and the bytes
    # from one row to the next.
    char *k
    char *v
    Py_ssize_t k_step, v_step

cdef inline Rows rows_at(Rows r, Py_ssize_t i) noexcept nogil:
    """``r`` advanced by ``i`` rows."""
    r.k += i * r.k_step
    r.v += i * r.v_step
    return r

cdef inline Rows dense_rows(char *k, char *v, Py_ssize_t row_bytes) noexcept nogil:
    """Rows packed back to back, ``row_bytes`` apart."""
    cdef Rows r
    r.k, r.v, r.k_step, r.v_step = k, v, row_bytes, row_bytes
    return r

cdef int convert_pair(const kvc_simd_ops *ops, bint streaming,
                      const RowFmt *src_fmt, Rows src, const RowFmt *dst_fmt, Rows dst,
                      Py_ssize_t n) noexcept nogil
