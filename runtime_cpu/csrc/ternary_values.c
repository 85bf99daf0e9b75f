/* codes * s of a float32 weight matrix for a given absmean scale s: the training forward's ternary
 * weights (mote_edge/quant.py ternary_values), in one pass instead of torch's three.
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
    enum { MAX_JOBS = 64, MIN_PER_JOB = 1 << 18 };
    if (threads > MAX_JOBS) threads = MAX_JOBS;
    if (threads > n / MIN_PER_JOB) threads = (int)(n / MIN_PER_JOB);
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
