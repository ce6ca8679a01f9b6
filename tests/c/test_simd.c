/* Every copy path against the scalar oracle: sizes 0..KVC_TEST_MAX_N floats,
 * every float misalignment of source and destination within a 64-byte line,
 * with guard zones on both sides of the destination.  Runs natively for each
 * path the CPU has, and under qemu-aarch64 for NEON.  Exit status 0 = pass. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kvc_simd.h"

#ifndef KVC_TEST_MAX_N
#define KVC_TEST_MAX_N 4099
#endif
#ifndef KVC_TEST_MAX_OFF
#define KVC_TEST_MAX_OFF 16 /* floats: every 4-byte offset within a 64-byte line */
#endif
#define MAX_OFF KVC_TEST_MAX_OFF
#define GUARD 32
#define CANARY 0xA5A5A5A5u

static int check_backend(int backend, int streaming, const uint32_t *src_base, uint32_t *want,
                         uint32_t *got)
{
    kvc_copy_fn fn = kvc_simd_copy_fn(backend, streaming);
    long failures = 0, copies = 0;
    for (size_t n = 0; n <= KVC_TEST_MAX_N; n++) {
        for (size_t so = 0; so < MAX_OFF; so++) {
            for (size_t doff = 0; doff < MAX_OFF; doff++) {
                const uint32_t *src = src_base + so + (n * 7) % 64;
                for (size_t i = 0; i < n + 2 * GUARD + MAX_OFF; i++) want[i] = got[i] = CANARY;
                kvc_copy_scalar(want + GUARD + doff, src, n);
                fn(got + GUARD + doff, src, n);
                copies++;
                if (memcmp(want, got, (n + 2 * GUARD + MAX_OFF) * 4) != 0 ||
                    memcmp(want + GUARD + doff, src, n * 4) != 0) {
                    if (failures++ < 5)
                        fprintf(stderr, "FAIL %s%s n=%zu src_off=%zu dst_off=%zu\n",
                                kvc_simd_name(backend), streaming ? "_nt" : "", n, so, doff);
                }
            }
        }
    }
    printf("%-10s %ld copies, %ld failures\n", streaming ? "(nt)" : kvc_simd_name(backend),
           copies, failures);
    return failures != 0;
}

int main(int argc, char **argv)
{
    size_t cap = KVC_TEST_MAX_N + 2 * GUARD + 2 * MAX_OFF + 64;
    uint32_t *src = aligned_alloc(64, cap * 4 + 64);
    uint32_t *want = aligned_alloc(64, cap * 4 + 64);
    uint32_t *got = aligned_alloc(64, cap * 4 + 64);
    if (!src || !want || !got) return 2;
    for (size_t i = 0; i < cap; i++) src[i] = (uint32_t)(i * 2654435761u) ^ 0x7f800001u;

    int rc = 0, tested = 0;
    for (int b = 0; b < KVC_N_BACKENDS; b++) {
        if (argc > 1 && strcmp(argv[1], kvc_simd_name(b)) != 0) continue;
        if (!kvc_simd_available(b)) {
            printf("%-7s not available on this CPU/build\n", kvc_simd_name(b));
            continue;
        }
        rc |= check_backend(b, 0, src, want, got);
        if (kvc_simd_copy_fn(b, 1) != kvc_simd_copy_fn(b, 0)) /* else an alias */
            rc |= check_backend(b, 1, src, want, got);
        tested++;
    }
    /* The auto choice must be one of the available paths and usable. */
    if (kvc_simd_init() < 0 && getenv("KVCACHE_SIMD") != NULL) {
        fprintf(stderr, "KVCACHE_SIMD=%s is not available\n", getenv("KVCACHE_SIMD"));
        rc = 1;
    }
    printf("in use: %s; best: %s\n", kvc_simd_name(kvc_simd.backend), kvc_simd_name(kvc_simd_best()));
    if (argc > 1 && tested == 0) {
        fprintf(stderr, "backend %s not tested\n", argv[1]);
        rc = 1;
    }
    free(src); free(want); free(got);
    return rc;
}
