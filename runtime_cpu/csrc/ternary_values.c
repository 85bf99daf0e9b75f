/* The training forward's quantisation on CPU (mote_edge/quant.py): the absmean scale's sum and the values
 * codes * s of the ternary weights, each in one pass over the latent float32 weights, and the per-token int8
 * values of the activations.
 *
 * mote_abs_sum_f32 is exporters/ternary.py's ternary_scale sum in the same order, so the two agree bit for
 * bit: blocks of SCALE_BLOCK weights; in a block, 16 float64 lanes, lane j adding |w[16 r + j]| row after
 * row; the lanes then added in order 0..15, then the block's last (size % 16) weights one by one; the
 * blocks' sums added in order. (numpy's sum over axis 0 of the [rows, 16] view is that lane order.)
 *
 * mote_ternary_values_f32: codes * s for a given scale s.
 *
 * code = clip(round_half_even(fl(w / s)), -1, 1) is +1 exactly when w > s/2 and -1 exactly when
 * w < -s/2 (the reasoning is in quant.py), so no division is needed and the result is bit-identical
 * to the division form: +-s for the kept weights, +0 for the rest. s must be finite (a NaN or inf
 * weight makes it not; the caller takes the division form then).
 *
 * The caller's threads (torch's intra-op count) split the work into contiguous ranges (jobs). They run on
 * torch's own OpenMP team when the caller hands over its GOMP_parallel (mote_train_set_team): torch's
 * workers spin for a while after each of its parallel regions, and threads of ours started beside them
 * would share the cores with that spinning (measured inside a 0.5B training step: the scale's sum and the
 * values took twice their time alone). Without a team each job but the first runs on a short-lived pthread:
 * a call is milliseconds long, so a thread start (~20 us) is noise, and the kernel pool (pool.c), which
 * spins between calls, would steal cores from torch's threads. */
#include <pthread.h>

#include "mote_kernels.h"

#define SCALE_BLOCK (1 << 16) /* exporters/ternary.py SCALE_BLOCK */
#define LANES 16

/* One C body, compiled three times: for AVX512 and AVX2 the compiler vectorises across the lanes, each lane
 * still adding its weights row after row (no reassociation without -ffast-math), so every path gives the
 * same bits; the wide paths only run more lanes per instruction (measured, one core, 48 cold 17 MB
 * matrices: 0.15 s baseline SSE2, 0.12 s AVX2, 0.10 s AVX512; memory alone 0.085 s). */
#define BLOCK_ABS_SUM(name, attr)                                                                                \
    attr static double name(const float *x, int64_t len) {                                                     \
        const int64_t rows = len / LANES;                                                                      \
        double lane[LANES] = {0};                                                                              \
        for (int64_t r = 0; r < rows; r++)                                                                     \
            for (int j = 0; j < LANES; j++) lane[j] += (double)__builtin_fabsf(x[r * LANES + j]);             \
        double s = 0.0;                                                                                        \
        for (int j = 0; j < LANES; j++) s += lane[j];                                                          \
        for (int64_t i = rows * LANES; i < len; i++) s += (double)__builtin_fabsf(x[i]);                      \
        return s;                                                                                              \
    }

BLOCK_ABS_SUM(block_abs_sum_scalar, )
#if defined(__x86_64__)
BLOCK_ABS_SUM(block_abs_sum_avx2, __attribute__((target("avx2"))))
BLOCK_ABS_SUM(block_abs_sum_avx512, __attribute__((target("avx512f"))))
#endif

typedef double (*block_sum_fn)(const float *, int64_t);

static block_sum_fn block_sum_for(int isa) {
    switch (isa) {
#if defined(__x86_64__)
    case MOTE_AVX512:
        return block_abs_sum_avx512;
    case MOTE_AVX2:
        return block_abs_sum_avx2;
#endif
    default:
        return block_abs_sum_scalar;  /* NEON: the baseline compile vectorises it already */
    }
}

typedef struct {
    const float *w;
    int64_t n, b0, b1; /* blocks b0 .. b1 - 1 */
    double *sums;
    block_sum_fn block_sum;
} sum_job;

static void *sum_thread(void *arg) {
    const sum_job *j = (const sum_job *)arg;
    for (int64_t b = j->b0; b < j->b1; b++) {
        const int64_t lo = b * SCALE_BLOCK, len = j->n - lo < SCALE_BLOCK ? j->n - lo : SCALE_BLOCK;
        j->sums[b] = j->block_sum(j->w + lo, len);
    }
    return NULL;
}

enum { MAX_JOBS = 64, MIN_PER_JOB = 1 << 18 };

static int jobs_for(int64_t n, int threads) {
    if (threads > MAX_JOBS) threads = MAX_JOBS;
    if (threads > n / MIN_PER_JOB) threads = (int)(n / MIN_PER_JOB);
    return threads < 1 ? 1 : threads;
}

/* libgomp's entry point for `#pragma omp parallel`: fn(data) on each of num_threads team threads */
typedef void (*team_fn)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
static team_fn team;

void mote_train_set_team(void *gomp_parallel) { __atomic_store_n(&team, (team_fn)gomp_parallel, __ATOMIC_RELEASE); }

typedef void *(*job_fn)(void *);

typedef struct {
    job_fn fn;
    char *jobs;
    size_t size;
    int n, next;
} team_run;

static void team_worker(void *arg) {
    team_run *r = (team_run *)arg;
    for (int i; (i = __atomic_fetch_add(&r->next, 1, __ATOMIC_RELAXED)) < r->n;) r->fn(r->jobs + (size_t)i * r->size);
}

/* fn on each of n jobs (an array of n structs of `size` bytes), all done on return */
static void run_jobs(job_fn fn, void *jobs, size_t size, int n) {
    char *J = (char *)jobs;
    const team_fn t = __atomic_load_n(&team, __ATOMIC_ACQUIRE);
    if (n > 1 && t) {
        team_run r = {fn, J, size, n, 0};
        t(team_worker, &r, (unsigned)n, 0);
        return;
    }
    pthread_t tid[MAX_JOBS];
    int started[MAX_JOBS] = {0};
    for (int i = 1; i < n; i++) started[i] = pthread_create(&tid[i], NULL, fn, J + (size_t)i * size) == 0;
    for (int i = 0; i < n; i++) /* job 0 runs on the calling thread; a thread that cannot start runs here too */
        if (!started[i]) fn(J + (size_t)i * size);
    for (int i = 1; i < n; i++)
        if (started[i]) pthread_join(tid[i], NULL);
}

/* Block sums on `threads` threads (into `sums`, one per block), added here in block order: the same total
 * whoever summed each block, on whichever ISA path (MOTE_ISA_AUTO: the best; one that does not run: NaN). */
double mote_abs_sum_f32(const float *w, int64_t n, int threads, double *sums, int isa) {
    isa = mote_isa_pick(isa);
    if (isa < 0) return __builtin_nan("");
    const block_sum_fn block_sum = block_sum_for(isa);
    const int64_t blocks = (n + SCALE_BLOCK - 1) / SCALE_BLOCK;
    const int t_n = jobs_for(n, threads);
    sum_job jobs[MAX_JOBS];
    for (int t = 0; t < t_n; t++) jobs[t] = (sum_job){w, n, blocks * t / t_n, blocks * (t + 1) / t_n, sums, block_sum};
    run_jobs(sum_thread, jobs, sizeof jobs[0], t_n);
    double total = 0.0;
    for (int64_t b = 0; b < blocks; b++) total += sums[b];
    return total;
}

typedef void (*values_fn)(const float *, float *, int64_t, float);

typedef struct {
    const float *w;
    float *out;
    int64_t n;
    float s;
    values_fn fn;
} values_job;

static void values_scalar(const float *w, float *out, int64_t n, float s) {
    const float half = 0.5f * s, neg = -s;
    for (int64_t i = 0; i < n; i++) {
        const float x = w[i];
        out[i] = x > half ? s : (x < -half ? neg : 0.0f);
    }
}

#if defined(__x86_64__)
#include <immintrin.h>
/* How many floats go before out's first `bytes`-aligned address (streaming stores need it): all n where out
 * is not even float aligned or the boundary lies past the end. */
static int64_t aligned_head(const float *out, int64_t n, unsigned bytes) {
    const int64_t head = (int64_t)(((bytes - ((uintptr_t)out & (bytes - 1))) & (bytes - 1)) / 4);
    return ((uintptr_t)out & 3) || head > n ? n : head;
}

/* The same selects 16 at a time (ordered compares: false for NaN, as C's; maskz gives +0), written with
 * streaming stores: a matrix past the L2 goes back to memory before the matmul reads it anyway, and a
 * streaming store skips reading the line first (one core, 48 cold 17 MB matrices: 0.155 s -> 0.097 s,
 * the matmul after it unchanged). Stores from the first 64-byte boundary of out; the ends are scalar. */
__attribute__((target("avx512f"))) static void values_avx512(const float *w, float *out, int64_t n, float s) {
    int64_t i = aligned_head(out, n, 64);
    values_scalar(w, out, i, s);
    const __m512 half = _mm512_set1_ps(0.5f * s), nhalf = _mm512_set1_ps(-0.5f * s);
    const __m512 pos = _mm512_set1_ps(s), neg = _mm512_set1_ps(-s);
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(w + i);
        const __mmask16 gt = _mm512_cmp_ps_mask(x, half, _CMP_GT_OQ), lt = _mm512_cmp_ps_mask(x, nhalf, _CMP_LT_OQ);
        _mm512_stream_ps(out + i, _mm512_mask_mov_ps(_mm512_maskz_mov_ps(lt, neg), gt, pos));
    }
    _mm_sfence();
    values_scalar(w + i, out + i, n - i, s);
}

/* The AVX2 form of the same: 8 at a time, the selects as and/or of the compare masks (a false compare
 * gives all-zero bits: +0), streaming stores from the first 32-byte boundary of out (one core of an AMD
 * EPYC without AVX512, 48 cold 17 MB matrices: see README's training-step benchmark). */
__attribute__((target("avx2"))) static void values_avx2(const float *w, float *out, int64_t n, float s) {
    int64_t i = aligned_head(out, n, 32);
    values_scalar(w, out, i, s);
    const __m256 half = _mm256_set1_ps(0.5f * s), nhalf = _mm256_set1_ps(-0.5f * s);
    const __m256 pos = _mm256_set1_ps(s), neg = _mm256_set1_ps(-s);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(w + i);
        const __m256 gt = _mm256_cmp_ps(x, half, _CMP_GT_OQ), lt = _mm256_cmp_ps(x, nhalf, _CMP_LT_OQ);
        _mm256_stream_ps(out + i, _mm256_or_ps(_mm256_and_ps(gt, pos), _mm256_and_ps(lt, neg)));
    }
    _mm_sfence();
    values_scalar(w + i, out + i, n - i, s);
}
#endif

enum { STREAM_MIN = 1 << 20 }; /* weights (4 MiB, the L2 here) from which MOTE_ISA_AUTO streams the values */

static void *values_thread(void *arg) {
    const values_job *j = (const values_job *)arg;
    j->fn(j->w, j->out, j->n, j->s);
    return NULL;
}

int mote_ternary_values_f32(const float *w, int64_t n, float s, float *out, int threads, int isa) {
    const int picked = mote_isa_pick(isa);
    if (picked < 0) return -1;
    values_fn fn = values_scalar;
#if defined(__x86_64__)
    if (isa != MOTE_ISA_AUTO || n >= STREAM_MIN) {
        if (picked == MOTE_AVX512) fn = values_avx512;
        if (picked == MOTE_AVX2) fn = values_avx2;
    }
#endif
    threads = jobs_for(n, threads);
    values_job jobs[MAX_JOBS];
    for (int t = 0; t < threads; t++) {
        const int64_t b = n * t / threads, e = n * (t + 1) / threads;
        jobs[t] = (values_job){w + b, out + b, e - b, s, fn};
    }
    run_jobs(values_thread, jobs, sizeof jobs[0], threads);
    return 0;
}

/* ---- activations: the value of quant.py int8_fake_quant, per row of K --------------------------------------
 * q = clamp(rint(x * inv), -128, 127) with inv = (1 / amax) * 127 (torch's `127 / amax`: reciprocal, then times
 * 127; the same order as ternary_mad.c mote_quant_act), value q * (amax / 127), amax = max |x| clamped to eps.
 * Unlike the inference quantiser a NaN stays NaN, as in torch: a NaN in a row makes its amax NaN (torch's amax
 * propagates it) and so every value of the row; the comparisons of the clamp keep a NaN. One C body per ISA
 * path: the values are a max (exact in any order) and per-element operations, and the only additions are the
 * NaN flag's (0 or NaN whatever the order), so every path gives the same bits. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define ROWS_FAKE_QUANT(name, attr)                                                                          \
    attr static void name(const float *x, float *out, int64_t rows, int64_t K, float eps) {                \
        for (int64_t r = 0; r < rows; r++) {                                                                 \
            const float *xr = x + r * K;                                                                     \
            float *o = out + r * K;                                                                          \
            /* 8 running maxima (a max is exact in any order) and 8 lanes of a - a: 0, or NaN once a NaN or \
             * inf passed (an inf amax makes every value NaN too: inv is 0 and 0 * inf is NaN) */             \
            v8f m = {0}, z = {0};                                                                            \
            int64_t k = 0;                                                                                   \
            for (; k + 8 <= K; k += 8) {                                                                     \
                v8f a;                                                                                       \
                __builtin_memcpy(&a, xr + k, sizeof a);                                                      \
                a = (v8f)((v8i)a & 0x7fffffff);                                                              \
                z += a - a;                                                                                  \
                const v8i gt = a > m;                                                                        \
                m = (v8f)(((v8i)a & gt) | ((v8i)m & ~gt));                                                   \
            }                                                                                                \
            float amax = 0.0f, zt = 0.0f;                                                                    \
            for (; k < K; k++) {                                                                             \
                const float a = __builtin_fabsf(xr[k]);                                                      \
                zt += a - a;                                                                                 \
                amax = a > amax ? a : amax;                                                                  \
            }                                                                                                \
            for (int j = 0; j < 8; j++) {                                                                    \
                zt += z[j];                                                                                  \
                amax = m[j] > amax ? m[j] : amax;                                                            \
            }                                                                                                \
            amax = zt != zt ? __builtin_nanf("") : (amax > eps ? amax : eps);                                \
            const float inv = (1.0f / amax) * 127.0f, step = amax / 127.0f;                                  \
            for (k = 0; k < K; k++) {                                                                        \
                float v = __builtin_rintf(xr[k] * inv);                                                      \
                v = v > 127.0f ? 127.0f : (v < -128.0f ? -128.0f : v);                                       \
                o[k] = v * step;                                                                             \
            }                                                                                                \
        }                                                                                                    \
    }

ROWS_FAKE_QUANT(rows_fake_quant_scalar, )
#if defined(__x86_64__)
ROWS_FAKE_QUANT(rows_fake_quant_avx2, __attribute__((target("avx2"))))
ROWS_FAKE_QUANT(rows_fake_quant_avx512, __attribute__((target("avx512f"))))
#endif

typedef void (*fake_quant_fn)(const float *, float *, int64_t, int64_t, float);

typedef struct {
    const float *x;
    float *out;
    int64_t rows, K;
    float eps;
    fake_quant_fn fn;
} fake_quant_job;

static void *fake_quant_thread(void *arg) {
    const fake_quant_job *j = (const fake_quant_job *)arg;
    j->fn(j->x, j->out, j->rows, j->K, j->eps);
    return NULL;
}

int mote_act_fake_quant_f32(const float *x, int64_t T, int64_t K, float eps, float *out, int threads, int isa) {
    isa = mote_isa_pick(isa);
    if (isa < 0) return -1;
    if (T < 0 || K <= 0) return -2;
    fake_quant_fn fn = rows_fake_quant_scalar;
#if defined(__x86_64__)
    if (isa == MOTE_AVX512) fn = rows_fake_quant_avx512;
    if (isa == MOTE_AVX2) fn = rows_fake_quant_avx2;
#endif
    threads = jobs_for(T * K, threads);
    if (threads > T) threads = T < 1 ? 1 : (int)T;
    fake_quant_job jobs[MAX_JOBS];
    for (int t = 0; t < threads; t++) {
        const int64_t b = T * t / threads, e = T * (t + 1) / threads;
        jobs[t] = (fake_quant_job){x + b * K, out + b * K, e - b, K, eps, fn};
    }
    run_jobs(fake_quant_thread, jobs, sizeof jobs[0], threads);
    return 0;
}
