/* Run-time choice of the SIMD path: CPU detection once, KVCACHE_SIMD to force. */
#include <stdlib.h>
#include <string.h>
#include "kvc_simd.h"

#if defined(KVC_ARM_CRC32C) && defined(__linux__)
#include <sys/auxv.h>
#endif

/* Wider x86 paths are offered only on top of the SSE2 baseline: a build with
 * -DKVC_VECTOR=0 is scalar and nothing else. */
#if KVC_VECTOR == KVC_SSE2 && (defined(__x86_64__) || defined(_M_X64)) && \
    (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define KVC_X86 1

static unsigned long long kvc_xgetbv0(void)
{
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}

/* AVX state needs both the CPU bit and the OS saving the registers (XCR0).
 * The AVX2 path converts halves with F16C; the AVX-512 one uses BW and VL
 * (16-bit and byte masks): every such CPU has them, but ask.
 * KVC_AVX512BF16 is the AVX-512 path with the BF16 conversion instruction. */
#define KVC_AVX512BF16 (-2)

static int kvc_x86_has(int backend)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return 0;
    unsigned long long xcr0 = kvc_xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return 0;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    int max_leaf7 = (int)a;
    int avx512 = ((b >> 16) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1) && (xcr0 & 0xe6) == 0xe6;
    if (backend == KVC_AVX2) return ((b >> 5) & 1) && f16c;
    if (backend == KVC_AVX512) return avx512;
    if (backend == KVC_AVX512BF16 && avx512 && max_leaf7 >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        return (a >> 5) & 1;
    }
    return 0;
}
#endif

static const char *const kvc_names[KVC_N_BACKENDS] = {"scalar", "sse2", "avx2", "avx512", "neon"};

/* What each path runs, where this build has it (the others stay NULL).  A
 * hardware crc32c is used only if kvc_hw_crc32c() finds the instructions.
 * SSE2 has no half-precision conversion: it converts f16 in scalar. */
static const struct {
    kvc_copy_fn copy, copy_nt;
    kvc_crc32c_fn crc32c;
    kvc_add_rows_fn add_rows;
    kvc_cvt_fn cvt[KVC_N_CVT];
    kvc_quant_fn quant_i8;
    kvc_dequant_fn dequant_i8;
} kvc_paths[KVC_N_BACKENDS] = {
    [KVC_SCALAR] = {kvc_copy_scalar, kvc_copy_scalar_nt, kvc_crc32c_scalar, kvc_add_rows_scalar,
                    {kvc_f32_to_f16_scalar, kvc_f16_to_f32_scalar, kvc_f32_to_bf16_scalar,
                     kvc_bf16_to_f32_scalar},
                    kvc_quant_i8_scalar, kvc_dequant_i8_scalar},
#if KVC_VECTOR == KVC_SSE2
    [KVC_SSE2] = {kvc_copy_sse2, kvc_copy_sse2_nt, kvc_crc32c_scalar, kvc_add_rows_sse2,
                  {kvc_f32_to_f16_scalar, kvc_f16_to_f32_scalar, kvc_f32_to_bf16_sse2,
                   kvc_bf16_to_f32_sse2},
                  kvc_quant_i8_sse2, kvc_dequant_i8_sse2},
#endif
#if KVC_VECTOR == KVC_NEON
#  ifdef KVC_ARM_CRC32C
    [KVC_NEON] = {kvc_copy_neon, kvc_copy_neon_nt, kvc_crc32c_arm, kvc_add_rows_neon,
#  else
    [KVC_NEON] = {kvc_copy_neon, kvc_copy_neon_nt, kvc_crc32c_scalar, kvc_add_rows_neon,
#  endif
                  {kvc_f32_to_f16_neon, kvc_f16_to_f32_neon, kvc_f32_to_bf16_neon,
                   kvc_bf16_to_f32_neon},
                  kvc_quant_i8_neon, kvc_dequant_i8_neon},
#endif
#ifdef KVC_X86
    [KVC_AVX2] = {kvc_copy_avx2, kvc_copy_avx2_nt, kvc_crc32c_sse42, kvc_add_rows_avx2,
                  {kvc_f32_to_f16_avx2, kvc_f16_to_f32_avx2, kvc_f32_to_bf16_avx2,
                   kvc_bf16_to_f32_avx2},
                  kvc_quant_i8_avx2, kvc_dequant_i8_avx2},
    [KVC_AVX512] = {kvc_copy_avx512, kvc_copy_avx512_nt, kvc_crc32c_sse42, kvc_add_rows_avx512,
                    {kvc_f32_to_f16_avx512, kvc_f16_to_f32_avx512, kvc_f32_to_bf16_avx512,
                     kvc_bf16_to_f32_avx512},
                    kvc_quant_i8_avx512, kvc_dequant_i8_avx512},
#endif
};

kvc_simd_ops kvc_simd = {
    .copy = kvc_copy_scalar, .copy_nt = kvc_copy_scalar_nt, .crc32c = kvc_crc32c_scalar,
    .add_rows = kvc_add_rows_scalar,
    .f32_to_f16 = kvc_f32_to_f16_scalar, .f16_to_f32 = kvc_f16_to_f32_scalar,
    .f32_to_bf16 = kvc_f32_to_bf16_scalar, .bf16_to_f32 = kvc_bf16_to_f32_scalar,
    .quant_i8 = kvc_quant_i8_scalar, .dequant_i8 = kvc_dequant_i8_scalar,
    .backend = KVC_SCALAR,
};

/* CPU features are read once; CPUID is slow under some hypervisors. */
static int kvc_has_cache[KVC_N_BACKENDS] = {-1, -1, -1, -1, -1};

static int kvc_has(int backend)
{
    if (backend < 0 || backend >= KVC_N_BACKENDS || kvc_paths[backend].copy == NULL) return 0;
    if (kvc_has_cache[backend] < 0) {
        int has = 1;
#ifdef KVC_X86
        if (backend == KVC_AVX2 || backend == KVC_AVX512) has = kvc_x86_has(backend);
#endif
        kvc_has_cache[backend] = has;
    }
    return kvc_has_cache[backend];
}

/* The CRC32C instructions: SSE4.2 on x86 (every AVX2 CPU has it, but ask),
 * the CRC32 extension on AArch64. */
static int kvc_hw_crc32c(void)
{
    static int cached = -1;
    if (cached < 0) {
        int has = 0;
#ifdef KVC_X86
        unsigned int a, b, c, d;
        has = __get_cpuid(1, &a, &b, &c, &d) && ((c >> 20) & 1);
#elif defined(KVC_ARM_CRC32C) && defined(__linux__)
        has = (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
#elif defined(KVC_ARM_CRC32C) && defined(__ARM_FEATURE_CRC32)
        has = 1;
#endif
        cached = has;
    }
    return cached;
}

kvc_copy_fn kvc_simd_copy_fn(int backend, int streaming)
{
    if (!kvc_has(backend)) return NULL;
    return streaming ? kvc_paths[backend].copy_nt : kvc_paths[backend].copy;
}

kvc_crc32c_fn kvc_simd_crc32c_fn(int backend)
{
    if (!kvc_has(backend)) return NULL;
    return kvc_hw_crc32c() ? kvc_paths[backend].crc32c : kvc_crc32c_scalar;
}

kvc_add_rows_fn kvc_simd_add_rows_fn(int backend)
{
    return kvc_has(backend) ? kvc_paths[backend].add_rows : NULL;
}

kvc_cvt_fn kvc_simd_cvt_fn(int backend, int which)
{
    if (!kvc_has(backend) || which < 0 || which >= KVC_N_CVT) return NULL;
#ifdef KVC_X86
    static int bf16 = -1; /* CPUID once, as kvc_has() does */
    if (backend == KVC_AVX512 && which == KVC_CVT_F32_BF16) {
        if (bf16 < 0) bf16 = kvc_x86_has(KVC_AVX512BF16);
        if (bf16) return kvc_f32_to_bf16_avx512bf16;
    }
#endif
    return kvc_paths[backend].cvt[which];
}

kvc_quant_fn kvc_simd_quant_fn(int backend)
{
    return kvc_has(backend) ? kvc_paths[backend].quant_i8 : NULL;
}

kvc_dequant_fn kvc_simd_dequant_fn(int backend)
{
    return kvc_has(backend) ? kvc_paths[backend].dequant_i8 : NULL;
}

int kvc_simd_available(int backend) { return kvc_has(backend); }

int kvc_simd_best(void)
{
    static const int order[] = {KVC_AVX512, KVC_AVX2, KVC_NEON, KVC_SSE2, KVC_SCALAR};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (kvc_simd_available(order[i])) return order[i];
    return KVC_SCALAR;
}

const char *kvc_simd_name(int backend)
{
    return (backend >= 0 && backend < KVC_N_BACKENDS) ? kvc_names[backend] : "unknown";
}

int kvc_simd_from_name(const char *name)
{
    if (name == NULL || *name == '\0' || strcmp(name, "auto") == 0) return kvc_simd_best();
    for (int b = 0; b < KVC_N_BACKENDS; b++)
        if (strcmp(name, kvc_names[b]) == 0) return b;
    return -1;
}

int kvc_simd_force(int backend)
{
    if (!kvc_has(backend)) return -1;
    kvc_simd.copy = kvc_simd_copy_fn(backend, 0);
    kvc_simd.copy_nt = kvc_simd_copy_fn(backend, 1);
    kvc_simd.crc32c = kvc_simd_crc32c_fn(backend);
    kvc_simd.add_rows = kvc_simd_add_rows_fn(backend);
    kvc_simd.f32_to_f16 = kvc_simd_cvt_fn(backend, KVC_CVT_F32_F16);
    kvc_simd.f16_to_f32 = kvc_simd_cvt_fn(backend, KVC_CVT_F16_F32);
    kvc_simd.f32_to_bf16 = kvc_simd_cvt_fn(backend, KVC_CVT_F32_BF16);
    kvc_simd.bf16_to_f32 = kvc_simd_cvt_fn(backend, KVC_CVT_BF16_F32);
    kvc_simd.quant_i8 = kvc_simd_quant_fn(backend);
    kvc_simd.dequant_i8 = kvc_simd_dequant_fn(backend);
    kvc_simd.backend = backend;
    return 0;
}

int kvc_simd_init(void)
{
    int b = kvc_simd_from_name(getenv("KVCACHE_SIMD"));
    if (b < 0 || kvc_simd_force(b) != 0) {
        kvc_simd_force(kvc_simd_best());
        return -1;
    }
    return b;
}
