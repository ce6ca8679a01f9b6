/* AVX2 and AVX-512 copy paths.  This file is compiled at the x86-64 baseline:
 * only the functions below carry wider targets, and kvc_dispatch.c calls them
 * only after CPUID and XGETBV say the CPU and OS support them. */
#if defined(__AVX__) || defined(__AVX2__) || defined(__AVX512F__)
#  error "compile kvc_simd_x86.c at the baseline: no -mavx*/-march here"
#endif

#include "kvc_simd.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

__attribute__((target("avx2")))
void kvc_copy_avx2(void *dst, const void *src, size_t n)
{
    float *d = (float *)dst;
    const float *s = (const float *)src;
    size_t i = 0;
    if (n >= 32) {
        size_t head = kvc_head_floats(d, n, 32);
        kvc_copy_scalar(d, s, head);
        i = head;
        for (; i + 32 <= n; i += 32) {
            __m256 a = _mm256_loadu_ps(s + i), b = _mm256_loadu_ps(s + i + 8);
            __m256 c = _mm256_loadu_ps(s + i + 16), e = _mm256_loadu_ps(s + i + 24);
            _mm256_store_ps(d + i, a);
            _mm256_store_ps(d + i + 8, b);
            _mm256_store_ps(d + i + 16, c);
            _mm256_store_ps(d + i + 24, e);
        }
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_loadu_ps(s + i));
    kvc_copy_scalar(d + i, s + i, n - i);
}

__attribute__((target("avx2")))
void kvc_copy_avx2_nt(void *dst, const void *src, size_t n)
{
    if (n * 4 < KVC_NT_MIN_BYTES) {
        kvc_copy_avx2(dst, src, n);
        return;
    }
    float *d = (float *)dst;
    const float *s = (const float *)src;
    size_t head = kvc_head_floats(d, n, 64); /* whole lines only */
    kvc_copy_avx2(d, s, head);
    size_t i = head;
    for (; i + 32 <= n; i += 32) {
        __m256 a = _mm256_loadu_ps(s + i), b = _mm256_loadu_ps(s + i + 8);
        __m256 c = _mm256_loadu_ps(s + i + 16), e = _mm256_loadu_ps(s + i + 24);
        _mm256_stream_ps(d + i, a);
        _mm256_stream_ps(d + i + 8, b);
        _mm256_stream_ps(d + i + 16, c);
        _mm256_stream_ps(d + i + 24, e);
    }
    _mm_sfence();
    kvc_copy_avx2(d + i, s + i, n - i);
}

__attribute__((target("avx512f")))
void kvc_copy_avx512(void *dst, const void *src, size_t n)
{
    float *d = (float *)dst;
    const float *s = (const float *)src;
    size_t i = 0;
    if (n >= 64) {
        size_t head = kvc_head_floats(d, n, 64);
        kvc_copy_scalar(d, s, head);
        i = head;
        for (; i + 64 <= n; i += 64) {
            __m512 a = _mm512_loadu_ps(s + i), b = _mm512_loadu_ps(s + i + 16);
            __m512 c = _mm512_loadu_ps(s + i + 32), e = _mm512_loadu_ps(s + i + 48);
            _mm512_store_ps(d + i, a);
            _mm512_store_ps(d + i + 16, b);
            _mm512_store_ps(d + i + 32, c);
            _mm512_store_ps(d + i + 48, e);
        }
    }
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, _mm512_loadu_ps(s + i));
    if (i < n) {
        /* A masked load/store finishes the last 1..15 floats in one step. */
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(d + i, m, _mm512_maskz_loadu_ps(m, s + i));
    }
}
#endif

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f")))
void kvc_copy_avx512_nt(void *dst, const void *src, size_t n)
{
    if (n * 4 < KVC_NT_MIN_BYTES) {
        kvc_copy_avx512(dst, src, n);
        return;
    }
    float *d = (float *)dst;
    const float *s = (const float *)src;
    size_t head = kvc_head_floats(d, n, 64); /* whole lines only */
    kvc_copy_avx512(d, s, head);
    size_t i = head;
    for (; i + 64 <= n; i += 64) {
        __m512 a = _mm512_loadu_ps(s + i), b = _mm512_loadu_ps(s + i + 16);
        __m512 c = _mm512_loadu_ps(s + i + 32), e = _mm512_loadu_ps(s + i + 48);
        _mm512_stream_ps(d + i, a);
        _mm512_stream_ps(d + i + 16, b);
        _mm512_stream_ps(d + i + 32, c);
        _mm512_stream_ps(d + i + 48, e);
    }
    _mm_sfence();
    kvc_copy_avx512(d + i, s + i, n - i);
}
#endif
