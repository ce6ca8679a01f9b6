"""The storage dtypes, their row formats, and the conversions between them.

Owns: the one table of dtypes (name, native code, element size, numpy and
torch types; the code is also a cold file header's dtype field), the row
layout of each (``row_format``: the one row-bytes formula), and every copy
of rows: ``convert_pair`` moves keys and values together, a plain (or
streaming) copy when both sides have the same format, else the SIMD header's
conversion kernels (float16 / bfloat16 narrowing and widening, int8
quantisation), by way of float32 when neither side is float32.
Must not touch: locks, blocks, tiers (callers say where rows are).
"""
from collections import namedtuple

from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport int8_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

from kvcache._ckvc cimport KVC_OK, KVC_E_NOMEM, kvc_copy_fn, kvc_cvt_fn

DTypeInfo = namedtuple("DTypeInfo", ["name", "code", "itemsize", "numpy", "torch"])
DTypeInfo.__doc__ = """One storage dtype: its config name, native code (FMT_*, also the
cold header's dtype field), bytes per element, numpy dtype name (``"bfloat16"``
is ml_dtypes'), and torch dtype name (None: torch tensors of it are not inputs)."""

# The one table of storage dtypes.
DTYPES = {d.name: d for d in (
    DTypeInfo("float32", FMT_F32, 4, "float32", "float32"),
    DTypeInfo("float16", FMT_F16, 2, "float16", "float16"),
    DTypeInfo("bfloat16", FMT_BF16, 2, "bfloat16", "bfloat16"),
    DTypeInfo("int8", FMT_I8, 1, "int8", None),
)}


def row_bytes(str dtype, n_heads, head_dim):
    """Bytes of one token's keys (or values) in one layer, stored as ``dtype``.

    Raises MemoryError for a row too large to address (its size would
    overflow the native formula)."""
    if n_heads * head_dim > PY_SSIZE_T_MAX // 8:  # Python ints: no wrap-around here
        raise MemoryError(f"a row of {n_heads} x {head_dim} values is larger than this machine can address")
    return row_format(DTYPES[dtype].code, n_heads, head_dim).row_bytes


def numpy_dtype(str dtype):
    """The numpy dtype of a stored element (ml_dtypes' for bfloat16)."""
    import numpy as np
    if dtype == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPES[dtype].numpy)


cdef RowFmt row_format(int kind, Py_ssize_t n_heads, Py_ssize_t head_dim) noexcept nogil:
    cdef RowFmt f
    cdef Py_ssize_t n = n_heads * head_dim
    f.kind = kind
    f.n_heads = n_heads
    f.head_dim = head_dim
    if kind == FMT_I8:
        f.row_bytes = 4 * n_heads + (n + 3) // 4 * 4
    else:
        f.row_bytes = n * (4 if kind == FMT_F32 else 2)
    return f


cdef inline void copy_bytes(kvc_copy_fn copy, char *dst, const char *src, size_t n) noexcept nogil:
    # The copy kernels move aligned 4-byte units; float16 rows of an odd
    # number of values start and end on halves.
    if (<size_t>dst | <size_t>src | n) & 3:
        memcpy(dst, src, n)
    else:
        copy(dst, src, n // 4)


cdef inline kvc_cvt_fn half_fn(const kvc_simd_ops *ops, int kind, bint widen) noexcept nogil:
    """The element conversion between float32 and a 2-byte kind (a copy for float32)."""
    if kind == FMT_F16:
        return ops.f16_to_f32 if widen else ops.f32_to_f16
    if kind == FMT_BF16:
        return ops.bf16_to_f32 if widen else ops.f32_to_bf16
    return <kvc_cvt_fn>ops.copy


cdef inline void to_f32(const kvc_simd_ops *ops, const RowFmt *f, const char *src, float *dst) noexcept nogil:
    if f.kind == FMT_I8:
        ops.dequant_i8(dst, <const int8_t *>(src + 4 * f.n_heads), <const float *>src, f.n_heads, f.head_dim)
    else:
        half_fn(ops, f.kind, True)(dst, src, f.n_heads * f.head_dim)


cdef inline void from_f32(const kvc_simd_ops *ops, const RowFmt *f, const float *src, char *dst) noexcept nogil:
    cdef Py_ssize_t n = f.n_heads * f.head_dim
    if f.kind == FMT_I8:
        ops.quant_i8(<int8_t *>(dst + 4 * f.n_heads), <float *>dst, src, f.n_heads, f.head_dim)
        if n % 4:  # the padding is part of the row's bytes (checksums): keep it zero
            memset(dst + 4 * f.n_heads + n, 0, 4 - n % 4)
    else:
        half_fn(ops, f.kind, False)(dst, src, n)


cdef int convert_pair(const kvc_simd_ops *ops, bint streaming,
                      const RowFmt *src_fmt, Rows src, const RowFmt *dst_fmt, Rows dst,
                      Py_ssize_t n) noexcept nogil:
    """Convert n rows of keys and of values (see convert_rows)."""
    cdef int status = convert_rows(ops, streaming, src_fmt, src.k, src.k_step, dst_fmt, dst.k, dst.k_step, n)
    if status == KVC_OK:
        status = convert_rows(ops, streaming, src_fmt, src.v, src.v_step, dst_fmt, dst.v, dst.v_step, n)
    return status


cdef int convert_rows(const kvc_simd_ops *ops, bint streaming,
                      const RowFmt *src_fmt, const char *src, Py_ssize_t src_step,
                      const RowFmt *dst_fmt, char *dst, Py_ssize_t dst_step,
                      Py_ssize_t n) noexcept nogil:
    """Convert n rows; returns a kvc_status (KVC_E_NOMEM only when a float32
    staging row is needed and cannot be allocated)."""
    cdef Py_ssize_t i
    cdef float *tmp = NULL
    cdef kvc_copy_fn copy = ops.copy_nt if streaming else ops.copy
    if src_fmt.kind == dst_fmt.kind:
        if src_step == src_fmt.row_bytes and dst_step == dst_fmt.row_bytes:
            copy_bytes(copy, dst, src, n * src_fmt.row_bytes)  # one long copy when both sides are dense
        else:
            for i in range(n):
                copy_bytes(copy, dst + i * dst_step, src + i * src_step, src_fmt.row_bytes)
        return KVC_OK
    if src_fmt.kind == FMT_F32:
        for i in range(n):
            from_f32(ops, dst_fmt, <const float *>(src + i * src_step), dst + i * dst_step)
        return KVC_OK
    if dst_fmt.kind == FMT_F32:
        for i in range(n):
            to_f32(ops, src_fmt, src + i * src_step, <float *>(dst + i * dst_step))
        return KVC_OK
    tmp = <float *>malloc(src_fmt.n_heads * src_fmt.head_dim * sizeof(float))
    if tmp == NULL:
        return KVC_E_NOMEM
    for i in range(n):
        to_f32(ops, src_fmt, src + i * src_step, tmp)
        from_f32(ops, dst_fmt, tmp, dst + i * dst_step)
    free(tmp)
    return KVC_OK


def unpack_rows(rows, str dtype, Py_ssize_t n_heads, Py_ssize_t head_dim):
    """Arrays over ``rows`` (uint8 ``[n, row_bytes]`` in format ``dtype``), no copy.

    float32, float16, bfloat16 give ``[n, n_heads, head_dim]`` arrays; int8 a
    pair ``(values int8 [n, n_heads, head_dim], scales float32 [n, n_heads])``.
    """
    import numpy as np
    n = rows.shape[0]
    if dtype == "int8":
        q = rows[:, 4 * n_heads:4 * n_heads + n_heads * head_dim].view(np.int8)
        return q.reshape(n, n_heads, head_dim), rows[:, :4 * n_heads].view(np.float32)
    return rows.view(numpy_dtype(dtype)).reshape(n, n_heads, head_dim)
