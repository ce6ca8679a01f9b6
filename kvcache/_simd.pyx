"""Which SIMD path is in use, forcing one (``KVCACHE_SIMD``), and its kernels' test hooks."""
import os

import numpy as np

cimport numpy as cnp
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint32_t, uintptr_t
from kvcache._ckvc cimport (
    KVC_N_BACKENDS, kvc_simd, kvc_simd_init, kvc_simd_force, kvc_simd_available,
    KVC_VECTOR, kvc_simd_name, kvc_simd_from_name, kvc_simd_copy_fn, kvc_copy_fn,
    kvc_simd_crc32c_fn, kvc_crc32c_fn, kvc_simd_add_rows_fn, kvc_add_rows_fn,
    kvc_simd_cvt_fn, kvc_cvt_fn, kvc_simd_quant_fn, kvc_quant_fn, kvc_simd_dequant_fn,
    kvc_dequant_fn, KVC_CVT_F32_F16, KVC_CVT_F16_F32, KVC_CVT_F32_BF16, KVC_CVT_BF16_F32,
)

cnp.import_array()

BACKENDS = tuple(kvc_simd_name(b).decode() for b in range(KVC_N_BACKENDS))


cdef kvc_simd_ops *simd_ops() noexcept nogil:
    return &kvc_simd


def _backend_id(str name, bint empty_is_auto=False):
    cdef int b = -1
    if (name or empty_is_auto) and "\0" not in name:  # C would stop at a NUL: "scalar\0x" is no name
        b = kvc_simd_from_name(name.encode())
    if b < 0:
        raise ValueError(
            f"unknown SIMD backend {name!r}: expected one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if not kvc_simd_available(b):
        raise ValueError(
            f"SIMD backend {name!r} is not available on this CPU/build; "
            f"available: {', '.join(map(repr, available_backends()))}")
    return b


def simd_backend():
    """Return the name of the copy path in use (``"avx2"``, ``"neon"``, ...)."""
    return kvc_simd_name(kvc_simd.backend).decode()


def available_backends():
    """Return the copy paths this CPU and build can run, best last."""
    return tuple(BACKENDS[b] for b in range(KVC_N_BACKENDS) if kvc_simd_available(b))


def set_simd_backend(name):
    """Force a copy path for the whole process (``"auto"`` restores the default).

    Meant for tests and benchmarks; call it while no store or get is running.

    Raises
    ------
    TypeError
        If the name is not a str.
    ValueError
        If the name is unknown or the path is not available here.
    """
    if not isinstance(name, str):
        raise TypeError(f"set_simd_backend: name expected a str, got {type(name).__name__}")
    kvc_simd_force(_backend_id(name))
    return simd_backend()


def copy_with(str name, dst, src, bint streaming=False):
    """Copy float32 ``src`` into ``dst`` (both 1-D, C-contiguous) with one path.

    Test hook: lets the suite compare every path, plain or streaming, with the
    scalar oracle.
    """
    cdef kvc_copy_fn fn = kvc_simd_copy_fn(_backend_id(name), streaming)
    cdef float[::1] d = dst
    cdef const float[::1] s = src
    if d.shape[0] != s.shape[0]:
        raise ValueError(f"dst has {d.shape[0]} floats, src has {s.shape[0]}")
    if d.shape[0]:
        with nogil:
            fn(&d[0], &s[0], <size_t>d.shape[0])


cdef _crc32c(kvc_crc32c_fn fn, data, uint32_t crc):
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            crc = fn(crc, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return crc


def crc32c(data, uint32_t crc=0):
    """Return the CRC32C (Castagnoli) of ``data`` with the path in use.

    ``data`` is any C-contiguous buffer (bytes, bytearray, memoryview, numpy
    array...), read as its raw bytes.  ``crc`` is the result for the data
    before it, 0 to start: ``crc32c(b, crc32c(a)) == crc32c(a + b)``.
    """
    return _crc32c(kvc_simd.crc32c, data, crc)


def crc32c_with(str name, data, uint32_t crc=0):
    """:func:`crc32c` with one path (its hardware CRC, or the table).

    Test hook: lets the suite compare every path with the scalar oracle.
    """
    return _crc32c(kvc_simd_crc32c_fn(_backend_id(name)), data, crc)


def add_rows_with(str name, acc, rows):
    """Add each row of ``rows`` into ``acc``, in row order, with one path.

    ``acc`` is float32, 1-D and C-contiguous; ``rows`` is float32, 2-D, with
    contiguous rows of ``acc.shape[0]`` floats at any row stride of at least
    a row.  Test hook: every path must give the scalar result to the bit.

    Raises
    ------
    ValueError
        On another dtype, shape or layout, or if ``acc`` overlaps ``rows``.
    """
    cdef kvc_add_rows_fn fn = kvc_simd_add_rows_fn(_backend_id(name))
    cdef float[::1] a = acc
    cdef const float[:, :] r = rows
    cdef Py_ssize_t n_rows = r.shape[0], n_cols = r.shape[1]
    cdef Py_ssize_t stride = r.strides[0] if n_rows > 1 else n_cols * 4
    if n_cols != a.shape[0]:
        raise ValueError(f"rows have {n_cols} floats, acc has {a.shape[0]}")
    if n_rows == 0 or n_cols == 0:
        return
    if n_cols > 1 and r.strides[1] != 4:
        raise ValueError("each row of rows must be contiguous")
    if stride < n_cols * 4 or stride % 4:
        raise ValueError(f"rows are {stride} bytes apart: need a whole number of floats, "
                         f"at least {n_cols}")
    cdef uintptr_t a0 = <uintptr_t>&a[0], r0 = <uintptr_t>&r[0, 0]
    cdef uintptr_t r_end = r0 + <uintptr_t>((n_rows - 1) * stride + n_cols * 4)
    if a0 < r_end and r0 < a0 + <uintptr_t>(n_cols * 4):
        raise ValueError("acc overlaps rows")
    with nogil:
        fn(&a[0], &r[0, 0], <size_t>n_rows, <size_t>n_cols, <size_t>(stride // 4))


_CONVERSIONS = {"f32_f16": KVC_CVT_F32_F16, "f16_f32": KVC_CVT_F16_F32,
                "f32_bf16": KVC_CVT_F32_BF16, "bf16_f32": KVC_CVT_BF16_F32}


def _dtypes(str fmt):
    """The dtypes one side of a conversion takes: bf16 as its bits or as ml_dtypes' type."""
    if fmt == "bf16":
        import ml_dtypes  # here, not at the top: importing it takes a while
        return np.dtype(np.uint16), np.dtype(ml_dtypes.bfloat16)
    return (np.dtype(np.float32 if fmt == "f32" else np.float16),)


cdef char *_vector_data(a, str role, tuple dtypes) except? NULL:
    if not (isinstance(a, np.ndarray) and a.ndim == 1 and a.flags.c_contiguous
            and a.dtype in dtypes):
        raise ValueError(f"{role} must be a 1-D C-contiguous array of "
                         f"{' or '.join(map(str, dtypes))}")
    return <char *>cnp.PyArray_DATA(<cnp.ndarray>a)


def convert_with(str name, str kind, dst, src):
    """Convert ``src`` into ``dst`` with one path.

    ``kind`` is ``"f32_f16"``, ``"f16_f32"``, ``"f32_bf16"`` or
    ``"bf16_f32"``.  ``dst`` and ``src`` are 1-D, C-contiguous and of one
    length; f32 is float32, f16 numpy's float16, bf16 uint16 bits or
    ml_dtypes' bfloat16.  Test hook: every path must give the scalar result
    (numpy's and ml_dtypes' roundings) to the bit.

    Raises
    ------
    ValueError
        On an unknown kind, another dtype, shape or layout, lengths that
        differ, a read-only ``dst``, or ``dst`` overlapping ``src``.
    """
    if kind not in _CONVERSIONS:
        raise ValueError(f"unknown conversion {kind!r}: expected one of "
                         f"{', '.join(map(repr, _CONVERSIONS))}")
    cdef kvc_cvt_fn fn = kvc_simd_cvt_fn(_backend_id(name), _CONVERSIONS[kind])
    src_fmt, dst_fmt = kind.split("_")
    cdef char *d = _vector_data(dst, "dst", _dtypes(dst_fmt))
    cdef char *s = _vector_data(src, "src", _dtypes(src_fmt))
    if not dst.flags.writeable:
        raise ValueError("dst is read-only")
    if dst.shape[0] != src.shape[0]:
        raise ValueError(f"dst has {dst.shape[0]} elements, src has {src.shape[0]}")
    cdef size_t n = dst.shape[0], src_size = src.itemsize, dst_size = dst.itemsize
    if d < s + n * src_size and s < d + n * dst_size:
        raise ValueError("dst overlaps src")
    if n:
        with nogil:
            fn(d, s, n)


def quant_i8_with(str name, src):
    """Quantize each row of ``src`` (float32, 2-D, C-contiguous) to int8 with one path.

    Returns ``(q, scales)``: int8 of ``src``'s shape and one float32 scale per
    row, as include/kvc_simd.h defines them (max|x| / 127, rint, inf or NaN
    rows get scale NaN and q = 0).  Test hook: every path must give the
    scalar result to the bit.
    """
    cdef kvc_quant_fn fn = kvc_simd_quant_fn(_backend_id(name))
    cdef const float[:, ::1] x = src
    q = np.zeros((x.shape[0], x.shape[1]), np.int8)
    scales = np.zeros(x.shape[0], np.float32)  # an empty row's max|x| is 0
    cdef signed char[:, ::1] qv = q
    cdef float[::1] sv = scales
    if x.shape[0] and x.shape[1]:
        with nogil:
            fn(&qv[0, 0], &sv[0], &x[0, 0], <size_t>x.shape[0], <size_t>x.shape[1])
    return q, scales


def dequant_i8_with(str name, q, scales):
    """Return ``q * scales[:, None]`` in float32 (q int8, 2-D, C-contiguous) with one path.

    Test hook: every path must give the scalar result to the bit.
    """
    cdef kvc_dequant_fn fn = kvc_simd_dequant_fn(_backend_id(name))
    cdef const signed char[:, ::1] qv = q
    cdef const float[::1] sv = scales
    if sv.shape[0] != qv.shape[0]:
        raise ValueError(f"q has {qv.shape[0]} rows, scales has {sv.shape[0]}")
    out = np.zeros((qv.shape[0], qv.shape[1]), np.float32)
    cdef float[:, ::1] ov = out
    if qv.shape[0] and qv.shape[1]:
        with nogil:
            fn(&ov[0, 0], &qv[0, 0], &sv[0], <size_t>qv.shape[0], <size_t>qv.shape[1])
    return out


cdef extern from *:
    """
    #ifdef __OPTIMIZE__
    #define KVC_BUILD_OPTIMIZED 1
    #else
    #define KVC_BUILD_OPTIMIZED 0
    #endif
    """
    int KVC_BUILD_OPTIMIZED


def build_info():
    """How this build was compiled: ``{"vector": name, "debug": bool}``.

    ``vector`` is the compile-time path (``KVC_VECTOR``: ``"scalar"``, ``"sse2"``
    or ``"neon"``); ``debug`` is true for a ``KVCACHE_DEBUG=1`` build (no
    optimisation, Cython bounds checks).
    """
    return {"vector": BACKENDS[KVC_VECTOR], "debug": not KVC_BUILD_OPTIMIZED}


def _init_from_env():
    if kvc_simd_init() < 0:
        value = os.environ.get("KVCACHE_SIMD", "")
        try:
            _backend_id(value, True)
        except ValueError as exc:
            raise ValueError(f"KVCACHE_SIMD={value!r}: {exc}") from None


_init_from_env()
