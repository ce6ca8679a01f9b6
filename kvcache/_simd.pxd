from kvcache._ckvc cimport kvc_simd_ops

cdef kvc_simd_ops *simd_ops() noexcept nogil
