/* The training forward's ternary weights on CPU (mote_edge/quant.py): the absmean scale's sum and the values
 * codes * s, each in one pass over the latent float32 weights.
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
 * The caller's threads (torch's intra-op count) split the matrix into contiguous ranges, each on a
 * short-lived pthread: the call is milliseconds long, so a thread start (~20 us) is noise, and the
 * kernel pool (pool.c), which spins between calls, would steal cores from torch's own threads. */
#include <pthread.h>

#include "mote_kernels.h"

#define SCALE_BLOCK (1 << 16) /* exporters/ternary.py SCALE_BLOCK */
#define LANES 16

static double block_abs_sum(const float *x, int64_t len) {
    const int64_t rows = len / LANES;
    double lane[LANES] = {0};
    for (int64_t r = 0; r < rows; r++)
        for (int j = 0; j < LANES; j++) lane[j] += (double)__builtin_fabsf(x[r * LANES + j]);
    double s = 0.0;
    for (int j = 0; j < LANES; j++) s += lane[j];
    for (int64_t i = rows * LANES; i < len; i++) s += (double)__builtin_fabsf(x[i]);
    return s;
}

typedef struct {
    const float *w;
    int64_t n, b0, b1; /* blocks b0 .. b1 - 1 */
    double *sums;
} sum_job;

static void *sum_thread(void *arg) {
    const sum_job *j = (const sum_job *)arg;
    for (int64_t b = j->b0; b < j->b1; b++) {
        const int64_t lo = b * SCALE_BLOCK, len = j->n - lo < SCALE_BLOCK ? j->n - lo : SCALE_BLOCK;
        j->sums[b] = block_abs_sum(j->w + lo, len);
    }
    return NULL;
}

enum { MAX_JOBS = 64, MIN_PER_JOB = 1 << 18 };

static int jobs_for(int64_t n, int threads) {
    if (threads > MAX_JOBS) threads = MAX_JOBS;
    if (threads > n / MIN_PER_JOB) threads = (int)(n / MIN_PER_JOB);
    return threads < 1 ? 1 : threads;
}

/* Block sums on `threads` threads (into `sums`, one per block), added here in block order: the same total
 * whoever summed each block. */
double mote_abs_sum_f32(const float *w, int64_t n, int threads, double *sums) {
    const int64_t blocks = (n + SCALE_BLOCK - 1) / SCALE_BLOCK;
    const int t_n = jobs_for(n, threads);
    sum_job jobs[MAX_JOBS];
    pthread_t tid[MAX_JOBS];
    int started[MAX_JOBS] = {0};
    for (int t = 0; t < t_n; t++) {
        jobs[t] = (sum_job){w, n, blocks * t / t_n, blocks * (t + 1) / t_n, sums};
        started[t] = t > 0 && pthread_create(&tid[t], NULL, sum_thread, &jobs[t]) == 0;
    }
    for (int t = 0; t < t_n; t++)
        if (!started[t]) sum_thread(&jobs[t]);
    for (int t = 1; t < t_n; t++)
        if (started[t]) pthread_join(tid[t], NULL);
    double total = 0.0;
    for (int64_t b = 0; b < blocks; b++) total += sums[b];
    return total;
}

typedef struct {
    const float *w;
    float *out;
    int64_t n;
    float s;
} values_job;

static void values_range(const float *w, float *out, int64_t n, float s) {
    const float half = 0.5f * s, neg = -s;
    for (int64_t i = 0; i < n; i++) {
        const float x = w[i];
        out[i] = x > half ? s : (x < -half ? neg : 0.0f);
    }
}

static void *values_thread(void *arg) {
    const values_job *j = (const values_job *)arg;
    values_range(j->w, j->out, j->n, j->s);
    return NULL;
}

void mote_ternary_values_f32(const float *w, int64_t n, float s, float *out, int threads) {
    threads = jobs_for(n, threads);
    if (threads < 2) {
        values_range(w, out, n, s);
        return;
    }
    values_job jobs[MAX_JOBS];
    pthread_t tid[MAX_JOBS];
    int started[MAX_JOBS] = {0};
    for (int t = 0; t < threads; t++) {
        const int64_t b = n * t / threads, e = n * (t + 1) / threads;
        jobs[t] = (values_job){w + b, out + b, e - b, s};
        /* job 0 runs on the calling thread; a thread that cannot start runs here too */
        started[t] = t > 0 && pthread_create(&tid[t], NULL, values_thread, &jobs[t]) == 0;
    }
    for (int t = 0; t < threads; t++)
        if (!started[t]) values_range(jobs[t].w, jobs[t].out, jobs[t].n, jobs[t].s);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(tid[t], NULL);
}
