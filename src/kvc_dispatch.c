/* Run-time choice of the copy path: CPU detection once, KVCACHE_SIMD to force. */
#include <stdlib.h>
#include <string.h>
#include "kvc_simd.h"

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

/* AVX state needs both the CPU bit and the OS saving the registers (XCR0). */
static int kvc_x86_has(int backend)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx) return 0;
    unsigned long long xcr0 = kvc_xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return 0;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (backend == KVC_AVX2) return (b >> 5) & 1;
    if (backend == KVC_AVX512) return ((b >> 16) & 1) && (xcr0 & 0xe6) == 0xe6;
    return 0;
}
#endif

static const char *const kvc_names[KVC_N_BACKENDS] = {"scalar", "sse2", "avx2", "avx512", "neon"};

kvc_simd_ops kvc_simd = {kvc_copy_scalar, kvc_copy_scalar_nt, KVC_SCALAR};

/* CPU features are read once; CPUID is slow under some hypervisors. */
static int kvc_has_cache[KVC_N_BACKENDS] = {-1, -1, -1, -1, -1};

static int kvc_has(int backend)
{
    if (kvc_has_cache[backend] < 0) {
        int has = backend == KVC_SCALAR;
#if KVC_VECTOR == KVC_SSE2
        has |= backend == KVC_SSE2;
#endif
#if KVC_VECTOR == KVC_NEON
        has |= backend == KVC_NEON;
#endif
#ifdef KVC_X86
        if (backend == KVC_AVX2 || backend == KVC_AVX512) has = kvc_x86_has(backend);
#endif
        kvc_has_cache[backend] = has;
    }
    return kvc_has_cache[backend];
}

kvc_copy_fn kvc_simd_copy_fn(int backend, int streaming)
{
    if (backend < 0 || backend >= KVC_N_BACKENDS || !kvc_has(backend)) return NULL;
    switch (backend) {
    case KVC_SCALAR: return streaming ? kvc_copy_scalar_nt : kvc_copy_scalar;
#if KVC_VECTOR == KVC_SSE2
    case KVC_SSE2: return streaming ? kvc_copy_sse2_nt : kvc_copy_sse2;
#endif
#if KVC_VECTOR == KVC_NEON
    case KVC_NEON: return streaming ? kvc_copy_neon_nt : kvc_copy_neon;
#endif
#ifdef KVC_X86
    case KVC_AVX2: return streaming ? kvc_copy_avx2_nt : kvc_copy_avx2;
    case KVC_AVX512: return streaming ? kvc_copy_avx512_nt : kvc_copy_avx512;
#endif
    default: return NULL;
    }
}

int kvc_simd_available(int backend) { return kvc_simd_copy_fn(backend, 0) != NULL; }

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
    kvc_copy_fn fn = kvc_simd_copy_fn(backend, 0);
    if (fn == NULL) return -1;
    kvc_simd.copy = fn;
    kvc_simd.copy_nt = kvc_simd_copy_fn(backend, 1);
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
