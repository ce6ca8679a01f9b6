/* AVX2 and AVX-512 paths, and the SSE4.2 CRC32C that goes with them.  This
 * file is compiled at the x86-64 baseline: only the functions below carry
 * wider targets, and kvc_dispatch.c calls them only after CPUID and XGETBV say
 * the CPU and OS support them. */
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

__attribute__((target("avx2")))
void kvc_add_rows_avx2(float *acc, const float *rows, size_t n_rows, size_t n_cols,
                       size_t row_stride)
{
    for (size_t r = 0; r < n_rows; r += KVC_ROWS_PER_PASS) {
        const float *p = rows + r * row_stride;
        size_t k = kvc_rows_this_pass(n_rows - r), c = 0;
        for (; c + 8 <= n_cols; c += 8) {
            __m256 a = _mm256_loadu_ps(acc + c);
            for (size_t g = 0; g < k; g++)
                a = _mm256_add_ps(a, _mm256_loadu_ps(p + g * row_stride + c));
            _mm256_storeu_ps(acc + c, a);
        }
        kvc_add_rows_scalar(acc + c, p + c, k, n_cols - c, row_stride);
    }
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

__attribute__((target("avx512f")))
void kvc_add_rows_avx512(float *acc, const float *rows, size_t n_rows, size_t n_cols,
                         size_t row_stride)
{
    for (size_t r = 0; r < n_rows; r += KVC_ROWS_PER_PASS) {
        const float *p = rows + r * row_stride;
        size_t k = kvc_rows_this_pass(n_rows - r);
        for (size_t c = 0; c < n_cols; c += 16) {
            /* The last 1..15 columns go through masks: masked-off lanes are
             * neither read nor written. */
            size_t left = n_cols - c;
            __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
            __m512 a = _mm512_maskz_loadu_ps(m, acc + c);
            for (size_t g = 0; g < k; g++)
                a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, p + g * row_stride + c));
            _mm512_mask_storeu_ps(acc + c, m, a);
        }
    }
}

static inline uint64_t kvc_load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* The CRC state `crc` moved over n zero bytes, i.e. times x^(8n) mod P, given
 * k = x^(8n-33) mod P (bit-reflected, as the state): the carry-less product of
 * two reflected values carries a factor x, and reducing it with the CRC
 * instruction multiplies by x^32, hence the 33.  The product is done in
 * software, four bits of crc at a time from a table of k's multiples, so that
 * no PCLMULQDQ is needed; it runs twice per triple of blocks. */
__attribute__((target("sse4.2")))
static inline uint32_t kvc_crc32c_shift(uint32_t crc, uint32_t k)
{
    uint64_t mul[16], prod = 0;
    mul[0] = 0;
    for (int j = 1; j < 16; j++) mul[j] = (mul[j >> 1] << 1) ^ (j & 1 ? k : 0);
    for (int i = 0; i < 32; i += 4) prod ^= mul[(crc >> i) & 15] << i;
    return (uint32_t)_mm_crc32_u64(0, prod);
}

/* Block lengths, longest first, with their shift constants x^(8n-33) mod P for
 * n = len and n = 2*len.  The short blocks keep three streams going over what
 * is left after the long ones (1 MiB: 32 GB/s; 4 KiB: 22; one stream: 11). */
static const struct {
    size_t len;
    uint32_t k_len, k_2len;
} kvc_crc32c_blocks[] = {
    {4096, 0x82f89c77u, 0x54a86326u},
    {256, 0xb9e02b86u, 0xdd7e3b0cu},
};

/* CRC32C with the SSE4.2 instruction.  It has a latency of 3 cycles but a
 * throughput of 1 per cycle, so buffers of 3 blocks or more run as three
 * independent streams over consecutive blocks.  The CRC is linear: the state
 * after a triple is the first stream's moved over two blocks, xor the
 * second's moved over one, xor the third's. */
__attribute__((target("sse4.2")))
uint32_t kvc_crc32c_sse42(uint32_t crc, const void *buf, size_t n)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t c = (uint32_t)~crc;
    for (; n && ((uintptr_t)p & 7); n--) c = _mm_crc32_u8((uint32_t)c, *p++);
    for (size_t b = 0; b < sizeof kvc_crc32c_blocks / sizeof kvc_crc32c_blocks[0]; b++) {
        size_t len = kvc_crc32c_blocks[b].len;
        for (; n >= 3 * len; n -= 3 * len, p += 3 * len) {
            uint64_t c1 = 0, c2 = 0;
            for (size_t i = 0; i < len; i += 8) {
                c = _mm_crc32_u64(c, kvc_load64(p + i));
                c1 = _mm_crc32_u64(c1, kvc_load64(p + len + i));
                c2 = _mm_crc32_u64(c2, kvc_load64(p + 2 * len + i));
            }
            c = kvc_crc32c_shift((uint32_t)c, kvc_crc32c_blocks[b].k_2len) ^
                kvc_crc32c_shift((uint32_t)c1, kvc_crc32c_blocks[b].k_len) ^ c2;
        }
    }
    for (; n >= 8; n -= 8, p += 8) c = _mm_crc32_u64(c, kvc_load64(p));
    for (; n; n--) c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif
