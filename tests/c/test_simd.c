/* Every copy path against the scalar oracle: sizes 0..KVC_TEST_MAX_N floats,
 * every float misalignment of source and destination within a 64-byte line,
 * with guard zones on both sides of the destination.  Then each path's CRC32C
 * and add_rows against theirs.  Runs natively for each path the CPU has, and
 * under qemu-aarch64 for NEON.  Exit status 0 = pass. */
#include <math.h>
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
#define CRC_MAX_N 1100            /* every CRC32C length up to here, at every start offset */
#define CRC_BUF ((1u << 20) + 64) /* bytes of test data: room for 1 MiB at any offset */
#define ROWS_MAX 20               /* add_rows: 0..ROWS_MAX rows of 0..COLS_MAX floats */
#define COLS_MAX 70
#define POOL ((ROWS_MAX + 2) * (COLS_MAX + MAX_OFF)) /* floats: rows, then acc's start values */

static int report(const char *what, long runs, long failures)
{
    printf("%-18s %ld runs, %ld failures\n", what, runs, failures);
    return failures != 0;
}

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
    return report(streaming ? "(nt)" : kvc_simd_name(backend), copies, failures);
}

/* CRC32C bit by bit, from the definition: checks the scalar oracle's table. */
static uint32_t crc32c_bitwise(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
    }
    return ~crc;
}

/* Known answers (RFC 3720, B.4), then every length up to CRC_MAX_N at every
 * start offset, long buffers around the SSE4.2 block sizes, and chaining:
 * crc(crc(0, a), b) == crc(0, a || b). */
static int check_crc32c(int backend, const unsigned char *data)
{
    kvc_crc32c_fn fn = kvc_simd_crc32c_fn(backend);
    long failures = 0, runs = 0;
    unsigned char zeros[32] = {0}, ones[32];
    memset(ones, 0xff, sizeof ones);
    failures += fn(0, "123456789", 9) != 0xE3069283u;
    failures += fn(0, zeros, 32) != 0x8A9136AAu;
    failures += fn(0, ones, 32) != 0x62A8AB43u;
    if (failures) fprintf(stderr, "FAIL crc32c %s: known answers\n", kvc_simd_name(backend));
    for (size_t n = 0; n <= CRC_MAX_N; n++) {
        for (size_t off = 0; off < 16; off++, runs++) {
            uint32_t seed = (uint32_t)(n * 2654435761u);
            if (fn(seed, data + off, n) != kvc_crc32c_scalar(seed, data + off, n) &&
                failures++ < 5)
                fprintf(stderr, "FAIL crc32c %s n=%zu off=%zu\n", kvc_simd_name(backend), n, off);
        }
    }
    static const size_t long_n[] = {3 * 256 - 1, 3 * 4096 - 1, 3 * 4096, 3 * 4096 + 3 * 256 + 13,
                                    7 * 3 * 4096 + 5 * 3 * 256 + 7, 1u << 20};
    for (size_t i = 0; i < sizeof long_n / sizeof long_n[0]; i++) {
        for (size_t off = 0; off < 16; off += 5, runs++) {
            if (fn(0, data + off, long_n[i]) != kvc_crc32c_scalar(0, data + off, long_n[i]) &&
                failures++ < 5)
                fprintf(stderr, "FAIL crc32c %s n=%zu off=%zu\n", kvc_simd_name(backend),
                        long_n[i], off);
        }
    }
    const size_t whole = 3 * 4096 + 1000;
    uint32_t want = kvc_crc32c_scalar(0, data, whole);
    for (size_t split = 0; split <= whole; split += 97, runs++) {
        if (fn(fn(0, data, split), data + split, whole - split) != want && failures++ < 5)
            fprintf(stderr, "FAIL crc32c %s chained at %zu\n", kvc_simd_name(backend), split);
    }
    int table = fn == kvc_simd_crc32c_fn(KVC_SCALAR);
    return report(table ? "(crc32c, table)" : "(crc32c, hardware)", runs, failures);
}

/* Same bits, or both NaN: a NaN's payload may depend on operand order. */
static int same_float(uint32_t a, uint32_t b)
{
    float x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return a == b || (isnan(x) && isnan(y));
}

/* Each shape up to ROWS_MAX x COLS_MAX at every misalignment of acc, with
 * rows at other offsets and row strides, and guards around acc. */
static int check_add_rows(int backend, const float *pool)
{
    kvc_add_rows_fn fn = kvc_simd_add_rows_fn(backend);
    long failures = 0, runs = 0;
    uint32_t want[COLS_MAX + 2 * GUARD + MAX_OFF], got[COLS_MAX + 2 * GUARD + MAX_OFF];
    for (size_t n_rows = 0; n_rows <= ROWS_MAX; n_rows++) {
        for (size_t n_cols = 0; n_cols <= COLS_MAX; n_cols++) {
            for (size_t ao = 0; ao < MAX_OFF; ao++, runs++) {
                size_t stride = n_cols + (ao * 3 + n_rows) % 7;
                const float *rows = pool + (ao * 5 + n_cols) % MAX_OFF;
                const float *init = pool + POOL - COLS_MAX - n_rows;
                for (size_t i = 0; i < sizeof want / 4; i++) want[i] = got[i] = CANARY;
                memcpy(want + GUARD + ao, init, n_cols * 4);
                memcpy(got + GUARD + ao, init, n_cols * 4);
                kvc_add_rows_scalar((float *)(want + GUARD + ao), rows, n_rows, n_cols, stride);
                fn((float *)(got + GUARD + ao), rows, n_rows, n_cols, stride);
                int ok = 1;
                for (size_t i = 0; i < sizeof want / 4; i++) ok &= same_float(want[i], got[i]);
                if (!ok && failures++ < 5)
                    fprintf(stderr, "FAIL add_rows %s rows=%zu cols=%zu acc_off=%zu stride=%zu\n",
                            kvc_simd_name(backend), n_rows, n_cols, ao, stride);
            }
        }
    }
    return report("(add_rows)", runs, failures);
}

/* Floats of mixed magnitudes (2^-8 .. 2^8), so that any other order of the
 * adds rounds differently, with infinities, NaNs, signed zeros, subnormals
 * and values that overflow when added. */
static void fill_floats(float *pool, size_t n)
{
    static const float special[] = {INFINITY, -INFINITY, NAN, -0.0f, 0.0f, 1e-40f, 3e38f, -3e38f};
    uint32_t x = 12345;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        uint32_t bits = (x & 0x807fffffu) | ((119u + (x >> 7) % 17) << 23);
        if (x % 29 == 0) memcpy(&bits, &special[(x >> 9) % 8], 4);
        memcpy(&pool[i], &bits, 4);
    }
}

int main(int argc, char **argv)
{
    size_t cap = KVC_TEST_MAX_N + 2 * GUARD + 2 * MAX_OFF + 64;
    uint32_t *src = aligned_alloc(64, cap * 4 + 64);
    uint32_t *want = aligned_alloc(64, cap * 4 + 64);
    uint32_t *got = aligned_alloc(64, cap * 4 + 64);
    unsigned char *data = malloc(CRC_BUF);
    float *pool = malloc(POOL * sizeof *pool);
    if (!src || !want || !got || !data || !pool) return 2;
    for (size_t i = 0; i < cap; i++) src[i] = (uint32_t)(i * 2654435761u) ^ 0x7f800001u;
    for (size_t i = 0; i < CRC_BUF; i++) data[i] = (unsigned char)((i * 2654435761u) >> 13);
    fill_floats(pool, POOL);

    int rc = 0, tested = 0;
    for (size_t n = 0; n <= 300; n++) {
        if (kvc_crc32c_scalar(0, data, n) != crc32c_bitwise(0, data, n)) {
            fprintf(stderr, "FAIL scalar crc32c n=%zu: not the bitwise definition\n", n);
            rc = 1;
        }
    }
    for (int b = 0; b < KVC_N_BACKENDS; b++) {
        if (argc > 1 && strcmp(argv[1], kvc_simd_name(b)) != 0) continue;
        if (!kvc_simd_available(b)) {
            printf("%-7s not available on this CPU/build\n", kvc_simd_name(b));
            continue;
        }
        rc |= check_backend(b, 0, src, want, got);
        if (kvc_simd_copy_fn(b, 1) != kvc_simd_copy_fn(b, 0)) /* else an alias */
            rc |= check_backend(b, 1, src, want, got);
        rc |= check_crc32c(b, data);
        rc |= check_add_rows(b, pool);
        /* Forcing a path fills every entry of the table with its functions. */
        if (kvc_simd_force(b) != 0 || kvc_simd.crc32c != kvc_simd_crc32c_fn(b) ||
            kvc_simd.add_rows != kvc_simd_add_rows_fn(b)) {
            fprintf(stderr, "FAIL kvc_simd_force(%s) table\n", kvc_simd_name(b));
            rc = 1;
        }
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
    free(src); free(want); free(got); free(data); free(pool);
    return rc;
}
