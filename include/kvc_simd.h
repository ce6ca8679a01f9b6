/* kvc_simd.h - the one SIMD switch of kvcache, and every copy it makes.
 *
 * KVC_VECTOR selects the compile-time copy path (like xxHash's XXH_VECTOR):
 *
 *   KVC_SCALAR (0)  portable C, the reference every other path is tested against
 *   KVC_SSE2   (1)  x86-64 baseline; every x86-64 CPU has it
 *   KVC_NEON   (4)  AArch64 Advanced SIMD (vld1q_f32 / vst1q_f32)
 *
 * It is chosen from the compiler's target macros and may be forced with
 * -DKVC_VECTOR=0.  AVX2 (2) and AVX-512 (3) are never compile-time choices:
 * they live in src/kvc_simd_x86.c behind __attribute__((target)) and are picked
 * once at run time by CPU detection (src/kvc_dispatch.c), so a build never
 * executes an instruction the CPU lacks.
 *
 * Contract of every kvc_copy_<isa>(dst, src, n): copies n float32 values
 * (4*n bytes); dst and src are aligned to 4 bytes and do not overlap.
 *
 * kvc_copy_<isa>_nt is the same copy with streaming (non-temporal) stores for
 * copies of at least KVC_NT_MIN_BYTES: the destination lines are written
 * without first being read (no read-for-ownership) and bypass the caches.
 * Stores into the cache's arenas use it: that memory is written once and read
 * much later.  Copies out to a caller's buffer use the plain copy, since the
 * caller reads them at once.  It ends with a store fence, so the data is
 * visible to other threads once the layer lock is released.
 */
#ifndef KVC_SIMD_H
#define KVC_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KVC_SCALAR 0
#define KVC_SSE2 1
#define KVC_AVX2 2
#define KVC_AVX512 3
#define KVC_NEON 4
#define KVC_N_BACKENDS 5

#ifndef KVC_VECTOR
#  if defined(__aarch64__) || defined(_M_ARM64)
#    define KVC_VECTOR KVC_NEON
#  elif defined(__SSE2__) || defined(_M_X64)
#    define KVC_VECTOR KVC_SSE2
#  else
#    define KVC_VECTOR KVC_SCALAR
#  endif
#endif

#if KVC_VECTOR == KVC_NEON
#  include <arm_neon.h>
#elif KVC_VECTOR == KVC_SSE2
#  include <emmintrin.h>
#elif KVC_VECTOR != KVC_SCALAR
#  error "KVC_VECTOR must be KVC_SCALAR (0), KVC_SSE2 (1) or KVC_NEON (4)"
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*kvc_copy_fn)(void *dst, const void *src, size_t n);

/* Below this, streaming stores lose: partly filled write-combining buffers
 * and a fence cost more than the read-for-ownership they save. */
#ifndef KVC_NT_MIN_BYTES
#define KVC_NT_MIN_BYTES 2048
#endif

/* The scalar oracle: one 4-byte element per iteration.  Vectorisation and
 * memcpy idiom recognition are turned off so that "scalar" means scalar when
 * a benchmark compares it with the SIMD paths. */
#if defined(__clang__)
static inline void kvc_copy_scalar(void *dst, const void *src, size_t n)
{
    uint32_t *d = (uint32_t *)dst;
    const uint32_t *s = (const uint32_t *)src;
#pragma clang loop vectorize(disable) interleave(disable)
    for (size_t i = 0; i < n; i++) d[i] = s[i];
}
#elif defined(__GNUC__)
__attribute__((optimize("no-tree-vectorize", "no-tree-loop-distribute-patterns")))
static inline void kvc_copy_scalar(void *dst, const void *src, size_t n)
{
    uint32_t *d = (uint32_t *)dst;
    const uint32_t *s = (const uint32_t *)src;
    for (size_t i = 0; i < n; i++) d[i] = s[i];
}
#else
static inline void kvc_copy_scalar(void *dst, const void *src, size_t n)
{
    uint32_t *d = (uint32_t *)dst;
    const uint32_t *s = (const uint32_t *)src;
    for (size_t i = 0; i < n; i++) d[i] = s[i];
}
#endif

/* Floats to copy before dst reaches a `width`-byte boundary (capped at n).
 * Aligning the destination keeps every vector store inside one cache line. */
static inline size_t kvc_head_floats(const void *dst, size_t n, size_t width)
{
    size_t mis = (size_t)((uintptr_t)dst & (width - 1));
    size_t head = mis ? (width - mis) / 4 : 0;
    return head < n ? head : n;
}

#if KVC_VECTOR == KVC_SSE2
static inline void kvc_copy_sse2(void *dst, const void *src, size_t n)
{
    float *d = (float *)dst;
    const float *s = (const float *)src;
    size_t i = 0;
    if (n >= 16) {
        size_t head = kvc_head_floats(d, n, 16);
        kvc_copy_scalar(d, s, head);
        i = head;
        for (; i + 16 <= n; i += 16) {
            __m128 a = _mm_loadu_ps(s + i), b = _mm_loadu_ps(s + i + 4);
            __m128 c = _mm_loadu_ps(s + i + 8), e = _mm_loadu_ps(s + i + 12);
            _mm_store_ps(d + i, a);
            _mm_store_ps(d + i + 4, b);
            _mm_store_ps(d + i + 8, c);
            _mm_store_ps(d + i + 12, e);
        }
    }
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(d + i, _mm_loadu_ps(s + i));
    kvc_copy_scalar(d + i, s + i, n - i);
}

static inline void kvc_copy_sse2_nt(void *dst, const void *src, size_t n)
{
    if (n * 4 < KVC_NT_MIN_BYTES) {
        kvc_copy_sse2(dst, src, n);
        return;
    }
    float *d = (float *)dst;
    const float *s = (const float *)src;
    size_t head = kvc_head_floats(d, n, 64); /* whole lines only */
    kvc_copy_sse2(d, s, head);
    size_t i = head;
    for (; i + 16 <= n; i += 16) {
        __m128 a = _mm_loadu_ps(s + i), b = _mm_loadu_ps(s + i + 4);
        __m128 c = _mm_loadu_ps(s + i + 8), e = _mm_loadu_ps(s + i + 12);
        _mm_stream_ps(d + i, a);
        _mm_stream_ps(d + i + 4, b);
        _mm_stream_ps(d + i + 8, c);
        _mm_stream_ps(d + i + 12, e);
    }
    _mm_sfence();
    kvc_copy_sse2(d + i, s + i, n - i);
}
#endif

#if KVC_VECTOR == KVC_NEON
static inline void kvc_copy_neon(void *dst, const void *src, size_t n)
{
    float *d = (float *)dst;
    const float *s = (const float *)src;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        float32x4_t a = vld1q_f32(s + i), b = vld1q_f32(s + i + 4);
        float32x4_t c = vld1q_f32(s + i + 8), e = vld1q_f32(s + i + 12);
        vst1q_f32(d + i, a);
        vst1q_f32(d + i + 4, b);
        vst1q_f32(d + i + 8, c);
        vst1q_f32(d + i + 12, e);
    }
    for (; i + 4 <= n; i += 4) vst1q_f32(d + i, vld1q_f32(s + i));
    kvc_copy_scalar(d + i, s + i, n - i);
}
#endif

/* Paths with no streaming store of their own reuse the plain copy. */
#define kvc_copy_scalar_nt kvc_copy_scalar
#define kvc_copy_neon_nt kvc_copy_neon

/* Run-time selection (src/kvc_dispatch.c).  The table is filled once, at the
 * first call of kvc_simd_init(); kvc_simd_force() may change it later. */
typedef struct kvc_simd_ops {
    kvc_copy_fn copy;     /* out of the cache: plain stores */
    kvc_copy_fn copy_nt;  /* into the cache: streaming stores when large */
    int backend;
} kvc_simd_ops;

extern kvc_simd_ops kvc_simd;

/* Returns the backend in use after reading KVCACHE_SIMD, or -1 when that
 * variable names an unknown or unavailable path (then the table is "auto"). */
int kvc_simd_init(void);
int kvc_simd_force(int backend);           /* 0, or -1 if unavailable */
int kvc_simd_available(int backend);       /* 1 if this CPU and build have it */
int kvc_simd_best(void);                   /* what "auto" picks */
const char *kvc_simd_name(int backend);
int kvc_simd_from_name(const char *name);  /* -1 if unknown; "auto" -> best */
kvc_copy_fn kvc_simd_copy_fn(int backend, int streaming); /* NULL if unavailable */

#if defined(__x86_64__) || defined(_M_X64)
void kvc_copy_avx2(void *dst, const void *src, size_t n);
void kvc_copy_avx2_nt(void *dst, const void *src, size_t n);
void kvc_copy_avx512(void *dst, const void *src, size_t n);
void kvc_copy_avx512_nt(void *dst, const void *src, size_t n);
#endif

#ifdef __cplusplus
}
#endif
#endif /* KVC_SIMD_H */
