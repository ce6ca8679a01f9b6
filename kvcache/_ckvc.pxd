# Declarations of the C headers in include/.  Every block is nogil, and extern
# functions are noexcept in Cython 3: none of them raises a Python exception.
from libc.stdint cimport uint64_t, int64_t

cdef extern from "kvc_simd.h" nogil:
    int KVC_N_BACKENDS, KVC_VECTOR
    ctypedef unsigned int uint32_t  # <stdint.h>'s, which kvc_simd.h includes
    ctypedef signed char int8_t
    ctypedef void (*kvc_copy_fn)(void *dst, const void *src, size_t n)
    ctypedef uint32_t (*kvc_crc32c_fn)(uint32_t crc, const void *buf, size_t n)
    ctypedef void (*kvc_add_rows_fn)(float *acc, const float *rows, size_t n_rows, size_t n_cols,
                                     size_t row_stride)
    ctypedef void (*kvc_cvt_fn)(void *dst, const void *src, size_t n)
    ctypedef void (*kvc_quant_fn)(int8_t *dst, float *scales, const float *src, size_t n_groups,
                                  size_t group)
    ctypedef void (*kvc_dequant_fn)(float *dst, const int8_t *src, const float *scales,
                                    size_t n_groups, size_t group)
    enum:
        KVC_CVT_F32_F16
        KVC_CVT_F16_F32
        KVC_CVT_F32_BF16
        KVC_CVT_BF16_F32
    ctypedef struct kvc_simd_ops:
        kvc_copy_fn copy
        kvc_copy_fn copy_nt
        kvc_crc32c_fn crc32c
        kvc_add_rows_fn add_rows
        kvc_cvt_fn f32_to_f16
        kvc_cvt_fn f16_to_f32
        kvc_cvt_fn f32_to_bf16
        kvc_cvt_fn bf16_to_f32
        kvc_quant_fn quant_i8
        kvc_dequant_fn dequant_i8
        int backend
    kvc_simd_ops kvc_simd
    int kvc_simd_init()
    int kvc_simd_force(int backend)
    int kvc_simd_available(int backend)
    const char *kvc_simd_name(int backend)
    int kvc_simd_from_name(const char *name)
    kvc_copy_fn kvc_simd_copy_fn(int backend, int streaming)
    kvc_crc32c_fn kvc_simd_crc32c_fn(int backend)
    kvc_add_rows_fn kvc_simd_add_rows_fn(int backend)
    kvc_cvt_fn kvc_simd_cvt_fn(int backend, int which)
    kvc_quant_fn kvc_simd_quant_fn(int backend)
    kvc_dequant_fn kvc_simd_dequant_fn(int backend)

cdef extern from "kvc_alloc.h" nogil:
    void *kvc_alloc(size_t size, size_t align)
    void kvc_free(void *ptr)
    void kvc_prefault(void *ptr, size_t size)
    int64_t kvc_alloc_live_bytes()
    int64_t kvc_alloc_live_blocks()

cdef extern from "kvc_stats.h" nogil:
    enum kvc_stat_id:
        KVC_STAT_TOKENS_STORED
        KVC_STAT_BYTES_STORED
        KVC_STAT_TOKENS_READ
        KVC_STAT_BYTES_READ
        KVC_STAT_HOT_HITS
        KVC_STAT_COLD_HITS
        KVC_STAT_EVICTIONS
        KVC_STAT_EVICTION_BLOCKS
        KVC_STAT_PROMOTIONS
        KVC_STAT_PROMOTION_BLOCKS
        KVC_STAT_BYTES_TO_COLD
        KVC_STAT_BYTES_FROM_COLD
        KVC_STAT_COLD_BYTES
        KVC_STAT_ROWS_HELD
    ctypedef struct kvc_stats:
        pass
    kvc_stats *kvc_stats_new()
    void kvc_stats_free(kvc_stats *s)
    void kvc_stats_add(kvc_stats *s, int which, uint64_t n)
    void kvc_stats_sub(kvc_stats *s, int which, uint64_t n)
    int kvc_stats_reserve(kvc_stats *s, int which, uint64_t n, uint64_t limit)
    uint64_t kvc_stats_get(const kvc_stats *s, int which)

cdef extern from "kvc_lock.h" nogil:
    ctypedef struct kvc_lock:
        pass
    int kvc_lock_init(kvc_lock *l)
    void kvc_lock_destroy(kvc_lock *l)
    void kvc_lock_acquire(kvc_lock *l)
    void kvc_lock_release(kvc_lock *l)

cdef extern from "kvc_status.h" nogil:
    enum kvc_status:
        KVC_OK
        KVC_E_NOMEM
        KVC_E_FULL
        KVC_E_CLOSED
        KVC_E_RANGE
        KVC_E_INVALID
        KVC_E_IO
        KVC_E_CORRUPT
    enum kvc_limit:
        KVC_LIMIT_NONE
        KVC_LIMIT_SEQ_LEN
        KVC_LIMIT_COLD_BYTES
        KVC_LIMIT_SLOTS
    ctypedef struct kvc_error:
        int code
        int err
        int limit_kind
        int file_kind
        int64_t layer
        int64_t block
        int64_t held
        int64_t asked
        uint64_t limit
    void kvc_error_clear(kvc_error *e)
    int kvc_fail(kvc_error *e, int code, int64_t layer, int64_t block)
    int kvc_fail_io(kvc_error *e, int err, int64_t layer, int64_t block, int file_kind)
    int kvc_fail_full(kvc_error *e, int limit_kind, int64_t layer, int64_t held, int64_t asked,
                      uint64_t limit)

cdef extern from "kvc_pool.h" nogil:
    ctypedef void (*kvc_task_fn)(void *ctx, size_t i) noexcept nogil
    int kvc_pool_run(int threads, size_t n_tasks, kvc_task_fn fn, void *ctx)
