/* A persistent thread pool for the kernels: workers wait for a job generation number, take chunks from an
 * atomic counter, and spin briefly before sleeping, so decode's hundreds of short kernel calls per token
 * do not pay a futex wake-up each (a condition-variable round trip costs ~10-50 us; a matrix-vector
 * product at the 0.5B shape takes ~20-100 us). */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdatomic.h>
#include <unistd.h>

#include "mote_kernels.h"

#define MAX_THREADS 256
#define SPIN_ROUNDS 20000

static struct {
    int n;                        /* threads in use, caller included */
    pthread_t tid[MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t wake;
    atomic_int gen;               /* bumped once per job (and at shutdown) */
    atomic_int busy;              /* workers still inside the current job */
    atomic_llong next;            /* the next unclaimed item of the current job */
    mote_range_fn fn;
    void *ctx;
    int64_t items, grain;
    int stopping;
} P = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void run_chunks(void) {
    int64_t b;
    while ((b = atomic_fetch_add(&P.next, P.grain)) < P.items) {
        int64_t e = b + P.grain < P.items ? b + P.grain : P.items;
        P.fn(P.ctx, b, e);
    }
}

static void *worker(void *arg) {
    /* the generation at creation, passed in: read here it could already include a job posted meanwhile */
    int seen = (int)(intptr_t)arg;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&P.gen, memory_order_acquire) == seen && spins < SPIN_ROUNDS) {
            cpu_relax();
            spins++;
        }
        if (atomic_load_explicit(&P.gen, memory_order_acquire) == seen) {
            pthread_mutex_lock(&P.mu);
            while (atomic_load(&P.gen) == seen) pthread_cond_wait(&P.wake, &P.mu);
            pthread_mutex_unlock(&P.mu);
        }
        seen = atomic_load(&P.gen);
        if (P.stopping) return NULL;
        run_chunks();
        atomic_fetch_sub_explicit(&P.busy, 1, memory_order_release);
    }
}

static void stop_workers(void) {
    if (P.n <= 1) return;
    pthread_mutex_lock(&P.mu);
    P.stopping = 1;
    atomic_fetch_add(&P.gen, 1);
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);
    for (int i = 1; i < P.n; i++) pthread_join(P.tid[i], NULL);
    P.stopping = 0;
    P.n = 1;
}

int mote_set_threads(int n) {
    if (n <= 0) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n == P.n) return P.n;
    stop_workers();
    for (int i = 1; i < n; i++) {
        if (pthread_create(&P.tid[i], NULL, worker, (void *)(intptr_t)atomic_load(&P.gen)) != 0) {  /* keep what started */
            n = i;
            break;
        }
    }
    P.n = n;
    return P.n;
}

int mote_threads(void) { return P.n; }

void mote_parallel_for(mote_range_fn fn, void *ctx, int64_t n, int64_t grain) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (P.n == 1 || n <= grain) {
        fn(ctx, 0, n);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    P.items = n;
    P.grain = grain;
    atomic_store(&P.next, 0);
    atomic_store(&P.busy, P.n - 1);
    pthread_mutex_lock(&P.mu);  /* a sleeping worker re-checks gen under the lock: no lost wake-up */
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_release);
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);
    run_chunks();
    /* the last chunks may sit on a worker the OS has descheduled (other processes on the cores): after a
     * spell of spinning, yield the core so that worker can finish rather than burn its time slice */
    for (int spins = 0; atomic_load_explicit(&P.busy, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_ROUNDS)
            cpu_relax();
        else
            sched_yield();
    }
}

/* mote_parallel_tasks: the tasks' chunks numbered one after another; chunk c belongs to the task i with
 * first[i] <= c < first[i + 1]. */
typedef struct {
    const mote_task *t;
    int64_t first[MOTE_MAX_TASKS + 1], grain[MOTE_MAX_TASKS];
} task_set;

static void task_chunks(void *ctx, int64_t c0, int64_t c1) {
    const task_set *S = ctx;
    int i = 0;
    for (int64_t c = c0; c < c1; c++) {
        while (c >= S->first[i + 1]) i++;
        const mote_task *t = S->t + i;
        const int64_t b = (c - S->first[i]) * S->grain[i], e = b + S->grain[i] < t->n ? b + S->grain[i] : t->n;
        t->fn(t->ctx, b, e);
    }
}

void mote_parallel_tasks(const mote_task *tasks, int ntasks) {
    task_set S = {.t = tasks};
    if (ntasks < 0 || ntasks > MOTE_MAX_TASKS) return;
    S.first[0] = 0;
    for (int i = 0; i < ntasks; i++) {
        const int64_t g = tasks[i].grain < 1 ? 1 : tasks[i].grain, n = tasks[i].n > 0 ? tasks[i].n : 0;
        S.grain[i] = g;
        S.first[i + 1] = S.first[i] + (n + g - 1) / g;
    }
    /* grain here is in task chunks: a chunk is already a task's own grain of work */
    mote_parallel_for(task_chunks, &S, S.first[ntasks], 1);
}
