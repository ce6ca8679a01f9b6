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

/* Conversions and int8 groups.  The AVX2 path needs F16C as well, and the
 * AVX-512 one BW and VL (16-bit and byte masks): kvc_dispatch.c checks them. */

/* F16C quiets signalling NaNs: a vector holding a NaN is redone in scalar,
 * which keeps numpy's payload (rare in real data). */
__attribute__((target("avx2,f16c")))
void kvc_f32_to_f16_avx2(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const float *s = (const float *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(s + i);
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)))
            kvc_f32_to_f16_scalar(d + i, s + i, 8);
    }
    kvc_f32_to_f16_scalar(d + i, s + i, n - i);
}

__attribute__((target("avx2,f16c")))
void kvc_f16_to_f32_avx2(void *dst, const void *src, size_t n)
{
    float *d = (float *)dst;
    const uint16_t *s = (const uint16_t *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i)));
        _mm256_storeu_ps(d + i, v);
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)))
            kvc_f16_to_f32_scalar(d + i, s + i, 8);
    }
    kvc_f16_to_f32_scalar(d + i, s + i, n - i);
}

/* Eight floats rounded to bf16 (kvc_f32_to_bf16_bits), in the high halves of
 * the lanes, shifted down with their sign for _mm_packs_epi32. */
__attribute__((target("avx2")))
static inline __m256i kvc_bf16_round_avx2(__m256i x)
{
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    __m256i qnan = _mm256_or_si256(_mm256_and_si256(x, _mm256_set1_epi32((int)0x80000000u)),
                                   _mm256_set1_epi32(0x7fc00000));
    return _mm256_srai_epi32(_mm256_blendv_epi8(r, qnan, nan), 16);
}

__attribute__((target("avx2")))
void kvc_f32_to_bf16_avx2(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const float *s = (const float *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i r = kvc_bf16_round_avx2(_mm256_castps_si256(_mm256_loadu_ps(s + i)));
        __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)(d + i), h);
    }
    kvc_f32_to_bf16_scalar(d + i, s + i, n - i);
}

__attribute__((target("avx2")))
void kvc_bf16_to_f32_avx2(void *dst, const void *src, size_t n)
{
    float *d = (float *)dst;
    const uint16_t *s = (const uint16_t *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
        _mm256_storeu_si256((__m256i *)(d + i), _mm256_slli_epi32(h, 16));
    }
    kvc_bf16_to_f32_scalar(d + i, s + i, n - i);
}

/* q as kvc_quant_i8_one computes it: clamp, then convert in the current
 * rounding mode (MXCSR, nearest even by default) like rintf. */
__attribute__((target("avx2")))
void kvc_quant_i8_avx2(int8_t *dst, float *scales, const float *src, size_t n_groups,
                       size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        __m256i m = _mm256_setzero_si256();
        size_t i = 0;
        for (; i + 8 <= group; i += 8)
            m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(src + i)),
                                                     _mm256_set1_epi32(0x7fffffff)));
        __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
        m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(1, 0, 3, 2)));
        m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(2, 3, 0, 1)));
        uint32_t amax = (uint32_t)_mm_cvtsi128_si32(m4);
        for (; i < group; i++) amax = kvc_abs_max_step(amax, src[i]);
        float scale = scales[g] = kvc_i8_scale(amax);
        if (!(scale > 0.0f)) {
            memset(dst, 0, group);
            continue;
        }
        __m256 sv = _mm256_set1_ps(scale);
        __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
        for (i = 0; i + 8 <= group; i += 8) {
            __m256 v = _mm256_div_ps(_mm256_loadu_ps(src + i), sv);
            __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
            __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storel_epi64((__m128i *)(dst + i), _mm_packs_epi16(w, w));
        }
        for (; i < group; i++) dst[i] = kvc_quant_i8_one(src[i], scale);
    }
}

__attribute__((target("avx2")))
void kvc_dequant_i8_avx2(float *dst, const int8_t *src, const float *scales, size_t n_groups,
                         size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        float scale = scales[g];
        __m256 sv = _mm256_set1_ps(scale);
        size_t i = 0;
        for (; i + 8 <= group; i += 8) {
            __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(src + i)));
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), sv));
        }
        for (; i < group; i++) dst[i] = (float)src[i] * scale;
    }
}

/* The AVX-512 loops run 16 elements a step, the last 1..15 under a mask:
 * masked-off lanes are neither read nor written. */
static inline __mmask16 kvc_mask16(size_t left)
{
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

static inline size_t kvc_min16(size_t left) { return left < 16 ? left : 16; }

#define KVC_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

KVC_AVX512_TARGET
void kvc_f32_to_f16_avx512(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const float *s = (const float *)src;
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = kvc_mask16(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, s + i);
        _mm256_mask_storeu_epi16(d + i, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q))
            kvc_f32_to_f16_scalar(d + i, s + i, kvc_min16(n - i));
    }
}

KVC_AVX512_TARGET
void kvc_f16_to_f32_avx512(void *dst, const void *src, size_t n)
{
    float *d = (float *)dst;
    const uint16_t *s = (const uint16_t *)src;
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = kvc_mask16(n - i);
        __m512 v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + i));
        _mm512_mask_storeu_ps(d + i, m, v);
        if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q))
            kvc_f16_to_f32_scalar(d + i, s + i, kvc_min16(n - i));
    }
}

KVC_AVX512_TARGET
void kvc_f32_to_bf16_avx512(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const uint32_t *s = (const uint32_t *)src;
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = kvc_mask16(n - i);
        __m512i x = _mm512_maskz_loadu_epi32(m, s + i);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
        __m512i qnan = _mm512_or_si512(_mm512_and_si512(x, _mm512_set1_epi32((int)0x80000000u)),
                                       _mm512_set1_epi32(0x7fc00000));
        r = _mm512_srli_epi32(_mm512_mask_mov_epi32(r, nan, qnan), 16);
        _mm512_mask_cvtepi32_storeu_epi16(d + i, m, r);
    }
}

/* VCVTNEPS2BF16 rounds to nearest even but reads denormals as zero and
 * quiets NaNs its own way: vectors with such lanes are redone in scalar. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void kvc_f32_to_bf16_avx512bf16(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const float *s = (const float *)src;
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = kvc_mask16(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, s + i);
        _mm256_mask_storeu_epi16(d + i, m, (__m256i)_mm512_cvtneps_pbh(v));
        __m512i a = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
        __mmask16 nan = _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7f800000));
        __mmask16 denormal = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(a, _mm512_set1_epi32(1)),
                                                     _mm512_set1_epi32(0x007fffff));
        if (nan | denormal) kvc_f32_to_bf16_scalar(d + i, s + i, kvc_min16(n - i));
    }
}

KVC_AVX512_TARGET
void kvc_bf16_to_f32_avx512(void *dst, const void *src, size_t n)
{
    uint32_t *d = (uint32_t *)dst;
    const uint16_t *s = (const uint16_t *)src;
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = kvc_mask16(n - i);
        __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + i));
        _mm512_mask_storeu_epi32(d + i, m, _mm512_slli_epi32(h, 16));
    }
}

KVC_AVX512_TARGET
void kvc_quant_i8_avx512(int8_t *dst, float *scales, const float *src, size_t n_groups,
                         size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        __m512i mx = _mm512_setzero_si512();
        for (size_t i = 0; i < group; i += 16) {
            __m512i x = _mm512_maskz_loadu_epi32(kvc_mask16(group - i), src + i);
            mx = _mm512_max_epu32(mx, _mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)));
        }
        float scale = scales[g] = kvc_i8_scale(_mm512_reduce_max_epu32(mx));
        if (!(scale > 0.0f)) {
            memset(dst, 0, group);
            continue;
        }
        __m512 sv = _mm512_set1_ps(scale);
        __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        for (size_t i = 0; i < group; i += 16) {
            __mmask16 m = kvc_mask16(group - i);
            __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, src + i), sv);
            __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
            _mm512_mask_cvtsepi32_storeu_epi8(dst + i, m, q);
        }
    }
}

KVC_AVX512_TARGET
void kvc_dequant_i8_avx512(float *dst, const int8_t *src, const float *scales, size_t n_groups,
                           size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        __m512 sv = _mm512_set1_ps(scales[g]);
        for (size_t i = 0; i < group; i += 16) {
            __mmask16 m = kvc_mask16(group - i);
            __m512i q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, src + i));
            _mm512_mask_storeu_ps(dst + i, m, _mm512_mul_ps(_mm512_cvtepi32_ps(q), sv));
        }
    }
}
#endif
