"""Which SIMD copy path is in use, and forcing one (``KVCACHE_SIMD``)."""
import os

cimport numpy as cnp
from kvcache._ckvc cimport (
    KVC_N_BACKENDS, kvc_simd, kvc_simd_init, kvc_simd_force, kvc_simd_available,
    kvc_simd_best, kvc_simd_name, kvc_simd_from_name, kvc_simd_copy_fn, kvc_copy_fn,
)

cnp.import_array()

BACKENDS = tuple(kvc_simd_name(b).decode() for b in range(KVC_N_BACKENDS))


cdef kvc_simd_ops *simd_ops() noexcept nogil:
    return &kvc_simd


def _backend_id(str name):
    cdef int b = kvc_simd_from_name(name.encode())
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


def set_simd_backend(str name):
    """Force a copy path for the whole process (``"auto"`` restores the default).

    Meant for tests and benchmarks; call it while no store or get is running.

    Raises
    ------
    ValueError
        If the name is unknown or the path is not available here.
    """
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


def _init_from_env():
    if kvc_simd_init() < 0:
        value = os.environ.get("KVCACHE_SIMD", "")
        try:
            _backend_id(value)
        except ValueError as exc:
            raise ValueError(f"KVCACHE_SIMD={value!r}: {exc}") from None


_init_from_env()
