/* Every copy path against the scalar oracle: sizes 0..KVC_TEST_MAX_N floats,
 * every float misalignment of source and destination within a 64-byte line,
 * with guard zones on both sides of the destination.  Then each path's CRC32C,
 * add_rows, conversions and int8 groups against theirs.  Runs natively for
 * each path the CPU has, and under qemu-aarch64 for NEON.  Exit status 0 = pass. */
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
#define CVT_MAX_N 70              /* conversions: every length up to here, every misalignment */
#define N_NARROW (1u << 22)       /* float32 patterns for the narrowing conversions */
#define Q_BUF (5 * 257 + 2 * GUARD + MAX_OFF) /* int8 groups: up to 5 of 257 floats */

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

static uint32_t xorshift(uint32_t *x)
{
    *x ^= *x << 13, *x ^= *x >> 17, *x ^= *x << 5;
    return *x;
}

/* Narrowing inputs: for each sign, exponent and top 10 mantissa bits (an
 * f16's worth), low 13 bits at and around the f16 rounding points, plus
 * random ones.  These also hold every bf16 tie and its neighbours, and NaNs
 * of every payload class, signalling and quiet. */
static void fill_narrow(uint32_t *p)
{
    static const uint32_t low[6] = {0, 1, 0x0fff, 0x1000, 0x1001, 0x1fff};
    uint32_t x = 777;
    for (uint32_t i = 0; i < N_NARROW; i++) {
        uint32_t k = i & 7;
        p[i] = (i >> 3) << 13 | (k < 6 ? low[k] : xorshift(&x) & 0x1fff);
    }
}

static const char *const cvt_names[KVC_N_CVT] = {"f32->f16", "f16->f32", "f32->bf16", "bf16->f32"};
static const kvc_cvt_fn cvt_scalar[KVC_N_CVT] = {kvc_f32_to_f16_scalar, kvc_f16_to_f32_scalar,
                                                 kvc_f32_to_bf16_scalar, kvc_bf16_to_f32_scalar};

/* One conversion against scalar: over all inputs in one call, then every
 * length up to CVT_MAX_N (and a few long ones) at every misalignment of dst
 * and src, with guards around dst. */
static int check_cvt(int backend, const char *label, int which, kvc_cvt_fn fn, const void *in,
                     size_t n_in)
{
    size_t out_size = which == KVC_CVT_F32_F16 || which == KVC_CVT_F32_BF16 ? 2 : 4;
    size_t in_size = 6 - out_size;
    unsigned char *want = malloc(n_in * out_size), *got = malloc(n_in * out_size);
    long failures = 0, runs = 1;
    if (!want || !got) return 1;
    cvt_scalar[which](want, in, n_in);
    fn(got, in, n_in);
    for (size_t i = 0; i < n_in; i++) {
        if (memcmp(want + i * out_size, got + i * out_size, out_size) != 0 && failures++ < 5) {
            uint32_t x = 0, w = 0, g = 0;
            memcpy(&x, (const unsigned char *)in + i * in_size, in_size);
            memcpy(&w, want + i * out_size, out_size);
            memcpy(&g, got + i * out_size, out_size);
            fprintf(stderr, "FAIL %s%s %s: 0x%x -> 0x%x, scalar 0x%x\n", kvc_simd_name(backend),
                    label, cvt_names[which], x, g, w);
        }
    }
    static const size_t long_n[] = {127, 128, 129, 1000, 4099};
    for (size_t k = 0; k <= CVT_MAX_N + 5; k++) {
        size_t n = k <= CVT_MAX_N ? k : long_n[k - CVT_MAX_N - 1];
        for (size_t so = 0; so < MAX_OFF; so++) {
            for (size_t doff = 0; doff < MAX_OFF; doff++, runs++) {
                size_t bytes = (n + 2 * GUARD + MAX_OFF) * out_size;
                memset(want, 0xa5, bytes);
                memset(got, 0xa5, bytes);
                const unsigned char *src = (const unsigned char *)in + (so + n * 13) * in_size;
                cvt_scalar[which](want + (GUARD + doff) * out_size, src, n);
                fn(got + (GUARD + doff) * out_size, src, n);
                if (memcmp(want, got, bytes) != 0 && failures++ < 5)
                    fprintf(stderr, "FAIL %s%s %s n=%zu src_off=%zu dst_off=%zu\n",
                            kvc_simd_name(backend), label, cvt_names[which], n, so, doff);
            }
        }
    }
    free(want);
    free(got);
    char what[40];
    snprintf(what, sizeof what, "(%s%s)", cvt_names[which], label);
    return report(what, runs, failures);
}

static int check_cvts(int backend, const uint32_t *narrow, const uint16_t *halves)
{
    int rc = 0;
    for (int w = 0; w < KVC_N_CVT; w++) {
        kvc_cvt_fn fn = kvc_simd_cvt_fn(backend, w);
        const char *label = fn == kvc_simd_cvt_fn(KVC_SCALAR, w) ? " = scalar" : "";
        if (w == KVC_CVT_F32_F16 || w == KVC_CVT_F32_BF16)
            rc |= check_cvt(backend, label, w, fn, narrow, N_NARROW);
        else
            rc |= check_cvt(backend, label, w, fn, halves, 1u << 16);
    }
#if defined(__x86_64__)
    /* The AVX-512 bf16 rounding without the BF16 instruction, when the CPU
     * has it and kvc_simd_cvt_fn() picks the instruction. */
    if (backend == KVC_AVX512 &&
        kvc_simd_cvt_fn(backend, KVC_CVT_F32_BF16) != kvc_f32_to_bf16_avx512)
        rc |= check_cvt(backend, ", no BF16 insn", KVC_CVT_F32_BF16, kvc_f32_to_bf16_avx512, narrow,
                        N_NARROW);
#endif
    return rc;
}

/* The scalar conversions themselves: halves and bf16 survive a round trip
 * through float32 (NaNs too, but a bf16 NaN comes back as 0x7fc0 | sign). */
static int check_scalar_round_trips(const uint16_t *halves)
{
    uint32_t f[1 << 16];
    uint16_t back[1 << 16];
    long failures = 0;
    kvc_f16_to_f32_scalar(f, halves, 1u << 16);
    kvc_f32_to_f16_scalar(back, f, 1u << 16);
    for (uint32_t i = 0; i < 1u << 16; i++) failures += back[i] != halves[i];
    kvc_bf16_to_f32_scalar(f, halves, 1u << 16);
    kvc_f32_to_bf16_scalar(back, f, 1u << 16);
    for (uint32_t i = 0; i < 1u << 16; i++) {
        int nan = (i & 0x7fff) > 0x7f80;
        failures += back[i] != (nan ? (i & 0x8000) | 0x7fc0 : i);
    }
    return report("(round trips)", 2, failures);
}

/* Group inputs by kind: 0 mixed magnitudes, 1 the same with infinities,
 * NaNs and signed zeros, 2 signed zeros, 3 subnormals (scale subnormal or
 * underflowing), 4 near FLT_MAX, 5 halves of integers with 127 first (scale
 * 1: every tie). */
static void fill_group(float *x, size_t n, int kind, uint32_t *state)
{
    static const float special[] = {INFINITY, -INFINITY, NAN, -NAN, -0.0f, 0.0f, 1e-40f, 3e38f};
    for (size_t i = 0; i < n; i++) {
        uint32_t r = xorshift(state), bits = r & 0x807fffffu;
        switch (kind) {
        case 0: bits |= (119u + (r >> 7) % 17) << 23; break;
        case 1: bits |= (119u + (r >> 7) % 17) << 23;
                if (r % 13 == 0) bits = kvc_f32_bits(special[(r >> 9) % 8]);
                break;
        case 2: bits &= 0x80000000u; break;
        case 3: bits = r % 3 ? bits & (0x80000000u | (0xffu >> (r >> 28))) : bits; break;
        case 4: bits |= (250u + (r >> 7) % 5) << 23; break;
        default: bits = kvc_f32_bits(i == 0 ? 127.0f : (float)((int)(r % 509) - 254) * 0.5f);
        }
        memcpy(&x[i], &bits, 4);
    }
}

/* quant_i8 and dequant_i8 against scalar: groups of 0..70, 128 and 257
 * floats, 0..5 of them, every kind of input, misaligned, with guards. */
static int check_quant(int backend)
{
    kvc_quant_fn quant = kvc_simd_quant_fn(backend);
    kvc_dequant_fn dequant = kvc_simd_dequant_fn(backend);
    static float src[Q_BUF], want_f[Q_BUF], got_f[Q_BUF], want_s[8 + GUARD], got_s[8 + GUARD];
    static int8_t want_q[Q_BUF], got_q[Q_BUF];
    uint32_t state = 99;
    long failures = 0, runs = 0;
    for (size_t k = 0; k <= COLS_MAX + 2; k++) {
        size_t group = k <= COLS_MAX ? k : k == COLS_MAX + 1 ? 128 : 257;
        for (size_t ng = 0; ng <= 5; ng += 1 + (ng == 3)) {
            for (int kind = 0; kind < 6; kind++, runs++) {
                size_t so = (group + kind) % MAX_OFF, doff = (group * 3 + ng) % MAX_OFF;
                size_t n = ng * group;
                fill_group(src + so, n, kind, &state);
                memset(want_q, 0x5a, sizeof want_q);
                memset(got_q, 0x5a, sizeof got_q);
                memset(want_s, 0x5a, sizeof want_s);
                memset(got_s, 0x5a, sizeof got_s);
                kvc_quant_i8_scalar(want_q + GUARD + doff, want_s + 1, src + so, ng, group);
                quant(got_q + GUARD + doff, got_s + 1, src + so, ng, group);
                int ok = memcmp(want_q, got_q, sizeof want_q) == 0 &&
                         memcmp(want_s, got_s, sizeof want_s) == 0;
                /* and back, from these q and from arbitrary bytes (-128 too) */
                for (int pass = 0; pass < 2; pass++) {
                    int8_t *q = want_q + GUARD + doff;
                    for (size_t i = 0; pass && i < n; i++) q[i] = (int8_t)xorshift(&state);
                    memset(want_f, 0x5a, sizeof want_f);
                    memset(got_f, 0x5a, sizeof got_f);
                    kvc_dequant_i8_scalar(want_f + GUARD + so, q, want_s + 1, ng, group);
                    dequant(got_f + GUARD + so, q, want_s + 1, ng, group);
                    ok &= memcmp(want_f, got_f, sizeof want_f) == 0;
                }
                if (!ok && failures++ < 5)
                    fprintf(stderr, "FAIL quant_i8 %s group=%zu groups=%zu kind=%d\n",
                            kvc_simd_name(backend), group, ng, kind);
            }
        }
    }
    return report(quant == kvc_simd_quant_fn(KVC_SCALAR) ? "(int8 = scalar)" : "(int8)", runs,
                  failures);
}

int main(int argc, char **argv)
{
    size_t cap = KVC_TEST_MAX_N + 2 * GUARD + 2 * MAX_OFF + 64;
    size_t cap_bytes = (cap * 4 + 64 + 63) & ~(size_t)63; /* aligned_alloc: a multiple of 64 */
    uint32_t *src = aligned_alloc(64, cap_bytes);
    uint32_t *want = aligned_alloc(64, cap_bytes);
    uint32_t *got = aligned_alloc(64, cap_bytes);
    unsigned char *data = malloc(CRC_BUF);
    float *pool = malloc(POOL * sizeof *pool);
    uint32_t *narrow = malloc(N_NARROW * sizeof *narrow);
    uint16_t *halves = malloc((1u << 16) * sizeof *halves);
    if (!src || !want || !got || !data || !pool || !narrow || !halves) return 2;
    fill_narrow(narrow);
    for (uint32_t i = 0; i < 1u << 16; i++) halves[i] = (uint16_t)i;
    for (size_t i = 0; i < cap; i++) src[i] = (uint32_t)(i * 2654435761u) ^ 0x7f800001u;
    for (size_t i = 0; i < CRC_BUF; i++) data[i] = (unsigned char)((i * 2654435761u) >> 13);
    fill_floats(pool, POOL);

    int rc = check_scalar_round_trips(halves), tested = 0;
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
        rc |= check_cvts(b, narrow, halves);
        rc |= check_quant(b);
        /* Forcing a path fills every entry of the table with its functions. */
        if (kvc_simd_force(b) != 0 || kvc_simd.crc32c != kvc_simd_crc32c_fn(b) ||
            kvc_simd.add_rows != kvc_simd_add_rows_fn(b) ||
            kvc_simd.f32_to_f16 != kvc_simd_cvt_fn(b, KVC_CVT_F32_F16) ||
            kvc_simd.f16_to_f32 != kvc_simd_cvt_fn(b, KVC_CVT_F16_F32) ||
            kvc_simd.f32_to_bf16 != kvc_simd_cvt_fn(b, KVC_CVT_F32_BF16) ||
            kvc_simd.bf16_to_f32 != kvc_simd_cvt_fn(b, KVC_CVT_BF16_F32) ||
            kvc_simd.quant_i8 != kvc_simd_quant_fn(b) ||
            kvc_simd.dequant_i8 != kvc_simd_dequant_fn(b)) {
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
    free(src); free(want); free(got); free(data); free(pool); free(narrow); free(halves);
    return rc;
}
