/* kvc_simd.h - the one SIMD switch of kvcache: every copy it makes, its
 * checksum and its column sums.
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
 *
 * kvc_crc32c_<variant>(crc, buf, n) is CRC32C (Castagnoli, as iSCSI and ext4
 * use it): crc is the previous result, 0 to start, so that feeding a buffer in
 * pieces gives the CRC of the whole.  Variants: the byte table (scalar, also
 * used by the sse2 path), SSE4.2 (src/kvc_simd_x86.c, with the AVX2 and
 * AVX-512 paths) and the AArch64 CRC32 instructions (with NEON, when the CPU
 * has them).
 *
 * kvc_add_rows_<isa>(acc, rows, n_rows, n_cols, row_stride) adds rows
 * r = 0, 1, ... n_rows-1 (each n_cols floats, row_stride floats apart) into
 * acc, in that order for every column: vertical adds only, never reassociated,
 * so every path gives the scalar result to the bit.  acc and rows are aligned
 * to 4 bytes and do not overlap.
 *
 * Conversions, kvc_<from>_to_<to>_<isa>(dst, src, n): n elements, dst and src
 * aligned to their element size and not overlapping.  The scalar variants
 * define the results and every other path gives them to the bit, NaN payloads
 * included (the hardware conversions quiet signalling NaNs, and AVX-512 BF16
 * reads denormals as zero: a vector holding such a lane is redone in scalar).
 *   f32 -> f16   round to nearest even, as numpy's astype(float16): overflow
 *                to inf, subnormal halves, a NaN keeps the top 10 bits of its
 *                payload (0x7c00 | mant >> 13, made 0x7c01 if that is inf).
 *   f16 -> f32   exact; a NaN's payload is shifted, not quieted (numpy).
 *   f32 -> bf16  round to nearest even, subnormals kept, as ml_dtypes'
 *                bfloat16: every NaN becomes the quiet NaN 0x7fc0, sign kept.
 *   bf16 -> f32  the bits shifted up by 16.
 *
 * kvc_quant_i8_<isa>(dst, scales, src, n_groups, group) quantizes n_groups
 * groups of `group` floats (one token's head) to int8 with one scale each:
 *   scale = max|x| / 127.0f, q = rint(x / scale) clamped to [-127, 127],
 * float32 divisions, rint in the current rounding mode (nearest even by
 * default).  A scale of 0 (all zeros, or max|x| so small that it underflows)
 * gives q = 0.  A group holding an inf or a NaN gets scale NaN (0x7fc00000)
 * and q = 0: it dequantizes to NaN.  kvc_dequant_i8_<isa> gives
 * x' = (float)q * scale.  For a normal scale, |x - x'| <= scale / 2 up to the
 * roundings of x / scale and q * scale (scale * 2^-16 in all); a subnormal or
 * zero scale adds at most 64 * 2^-149 (the clamp, the underflow).  Only a
 * group whose max|x| is FLT_MAX misses it: 127 * scale rounds up to inf.
 */
#ifndef KVC_SIMD_H
#define KVC_SIMD_H

#include <math.h>
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
typedef uint32_t (*kvc_crc32c_fn)(uint32_t crc, const void *buf, size_t n);
typedef void (*kvc_add_rows_fn)(float *acc, const float *rows, size_t n_rows, size_t n_cols,
                                size_t row_stride);
typedef void (*kvc_cvt_fn)(void *dst, const void *src, size_t n); /* n elements */
typedef void (*kvc_quant_fn)(int8_t *dst, float *scales, const float *src, size_t n_groups,
                             size_t group);
typedef void (*kvc_dequant_fn)(float *dst, const int8_t *src, const float *scales,
                               size_t n_groups, size_t group);

/* The conversions, as kvc_simd_cvt_fn() numbers them. */
enum { KVC_CVT_F32_F16, KVC_CVT_F16_F32, KVC_CVT_F32_BF16, KVC_CVT_BF16_F32, KVC_N_CVT };

/* Below this, streaming stores lose: partly filled write-combining buffers
 * and a fence cost more than the read-for-ownership they save. */
#ifndef KVC_NT_MIN_BYTES
#define KVC_NT_MIN_BYTES 2048
#endif

/* The scalar oracles run one element per iteration: vectorisation and
 * memcpy idiom recognition are turned off so that "scalar" means scalar when
 * a benchmark compares it with the SIMD paths. */
#if defined(__clang__)
#  define KVC_SCALAR_FN
#  define KVC_SCALAR_LOOP _Pragma("clang loop vectorize(disable) interleave(disable)")
#elif defined(__GNUC__)
#  define KVC_SCALAR_FN \
    __attribute__((optimize("no-tree-vectorize", "no-tree-loop-distribute-patterns")))
#  define KVC_SCALAR_LOOP
#else
#  define KVC_SCALAR_FN
#  define KVC_SCALAR_LOOP
#endif

KVC_SCALAR_FN
static inline void kvc_copy_scalar(void *dst, const void *src, size_t n)
{
    uint32_t *d = (uint32_t *)dst;
    const uint32_t *s = (const uint32_t *)src;
    KVC_SCALAR_LOOP
    for (size_t i = 0; i < n; i++) d[i] = s[i];
}

KVC_SCALAR_FN
static inline void kvc_add_rows_scalar(float *acc, const float *rows, size_t n_rows,
                                       size_t n_cols, size_t row_stride)
{
    for (size_t r = 0; r < n_rows; r++) {
        const float *row = rows + r * row_stride;
        KVC_SCALAR_LOOP
        for (size_t c = 0; c < n_cols; c++) acc[c] += row[c];
    }
}

/* CRC32C one byte at a time, reflected polynomial 0x82F63B78: the reference
 * the hardware paths are tested against.  kvc_crc32c_table[b] is the CRC
 * register after byte b from a zero register (no inversions). */
static const uint32_t kvc_crc32c_table[256] = {
    0x00000000, 0xf26b8303, 0xe13b70f7, 0x1350f3f4, 0xc79a971f, 0x35f1141c,
    0x26a1e7e8, 0xd4ca64eb, 0x8ad958cf, 0x78b2dbcc, 0x6be22838, 0x9989ab3b,
    0x4d43cfd0, 0xbf284cd3, 0xac78bf27, 0x5e133c24, 0x105ec76f, 0xe235446c,
    0xf165b798, 0x030e349b, 0xd7c45070, 0x25afd373, 0x36ff2087, 0xc494a384,
    0x9a879fa0, 0x68ec1ca3, 0x7bbcef57, 0x89d76c54, 0x5d1d08bf, 0xaf768bbc,
    0xbc267848, 0x4e4dfb4b, 0x20bd8ede, 0xd2d60ddd, 0xc186fe29, 0x33ed7d2a,
    0xe72719c1, 0x154c9ac2, 0x061c6936, 0xf477ea35, 0xaa64d611, 0x580f5512,
    0x4b5fa6e6, 0xb93425e5, 0x6dfe410e, 0x9f95c20d, 0x8cc531f9, 0x7eaeb2fa,
    0x30e349b1, 0xc288cab2, 0xd1d83946, 0x23b3ba45, 0xf779deae, 0x05125dad,
    0x1642ae59, 0xe4292d5a, 0xba3a117e, 0x4851927d, 0x5b016189, 0xa96ae28a,
    0x7da08661, 0x8fcb0562, 0x9c9bf696, 0x6ef07595, 0x417b1dbc, 0xb3109ebf,
    0xa0406d4b, 0x522bee48, 0x86e18aa3, 0x748a09a0, 0x67dafa54, 0x95b17957,
    0xcba24573, 0x39c9c670, 0x2a993584, 0xd8f2b687, 0x0c38d26c, 0xfe53516f,
    0xed03a29b, 0x1f682198, 0x5125dad3, 0xa34e59d0, 0xb01eaa24, 0x42752927,
    0x96bf4dcc, 0x64d4cecf, 0x77843d3b, 0x85efbe38, 0xdbfc821c, 0x2997011f,
    0x3ac7f2eb, 0xc8ac71e8, 0x1c661503, 0xee0d9600, 0xfd5d65f4, 0x0f36e6f7,
    0x61c69362, 0x93ad1061, 0x80fde395, 0x72966096, 0xa65c047d, 0x5437877e,
    0x4767748a, 0xb50cf789, 0xeb1fcbad, 0x197448ae, 0x0a24bb5a, 0xf84f3859,
    0x2c855cb2, 0xdeeedfb1, 0xcdbe2c45, 0x3fd5af46, 0x7198540d, 0x83f3d70e,
    0x90a324fa, 0x62c8a7f9, 0xb602c312, 0x44694011, 0x5739b3e5, 0xa55230e6,
    0xfb410cc2, 0x092a8fc1, 0x1a7a7c35, 0xe811ff36, 0x3cdb9bdd, 0xceb018de,
    0xdde0eb2a, 0x2f8b6829, 0x82f63b78, 0x709db87b, 0x63cd4b8f, 0x91a6c88c,
    0x456cac67, 0xb7072f64, 0xa457dc90, 0x563c5f93, 0x082f63b7, 0xfa44e0b4,
    0xe9141340, 0x1b7f9043, 0xcfb5f4a8, 0x3dde77ab, 0x2e8e845f, 0xdce5075c,
    0x92a8fc17, 0x60c37f14, 0x73938ce0, 0x81f80fe3, 0x55326b08, 0xa759e80b,
    0xb4091bff, 0x466298fc, 0x1871a4d8, 0xea1a27db, 0xf94ad42f, 0x0b21572c,
    0xdfeb33c7, 0x2d80b0c4, 0x3ed04330, 0xccbbc033, 0xa24bb5a6, 0x502036a5,
    0x4370c551, 0xb11b4652, 0x65d122b9, 0x97baa1ba, 0x84ea524e, 0x7681d14d,
    0x2892ed69, 0xdaf96e6a, 0xc9a99d9e, 0x3bc21e9d, 0xef087a76, 0x1d63f975,
    0x0e330a81, 0xfc588982, 0xb21572c9, 0x407ef1ca, 0x532e023e, 0xa145813d,
    0x758fe5d6, 0x87e466d5, 0x94b49521, 0x66df1622, 0x38cc2a06, 0xcaa7a905,
    0xd9f75af1, 0x2b9cd9f2, 0xff56bd19, 0x0d3d3e1a, 0x1e6dcdee, 0xec064eed,
    0xc38d26c4, 0x31e6a5c7, 0x22b65633, 0xd0ddd530, 0x0417b1db, 0xf67c32d8,
    0xe52cc12c, 0x1747422f, 0x49547e0b, 0xbb3ffd08, 0xa86f0efc, 0x5a048dff,
    0x8ecee914, 0x7ca56a17, 0x6ff599e3, 0x9d9e1ae0, 0xd3d3e1ab, 0x21b862a8,
    0x32e8915c, 0xc083125f, 0x144976b4, 0xe622f5b7, 0xf5720643, 0x07198540,
    0x590ab964, 0xab613a67, 0xb831c993, 0x4a5a4a90, 0x9e902e7b, 0x6cfbad78,
    0x7fab5e8c, 0x8dc0dd8f, 0xe330a81a, 0x115b2b19, 0x020bd8ed, 0xf0605bee,
    0x24aa3f05, 0xd6c1bc06, 0xc5914ff2, 0x37faccf1, 0x69e9f0d5, 0x9b8273d6,
    0x88d28022, 0x7ab90321, 0xae7367ca, 0x5c18e4c9, 0x4f48173d, 0xbd23943e,
    0xf36e6f75, 0x0105ec76, 0x12551f82, 0xe03e9c81, 0x34f4f86a, 0xc69f7b69,
    0xd5cf889d, 0x27a40b9e, 0x79b737ba, 0x8bdcb4b9, 0x988c474d, 0x6ae7c44e,
    0xbe2da0a5, 0x4c4623a6, 0x5f16d052, 0xad7d5351,
};

static inline uint32_t kvc_crc32c_scalar(uint32_t crc, const void *buf, size_t n)
{
    const unsigned char *p = (const unsigned char *)buf;
    crc = ~crc;
    for (size_t i = 0; i < n; i++)
        crc = kvc_crc32c_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static inline uint32_t kvc_f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static inline float kvc_bits_f32(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* v >> k rounded to nearest, ties to even; the carry may run into the
 * exponent bits above, which is the right result (up to inf). */
static inline uint32_t kvc_rne_shift(uint32_t v, unsigned k)
{
    return (v + (1u << (k - 1)) - 1u + ((v >> k) & 1u)) >> k;
}

/* numpy's npy_floatbits_to_halfbits, as exact rounding instead of its
 * shifted-out-bits bookkeeping. */
static inline uint16_t kvc_f32_to_f16_bits(uint32_t f)
{
    uint16_t sign = (uint16_t)((f >> 16) & 0x8000u);
    uint32_t a = f & 0x7fffffffu;
    if (a > 0x7f800000u) {
        uint16_t h = (uint16_t)(0x7c00u | (a & 0x007fffffu) >> 13);
        return sign | (h == 0x7c00u ? 0x7c01u : h);
    }
    if (a >= 0x47800000u) return sign | 0x7c00u;  /* 2^16 or more: inf */
    if (a >= 0x38800000u)                         /* 2^-14 or more: a normal half */
        return sign | (uint16_t)kvc_rne_shift(a - 0x38000000u, 13);
    if (a < 0x33000000u) return sign;             /* 2^-25 or less: zero */
    uint32_t k = 126 - (a >> 23);                 /* subnormal half: units of 2^-24 */
    return sign | (uint16_t)kvc_rne_shift(0x00800000u | (a & 0x007fffffu), k);
}

static inline uint32_t kvc_f16_to_f32_bits(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, a = h & 0x7fffu;
    if (a >= 0x7c00u) return sign | 0x7f800000u | (a & 0x3ffu) << 13;
    if (a >= 0x0400u) return sign | (a + 0x1c000u) << 13; /* exponent bias 15 -> 127 */
    if (a == 0) return sign;
    uint32_t e = 113; /* a subnormal half, normalised */
    for (; !(a & 0x0400u); a <<= 1) e--;
    return sign | e << 23 | (a & 0x3ffu) << 13;
}

static inline uint16_t kvc_f32_to_bf16_bits(uint32_t f)
{
    if ((f & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((f >> 16) & 0x8000u) | 0x7fc0u);
    return (uint16_t)kvc_rne_shift(f, 16);
}

/* The scalar conversions are integer code, f16 subnormals included: the
 * vector paths call them for their tails and for the vectors they redo, and
 * SSE instructions called from AVX code would pay for the upper halves of
 * the registers left dirty. */
KVC_SCALAR_FN
static inline void kvc_f32_to_f16_scalar(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const uint32_t *s = (const uint32_t *)src;
    KVC_SCALAR_LOOP
    for (size_t i = 0; i < n; i++) d[i] = kvc_f32_to_f16_bits(s[i]);
}

KVC_SCALAR_FN
static inline void kvc_f16_to_f32_scalar(void *dst, const void *src, size_t n)
{
    uint32_t *d = (uint32_t *)dst;
    const uint16_t *s = (const uint16_t *)src;
    KVC_SCALAR_LOOP
    for (size_t i = 0; i < n; i++) d[i] = kvc_f16_to_f32_bits(s[i]);
}

KVC_SCALAR_FN
static inline void kvc_f32_to_bf16_scalar(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const uint32_t *s = (const uint32_t *)src;
    KVC_SCALAR_LOOP
    for (size_t i = 0; i < n; i++) d[i] = kvc_f32_to_bf16_bits(s[i]);
}

KVC_SCALAR_FN
static inline void kvc_bf16_to_f32_scalar(void *dst, const void *src, size_t n)
{
    uint32_t *d = (uint32_t *)dst;
    const uint16_t *s = (const uint16_t *)src;
    KVC_SCALAR_LOOP
    for (size_t i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
}

/* max|x| of a group is taken on the bits: for |x| they order like the
 * values, and the NaNs come above inf, so an integer max needs no NaN rules
 * and any order of the comparisons gives the same result.
 *
 * The vector paths do their groups' last elements with these inline helpers,
 * not with the oracles: GCC inlines no KVC_SCALAR_FN function into them, and
 * a call into SSE code from AVX code, once per group, cost AVX2's dequant
 * three times its time. */
static inline uint32_t kvc_abs_max_step(uint32_t m, float x)
{
    uint32_t a = kvc_f32_bits(x) & 0x7fffffffu;
    return a > m ? a : m;
}

static inline float kvc_i8_scale(uint32_t abs_max_bits)
{
    if (abs_max_bits >= 0x7f800000u) return kvc_bits_f32(0x7fc00000u); /* inf or NaN */
    return kvc_bits_f32(abs_max_bits) / 127.0f;
}

/* One value with a scale > 0.  The clamp comes first: rounding is monotone
 * and keeps the integer bounds, so that is the same as clamping rint(v). */
static inline int8_t kvc_quant_i8_one(float x, float scale)
{
    float v = x / scale;
    v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
    return (int8_t)rintf(v);
}

KVC_SCALAR_FN
static inline void kvc_quant_i8_scalar(int8_t *dst, float *scales, const float *src,
                                       size_t n_groups, size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        uint32_t amax = 0;
        KVC_SCALAR_LOOP
        for (size_t i = 0; i < group; i++) amax = kvc_abs_max_step(amax, src[i]);
        float scale = scales[g] = kvc_i8_scale(amax);
        KVC_SCALAR_LOOP
        for (size_t i = 0; i < group; i++)
            dst[i] = scale > 0.0f ? kvc_quant_i8_one(src[i], scale) : 0;
    }
}

KVC_SCALAR_FN
static inline void kvc_dequant_i8_scalar(float *dst, const int8_t *src, const float *scales,
                                         size_t n_groups, size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        float scale = scales[g];
        KVC_SCALAR_LOOP
        for (size_t i = 0; i < group; i++) dst[i] = (float)src[i] * scale;
    }
}

/* Floats to copy before dst reaches a `width`-byte boundary (capped at n).
 * Aligning the destination keeps every vector store inside one cache line. */
static inline size_t kvc_head_floats(const void *dst, size_t n, size_t width)
{
    size_t mis = (size_t)((uintptr_t)dst & (width - 1));
    size_t head = mis ? (width - mis) / 4 : 0;
    return head < n ? head : n;
}

/* The vector add_rows take up to this many rows per pass over acc: enough to
 * amortise loading and storing acc, few enough for the rows to stream in from
 * memory side by side. */
#define KVC_ROWS_PER_PASS 8

static inline size_t kvc_rows_this_pass(size_t rows_left)
{
    return rows_left < KVC_ROWS_PER_PASS ? rows_left : KVC_ROWS_PER_PASS;
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

static inline void kvc_add_rows_sse2(float *acc, const float *rows, size_t n_rows,
                                     size_t n_cols, size_t row_stride)
{
    for (size_t r = 0; r < n_rows; r += KVC_ROWS_PER_PASS) {
        const float *p = rows + r * row_stride;
        size_t k = kvc_rows_this_pass(n_rows - r), c = 0;
        for (; c + 4 <= n_cols; c += 4) {
            __m128 a = _mm_loadu_ps(acc + c);
            for (size_t g = 0; g < k; g++)
                a = _mm_add_ps(a, _mm_loadu_ps(p + g * row_stride + c));
            _mm_storeu_ps(acc + c, a);
        }
        kvc_add_rows_scalar(acc + c, p + c, k, n_cols - c, row_stride);
    }
}

/* SSE2 has no half-precision conversion: that path converts f16 in scalar.
 * bf16 and int8 are integer and float arithmetic it has. */

/* Four floats rounded to bf16, in the high halves of the lanes, shifted down
 * with their sign so that _mm_packs_epi32 keeps them as they are. */
static inline __m128i kvc_bf16_round_sse2(__m128i x)
{
    __m128i lsb = _mm_and_si128(_mm_srli_epi32(x, 16), _mm_set1_epi32(1));
    __m128i r = _mm_add_epi32(_mm_add_epi32(x, _mm_set1_epi32(0x7fff)), lsb);
    __m128i nan = _mm_cmpgt_epi32(_mm_and_si128(x, _mm_set1_epi32(0x7fffffff)),
                                  _mm_set1_epi32(0x7f800000));
    __m128i qnan = _mm_or_si128(_mm_and_si128(x, _mm_set1_epi32((int)0x80000000u)),
                                _mm_set1_epi32(0x7fc00000));
    r = _mm_or_si128(_mm_and_si128(nan, qnan), _mm_andnot_si128(nan, r));
    return _mm_srai_epi32(r, 16);
}

static inline void kvc_f32_to_bf16_sse2(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const float *s = (const float *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i a = kvc_bf16_round_sse2(_mm_castps_si128(_mm_loadu_ps(s + i)));
        __m128i b = kvc_bf16_round_sse2(_mm_castps_si128(_mm_loadu_ps(s + i + 4)));
        _mm_storeu_si128((__m128i *)(d + i), _mm_packs_epi32(a, b));
    }
    kvc_f32_to_bf16_scalar(d + i, s + i, n - i);
}

static inline void kvc_bf16_to_f32_sse2(void *dst, const void *src, size_t n)
{
    float *d = (float *)dst;
    const uint16_t *s = (const uint16_t *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(s + i)), z = _mm_setzero_si128();
        _mm_storeu_si128((__m128i *)(d + i), _mm_unpacklo_epi16(z, h));
        _mm_storeu_si128((__m128i *)(d + i + 4), _mm_unpackhi_epi16(z, h));
    }
    kvc_bf16_to_f32_scalar(d + i, s + i, n - i);
}

/* Four int32 of q rounded from v / scale, as kvc_quant_i8_one does it:
 * clamped, then converted in the current rounding mode like rintf. */
static inline __m128i kvc_quant4_sse2(__m128 v, __m128 scale)
{
    v = _mm_min_ps(_mm_max_ps(_mm_div_ps(v, scale), _mm_set1_ps(-127.0f)), _mm_set1_ps(127.0f));
    return _mm_cvtps_epi32(v);
}

static inline void kvc_quant_i8_sse2(int8_t *dst, float *scales, const float *src,
                                     size_t n_groups, size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        __m128i m = _mm_setzero_si128();
        size_t i = 0;
        for (; i + 4 <= group; i += 4) { /* below 2^31: a signed compare will do */
            __m128i a = _mm_and_si128(_mm_castps_si128(_mm_loadu_ps(src + i)),
                                      _mm_set1_epi32(0x7fffffff));
            __m128i gt = _mm_cmpgt_epi32(a, m);
            m = _mm_or_si128(_mm_and_si128(gt, a), _mm_andnot_si128(gt, m));
        }
        uint32_t lanes[4], amax = 0;
        _mm_storeu_si128((__m128i *)lanes, m);
        for (int k = 0; k < 4; k++) amax = lanes[k] > amax ? lanes[k] : amax;
        for (; i < group; i++) amax = kvc_abs_max_step(amax, src[i]);
        float scale = scales[g] = kvc_i8_scale(amax);
        if (!(scale > 0.0f)) {
            memset(dst, 0, group);
            continue;
        }
        __m128 sv = _mm_set1_ps(scale);
        for (i = 0; i + 8 <= group; i += 8) {
            __m128i w = _mm_packs_epi32(kvc_quant4_sse2(_mm_loadu_ps(src + i), sv),
                                        kvc_quant4_sse2(_mm_loadu_ps(src + i + 4), sv));
            _mm_storel_epi64((__m128i *)(dst + i), _mm_packs_epi16(w, w));
        }
        for (; i < group; i++) dst[i] = kvc_quant_i8_one(src[i], scale);
    }
}

static inline void kvc_dequant_i8_sse2(float *dst, const int8_t *src, const float *scales,
                                       size_t n_groups, size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        float scale = scales[g];
        __m128 sv = _mm_set1_ps(scale);
        size_t i = 0;
        for (; i + 8 <= group; i += 8) {
            /* each byte doubled to 16 and to 32 bits, then shifted down with its sign */
            __m128i b = _mm_loadl_epi64((const __m128i *)(src + i));
            __m128i w = _mm_unpacklo_epi8(b, b);
            __m128i lo = _mm_srai_epi32(_mm_unpacklo_epi16(w, w), 24);
            __m128i hi = _mm_srai_epi32(_mm_unpackhi_epi16(w, w), 24);
            _mm_storeu_ps(dst + i, _mm_mul_ps(_mm_cvtepi32_ps(lo), sv));
            _mm_storeu_ps(dst + i + 4, _mm_mul_ps(_mm_cvtepi32_ps(hi), sv));
        }
        for (; i < group; i++) dst[i] = (float)src[i] * scale;
    }
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

static inline void kvc_add_rows_neon(float *acc, const float *rows, size_t n_rows,
                                     size_t n_cols, size_t row_stride)
{
    for (size_t r = 0; r < n_rows; r += KVC_ROWS_PER_PASS) {
        const float *p = rows + r * row_stride;
        size_t k = kvc_rows_this_pass(n_rows - r), c = 0;
        for (; c + 4 <= n_cols; c += 4) {
            float32x4_t a = vld1q_f32(acc + c);
            for (size_t g = 0; g < k; g++)
                a = vaddq_f32(a, vld1q_f32(p + g * row_stride + c));
            vst1q_f32(acc + c, a);
        }
        kvc_add_rows_scalar(acc + c, p + c, k, n_cols - c, row_stride);
    }
}

/* FCVTN/FCVTL quiet signalling NaNs: a vector holding a NaN is redone in
 * scalar, which keeps numpy's payload. */
static inline int kvc_any_nan_neon(float32x4_t a, float32x4_t b)
{
    return vminvq_u32(vandq_u32(vceqq_f32(a, a), vceqq_f32(b, b))) == 0;
}

static inline void kvc_f32_to_f16_neon(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const float *s = (const float *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float32x4_t a = vld1q_f32(s + i), b = vld1q_f32(s + i + 4);
        vst1q_u16(d + i, vreinterpretq_u16_f16(vcvt_high_f16_f32(vcvt_f16_f32(a), b)));
        if (kvc_any_nan_neon(a, b)) kvc_f32_to_f16_scalar(d + i, s + i, 8);
    }
    kvc_f32_to_f16_scalar(d + i, s + i, n - i);
}

static inline void kvc_f16_to_f32_neon(void *dst, const void *src, size_t n)
{
    float *d = (float *)dst;
    const uint16_t *s = (const uint16_t *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(s + i));
        float32x4_t a = vcvt_f32_f16(vget_low_f16(h)), b = vcvt_high_f32_f16(h);
        vst1q_f32(d + i, a);
        vst1q_f32(d + i + 4, b);
        if (kvc_any_nan_neon(a, b)) kvc_f16_to_f32_scalar(d + i, s + i, 8);
    }
    kvc_f16_to_f32_scalar(d + i, s + i, n - i);
}

/* Four floats rounded to bf16 (kvc_f32_to_bf16_bits), narrowed to 16 bits. */
static inline uint16x4_t kvc_bf16_round_neon(uint32x4_t x)
{
    uint32x4_t lsb = vandq_u32(vshrq_n_u32(x, 16), vdupq_n_u32(1));
    uint32x4_t r = vaddq_u32(vaddq_u32(x, vdupq_n_u32(0x7fff)), lsb);
    uint32x4_t nan = vcgtq_u32(vandq_u32(x, vdupq_n_u32(0x7fffffff)), vdupq_n_u32(0x7f800000));
    uint32x4_t qnan = vorrq_u32(vandq_u32(x, vdupq_n_u32(0x80000000u)), vdupq_n_u32(0x7fc00000));
    return vshrn_n_u32(vbslq_u32(nan, qnan, r), 16);
}

static inline void kvc_f32_to_bf16_neon(void *dst, const void *src, size_t n)
{
    uint16_t *d = (uint16_t *)dst;
    const uint32_t *s = (const uint32_t *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        vst1q_u16(d + i, vcombine_u16(kvc_bf16_round_neon(vld1q_u32(s + i)),
                                      kvc_bf16_round_neon(vld1q_u32(s + i + 4))));
    kvc_f32_to_bf16_scalar(d + i, s + i, n - i);
}

static inline void kvc_bf16_to_f32_neon(void *dst, const void *src, size_t n)
{
    uint32_t *d = (uint32_t *)dst;
    const uint16_t *s = (const uint16_t *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t h = vld1q_u16(s + i);
        vst1q_u32(d + i, vshll_n_u16(vget_low_u16(h), 16));
        vst1q_u32(d + i + 4, vshll_high_n_u16(h, 16));
    }
    kvc_bf16_to_f32_scalar(d + i, s + i, n - i);
}

/* As kvc_quant_i8_one: clamp, then FRINTI rounds in the current mode like rintf. */
static inline int16x4_t kvc_quant4_neon(float32x4_t v, float32x4_t scale)
{
    v = vminq_f32(vmaxq_f32(vdivq_f32(v, scale), vdupq_n_f32(-127.0f)), vdupq_n_f32(127.0f));
    return vqmovn_s32(vcvtq_s32_f32(vrndiq_f32(v)));
}

static inline void kvc_quant_i8_neon(int8_t *dst, float *scales, const float *src,
                                     size_t n_groups, size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        uint32x4_t m = vdupq_n_u32(0);
        size_t i = 0;
        for (; i + 4 <= group; i += 4)
            m = vmaxq_u32(m, vandq_u32(vld1q_u32((const uint32_t *)(src + i)),
                                       vdupq_n_u32(0x7fffffff)));
        uint32_t amax = vmaxvq_u32(m);
        for (; i < group; i++) amax = kvc_abs_max_step(amax, src[i]);
        float scale = scales[g] = kvc_i8_scale(amax);
        if (!(scale > 0.0f)) {
            memset(dst, 0, group);
            continue;
        }
        float32x4_t sv = vdupq_n_f32(scale);
        for (i = 0; i + 8 <= group; i += 8)
            vst1_s8(dst + i, vqmovn_s16(vcombine_s16(kvc_quant4_neon(vld1q_f32(src + i), sv),
                                                     kvc_quant4_neon(vld1q_f32(src + i + 4), sv))));
        for (; i < group; i++) dst[i] = kvc_quant_i8_one(src[i], scale);
    }
}

static inline void kvc_dequant_i8_neon(float *dst, const int8_t *src, const float *scales,
                                       size_t n_groups, size_t group)
{
    for (size_t g = 0; g < n_groups; g++, dst += group, src += group) {
        float scale = scales[g];
        size_t i = 0;
        for (; i + 8 <= group; i += 8) {
            int16x8_t w = vmovl_s8(vld1_s8(src + i));
            vst1q_f32(dst + i, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), scale));
            vst1q_f32(dst + i + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(w)), scale));
        }
        for (; i < group; i++) dst[i] = (float)src[i] * scale;
    }
}

/* The CRC32 instructions are optional in ARMv8.0: this function carries its
 * own target, and kvc_dispatch.c offers it only when the CPU has them.  Its
 * 8-byte loads take the bytes in little-endian order, as the CRC needs. */
#if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#  include <arm_acle.h>
#  define KVC_ARM_CRC32C 1

__attribute__((target("+crc")))
static inline uint32_t kvc_crc32c_arm(uint32_t crc, const void *buf, size_t n)
{
    const unsigned char *p = (const unsigned char *)buf;
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc = __crc32cd(crc, v);
    }
    for (; n; n--) crc = __crc32cb(crc, *p++);
    return ~crc;
}
#endif
#endif

/* Paths with no streaming store of their own reuse the plain copy. */
#define kvc_copy_scalar_nt kvc_copy_scalar
#define kvc_copy_neon_nt kvc_copy_neon

/* Run-time selection (src/kvc_dispatch.c).  The table is filled once, at the
 * first call of kvc_simd_init(); kvc_simd_force() may change it later. */
typedef struct kvc_simd_ops {
    kvc_copy_fn copy;         /* out of the cache: plain stores */
    kvc_copy_fn copy_nt;      /* into the cache: streaming stores when large */
    kvc_crc32c_fn crc32c;     /* the path's CRC32C instructions, else the table */
    kvc_add_rows_fn add_rows;
    kvc_cvt_fn f32_to_f16, f16_to_f32, f32_to_bf16, bf16_to_f32;
    kvc_quant_fn quant_i8;
    kvc_dequant_fn dequant_i8;
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
kvc_crc32c_fn kvc_simd_crc32c_fn(int backend);            /* NULL if unavailable */
kvc_add_rows_fn kvc_simd_add_rows_fn(int backend);        /* NULL if unavailable */
kvc_cvt_fn kvc_simd_cvt_fn(int backend, int which);       /* KVC_CVT_*; NULL if unavailable */
kvc_quant_fn kvc_simd_quant_fn(int backend);              /* NULL if unavailable */
kvc_dequant_fn kvc_simd_dequant_fn(int backend);          /* NULL if unavailable */

#if defined(__x86_64__) || defined(_M_X64)
void kvc_copy_avx2(void *dst, const void *src, size_t n);
void kvc_copy_avx2_nt(void *dst, const void *src, size_t n);
void kvc_copy_avx512(void *dst, const void *src, size_t n);
void kvc_copy_avx512_nt(void *dst, const void *src, size_t n);
void kvc_add_rows_avx2(float *acc, const float *rows, size_t n_rows, size_t n_cols,
                       size_t row_stride);
void kvc_add_rows_avx512(float *acc, const float *rows, size_t n_rows, size_t n_cols,
                         size_t row_stride);
uint32_t kvc_crc32c_sse42(uint32_t crc, const void *buf, size_t n);
void kvc_f32_to_f16_avx2(void *dst, const void *src, size_t n);
void kvc_f16_to_f32_avx2(void *dst, const void *src, size_t n);
void kvc_f32_to_bf16_avx2(void *dst, const void *src, size_t n);
void kvc_bf16_to_f32_avx2(void *dst, const void *src, size_t n);
void kvc_quant_i8_avx2(int8_t *dst, float *scales, const float *src, size_t n_groups,
                       size_t group);
void kvc_dequant_i8_avx2(float *dst, const int8_t *src, const float *scales, size_t n_groups,
                         size_t group);
void kvc_f32_to_f16_avx512(void *dst, const void *src, size_t n);
void kvc_f16_to_f32_avx512(void *dst, const void *src, size_t n);
void kvc_f32_to_bf16_avx512(void *dst, const void *src, size_t n);
void kvc_f32_to_bf16_avx512bf16(void *dst, const void *src, size_t n); /* if the CPU has it */
void kvc_bf16_to_f32_avx512(void *dst, const void *src, size_t n);
void kvc_quant_i8_avx512(int8_t *dst, float *scales, const float *src, size_t n_groups,
                         size_t group);
void kvc_dequant_i8_avx512(float *dst, const int8_t *src, const float *scales, size_t n_groups,
                           size_t group);
#endif

#ifdef __cplusplus
}
#endif
#endif /* KVC_SIMD_H */
