/* Test and benchmark driver for the C kernel library (the sources in runtime_cpu/csrc), built natively or with a cross
 * compiler (aarch64-linux-gnu-gcc -static, run under qemu-aarch64) so the NEON paths are checked against the
 * same numpy reference as the x86 ones (tests/test_kernels_neon.py).
 *
 *   kernel_driver gemm  KERNEL ISA THREADS IN OUT [OFFSET]   KERNEL = lut | mad; the byte buffers the kernel
 *       reads (codes, q, packed) start OFFSET bytes past a malloc'd (16-byte aligned) address, the 4-byte ones
 *       (sumq, step, scale, y) 4 * OFFSET bytes (element-aligned, as numpy's arrays); IN (little-endian):
 *       "MOTEGIN1", i64 N, Kp, T, block_bytes, row_bytes, then N * row_bytes code bytes (TQ2_0 layout),
 *       T * Kp int8 q, T int32 sumq, T f32 step, N f32 scale;  OUT: T * N f32 y.
 *   kernel_driver quant ISA THREADS IN OUT          IN: "MOTEQIN1", i64 T, K, Kp, f32 eps, T * K f32 x;
 *       OUT: T * Kp int8 q, T int32 sumq, T f32 step.
 *   kernel_driver bench KERNEL ISA THREADS N K T [SECONDS]   random weights and activations; prints one line:
 *       time per call, GB/s of weight bytes read (the kernel's own layout), tokens x rows per second, each from
 *       wall time and from the process's CPU time / threads (the figure an idle machine gives when other
 *       processes share the cores: the pool's threads spin while they wait, so CPU time ~ held time), and
 *       from the fastest single call (all threads on a core at once).
 *   kernel_driver isas                              the ISA paths this CPU and build run.
 * Exit status: 0, 1 on bad use / unreadable files, 3 when the kernel returned an error (printed).
 */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../runtime_cpu/csrc/mote_kernels.h"

/* the kernel families' entry points (declared in their sources; ternary_mad.c: /work/briefs/ckernels.md) */
int64_t mote_lut_packed_bytes(int64_t N, int64_t Kp);
int mote_lut_pack(const uint8_t *w, int64_t block_bytes, int64_t row_bytes, int64_t N, int64_t Kp, uint8_t *dst);
int mote_lut_gemm(const uint8_t *packed, int64_t N, int64_t Kp, const int8_t *q, int64_t q_stride, const int32_t *sumq,
                  const float *step, const float *scale, int64_t T, float *y, int64_t y_stride, int isa);
int mote_quant_act(const float *x, int64_t x_stride, int64_t T, int64_t K, int64_t Kp, float eps, int8_t *q,
                   int64_t q_stride, int32_t *sumq, float *step, int isa);
int mote_tern_gemm(const uint8_t *w, int64_t block_bytes, int64_t row_bytes, int64_t N, int64_t Kp, const int8_t *q,
                   int64_t q_stride, const int32_t *sumq, const float *step, const float *scale, int64_t T, float *y,
                   int64_t y_stride, int isa);

static const char *ISA_NAMES[] = {"scalar", "avx2", "avx512", "neon"};

static int die(const char *msg, const char *arg) {
    fprintf(stderr, "kernel_driver: %s%s%s\n", msg, arg ? " " : "", arg ? arg : "");
    return 1;
}

static int isa_of(const char *s) {
    if (!strcmp(s, "auto")) return MOTE_ISA_AUTO;
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, ISA_NAMES[i])) return i;
    return -2;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "kernel_driver: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static int read_all(FILE *f, void *p, size_t n) { return fread(p, 1, n, f) == n; }

static int64_t g_offset;  /* the gemm command's buffer misalignment, in elements */
static void *oalloc(size_t n, size_t elem) { return (char *)xmalloc(n + elem * (size_t)g_offset) + elem * g_offset; }

/* One ternary product by KERNEL; packing (lut) included, so a caller times it separately (bench). */
static int run_gemm(const char *kernel, const uint8_t *w, int64_t bb, int64_t rb, int64_t N, int64_t Kp,
                    const int8_t *q, const int32_t *sumq, const float *step, const float *scale, int64_t T, float *y,
                    int isa) {
    if (!strcmp(kernel, "mad")) return mote_tern_gemm(w, bb, rb, N, Kp, q, Kp, sumq, step, scale, T, y, N, isa);
    if (strcmp(kernel, "lut")) return -100;
    const int64_t pb = mote_lut_packed_bytes(N, Kp);
    if (pb < 0) return -2;
    uint8_t *packed = oalloc((size_t)pb, 1);
    int rc = mote_lut_pack(w, bb, rb, N, Kp, packed);
    if (!rc) rc = mote_lut_gemm(packed, N, Kp, q, Kp, sumq, step, scale, T, y, N, isa);
    return rc;
}

static int cmd_gemm(char **a) {
    const int isa = isa_of(a[1]);
    if (isa == -2) return die("unknown ISA", a[1]);
    mote_set_threads(atoi(a[2]));
    FILE *f = fopen(a[3], "rb");
    if (!f) return die("cannot read", a[3]);
    char magic[8];
    int64_t h[5];
    if (!read_all(f, magic, 8) || memcmp(magic, "MOTEGIN1", 8) || !read_all(f, h, sizeof h)) return die("bad input", a[3]);
    const int64_t N = h[0], Kp = h[1], T = h[2], bb = h[3], rb = h[4];
    if (N < 0 || T < 0 || Kp <= 0 || N > (1 << 24) || T > (1 << 16) || Kp > (1 << 24) || rb < 0 || rb > (1 << 24))
        return die("bad sizes in", a[3]);
    uint8_t *w = oalloc((size_t)(N * rb), 1);
    int8_t *q = oalloc((size_t)(T * Kp), 1);
    int32_t *sumq = oalloc((size_t)T * 4, 4);
    float *step = oalloc((size_t)T * 4, 4), *scale = oalloc((size_t)N * 4, 4), *y = oalloc((size_t)(T * N) * 4, 4);
    if (!read_all(f, w, (size_t)(N * rb)) || !read_all(f, q, (size_t)(T * Kp)) || !read_all(f, sumq, (size_t)T * 4) ||
        !read_all(f, step, (size_t)T * 4) || !read_all(f, scale, (size_t)N * 4))
        return die("truncated input", a[3]);
    fclose(f);
    const int rc = run_gemm(a[0], w, bb, rb, N, Kp, q, sumq, step, scale, T, y, isa);
    if (rc == -100) return die("unknown kernel", a[0]);
    if (rc) {
        fprintf(stderr, "kernel_driver: %s on %s returned %d\n", a[0], a[1], rc);
        return 3;
    }
    FILE *o = fopen(a[4], "wb");
    if (!o || fwrite(y, 4, (size_t)(T * N), o) != (size_t)(T * N) || fclose(o)) return die("cannot write", a[4]);
    return 0;
}

static int cmd_quant(char **a) {
    const int isa = isa_of(a[0]);
    if (isa == -2) return die("unknown ISA", a[0]);
    mote_set_threads(atoi(a[1]));
    FILE *f = fopen(a[2], "rb");
    if (!f) return die("cannot read", a[2]);
    char magic[8];
    int64_t h[3];
    float eps;
    if (!read_all(f, magic, 8) || memcmp(magic, "MOTEQIN1", 8) || !read_all(f, h, sizeof h) || !read_all(f, &eps, 4))
        return die("bad input", a[2]);
    const int64_t T = h[0], K = h[1], Kp = h[2];
    if (T < 0 || K <= 0 || Kp < K || T > (1 << 16) || Kp > (1 << 24)) return die("bad sizes in", a[2]);
    float *x = xmalloc((size_t)(T * K) * 4), *step = xmalloc((size_t)T * 4);
    int8_t *q = xmalloc((size_t)(T * Kp));
    int32_t *sumq = xmalloc((size_t)T * 4);
    if (!read_all(f, x, (size_t)(T * K) * 4)) return die("truncated input", a[2]);
    fclose(f);
    const int rc = mote_quant_act(x, K, T, K, Kp, eps, q, Kp, sumq, step, isa);
    if (rc) {
        fprintf(stderr, "kernel_driver: quant on %s returned %d\n", a[0], rc);
        return 3;
    }
    FILE *o = fopen(a[3], "wb");
    if (!o || fwrite(q, 1, (size_t)(T * Kp), o) != (size_t)(T * Kp) || fwrite(sumq, 4, (size_t)T, o) != (size_t)T ||
        fwrite(step, 4, (size_t)T, o) != (size_t)T || fclose(o))
        return die("cannot write", a[3]);
    return 0;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

static int cmd_bench(char **a, int argc) {
    const int isa = isa_of(a[1]);
    if (isa == -2) return die("unknown ISA", a[1]);
    const int threads = mote_set_threads(atoi(a[2]));
    const int64_t N = atoll(a[3]), K = atoll(a[4]), T = atoll(a[5]);
    const double seconds = argc > 6 ? atof(a[6]) : 1.0;
    const int64_t Kp = (K + 255) / 256 * 256, rb = Kp / 4;
    if (N <= 0 || K <= 0 || T <= 0) return die("bad sizes", NULL);
    uint8_t *w = aligned_alloc(64, (size_t)(N * rb + 63) / 64 * 64);  /* both layouts on cache lines */
    if (!w) return die("out of memory", NULL);
    for (int64_t n = 0; n < N; n++)  /* codes 0..2 for k < K, 1 (zero weight) in the padding to Kp */
        for (int64_t i = 0; i < rb; i++) {
            const int64_t k0 = i / 64 * 256 + i % 64 / 32 * 128 + i % 32;  /* byte i holds k0 + 32 s */
            unsigned b = 0;
            for (int s = 0; s < 4; s++) b |= (k0 + 32 * s < K ? rnd() % 3 : 1u) << (2 * s);
            w[n * rb + i] = (uint8_t)b;
        }
    int8_t *q = xmalloc((size_t)(T * Kp));
    int32_t *sumq = xmalloc((size_t)T * 4);
    float *step = xmalloc((size_t)T * 4), *scale = xmalloc((size_t)N * 4), *y = xmalloc((size_t)(T * N) * 4);
    for (int64_t t = 0; t < T; t++) {
        int32_t s = 0;
        for (int64_t k = 0; k < Kp; k++) s += q[t * Kp + k] = (int8_t)(k < K ? (int)(rnd() % 256) - 128 : 0);
        sumq[t] = s;
        step[t] = 0.01f;
    }
    for (int64_t n = 0; n < N; n++) scale[n] = 0.5f;
    const uint8_t *mat = w;
    int64_t wbytes = N * rb;
    uint8_t *packed = NULL;
    if (!strcmp(a[0], "lut")) {
        wbytes = mote_lut_packed_bytes(N, Kp);
        packed = aligned_alloc(64, ((size_t)wbytes + 63) / 64 * 64);  /* as lut_kernels.lut_pack aligns it */
        if (!packed) return die("out of memory", NULL);
        const double t0 = now();
        const int rc = mote_lut_pack(w, 64, rb, N, Kp, packed);
        if (rc) return fprintf(stderr, "kernel_driver: lut pack returned %d\n", rc), 3;
        fprintf(stderr, "pack %.1f ms\n", 1e3 * (now() - t0));
        mat = packed;
        int64_t ncols;  /* the header's stored columns: the bytes the kernel reads */
        memcpy(&ncols, packed + 40, 8);
        wbytes = 64 + (N + 31) / 32 * ncols * 64;
    } else if (strcmp(a[0], "mad")) {
        return die("unknown kernel", a[0]);
    }
    int64_t calls = 0;
    double t0 = 0, el = 0, c0 = 0, best = 0;
    for (int pass = 0; pass < 2; pass++) {  /* pass 0 warms up for a tenth of the time */
        const double budget = pass ? seconds : seconds / 10;
        calls = 0;
        t0 = now();
        c0 = cpu_now();
        best = 1e30;
        do {
            const double c_start = now();
            const int rc = packed ? mote_lut_gemm(mat, N, Kp, q, Kp, sumq, step, scale, T, y, N, isa)
                                  : mote_tern_gemm(mat, 64, rb, N, Kp, q, Kp, sumq, step, scale, T, y, N, isa);
            if (rc) return fprintf(stderr, "kernel_driver: %s returned %d\n", a[0], rc), 3;
            calls++;
            const double c_end = now();
            best = c_end - c_start < best ? c_end - c_start : best;
            el = c_end - t0;
        } while (el < budget);
    }
    const double per = el / (double)calls, cper = (cpu_now() - c0) / threads / (double)calls;
    printf("%s %s threads=%d N=%lld K=%lld T=%lld (%lld weight bytes): wall %.1f us/call %.2f GB/s %.3g tok*rows/s | "
           "cpu %.1f us/call %.2f GB/s %.3g tok*rows/s | best call %.1f us %.2f GB/s %.3g tok*rows/s\n",
           a[0], a[1], threads, (long long)N, (long long)K, (long long)T, (long long)wbytes, 1e6 * per,
           (double)wbytes / per / 1e9, (double)(T * N) / per, 1e6 * cper, (double)wbytes / cper / 1e9,
           (double)(T * N) / cper, 1e6 * best, (double)wbytes / best / 1e9, (double)(T * N) / best);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "isas")) {
        for (int i = 0; i < 4; i++)
            if (mote_isa_runs(i)) printf("%s\n", ISA_NAMES[i]);
        return 0;
    }
    if ((argc == 7 || argc == 8) && !strcmp(argv[1], "gemm")) {
        g_offset = argc == 8 ? atoll(argv[7]) : 0;
        if (g_offset < 0 || g_offset > 4096) return die("bad offset", argv[7]);
        return cmd_gemm(argv + 2);
    }
    if (argc == 6 && !strcmp(argv[1], "quant")) return cmd_quant(argv + 2);
    if ((argc == 8 || argc == 9) && !strcmp(argv[1], "bench")) return cmd_bench(argv + 2, argc - 2);
    return die("usage: kernel_driver gemm KERNEL ISA THREADS IN OUT [OFFSET] | quant ISA THREADS IN OUT | "
               "bench KERNEL ISA THREADS N K T [SECONDS] | isas", NULL);
}
