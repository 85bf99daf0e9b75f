/* The mote engine's C kernels: one library, every ISA path compiled in, the path chosen at run time.
 *
 * Build: one translation unit per kernel family, compiled WITHOUT -march flags; each ISA path is a set of
 * functions with __attribute__((target(...))) (x86) or behind __aarch64__ (NEON is baseline there), so the
 * one library runs on every x86-64 machine and picks AVX512 / AVX2 / scalar from cpuid.
 *
 * Threads: one persistent pool (pool.c). A kernel splits its rows into ranges and calls
 * mote_parallel_for; the caller's thread works too. Python calls through ctypes, which releases the GIL.
 *
 * Ternary weights ("TQ2_0 codes", the layout every ternary kernel reads):
 *   a row is K/256 blocks, `block_bytes` apart (66 = GGUF TQ2_0 used in place: 64 code bytes + fp16 d;
 *   64 = a repacked copy without d). In each block, byte j of half h (h = 0, 1; j = 0..31) holds the codes
 *   of weights h*128 + j + 32*s at bits 2s..2s+1 (s = 0..3), code = weight + 1 in {0, 1, 2}.
 *   Rows are `row_bytes` apart. The fp16 d of a TQ2_0 block is NOT read: one fp32 scale per row is.
 * Activations: int8 per token (absmax, round half to even, as MoTE trains), K padded with zeros to a
 *   multiple of 256, rows `q_stride` bytes apart, sumq[t] = sum of token t's int8 values, step[t] = amax/127.
 * Output: y[t][n] = (float)((double)acc * ((double)step[t] * (double)scale[n])),
 *   acc = sum_k q[t][k] * (code[n][k] - 1) exactly in int32 (|acc| <= 128 * K < 2^31 for K < 2^24).
 */
#ifndef MOTE_KERNELS_H
#define MOTE_KERNELS_H
#include <stddef.h>
#include <stdint.h>

enum mote_isa { MOTE_SCALAR = 0, MOTE_AVX2 = 1, MOTE_AVX512 = 2, MOTE_NEON = 3, MOTE_ISA_AUTO = -1 };
/* AVX2 = avx2 + fma + f16c; AVX512 = avx512 f/bw/vl/vnni/vbmi (Ice Lake, Sapphire Rapids, Zen4 and later);
 * NEON = aarch64 (with dotprod where the CPU has it). */
int mote_isa_runs(int isa);   /* 1 when this CPU and this build run `isa` */
int mote_isa_best(void);      /* the highest level that runs */
int mote_isa_pick(int isa);   /* MOTE_ISA_AUTO -> best; a level that does not run -> -1 */
int mote_has_dotprod(void);   /* aarch64: the sdot instruction (0 elsewhere) */

/* Thread pool. n <= 0 -> the number of online CPUs. Returns the threads now in use (caller included). */
int mote_set_threads(int n);
int mote_threads(void);
typedef void (*mote_range_fn)(void *ctx, int64_t begin, int64_t end);
/* Runs fn(ctx, b, e) over [0, n) in chunks of `grain` items (the last may be shorter), on every thread of
 * the pool; returns when all chunks are done. Not reentrant: call it from one thread at a time. */
void mote_parallel_for(mote_range_fn fn, void *ctx, int64_t n, int64_t grain);
/* Several such loops as one pool job: every chunk of every task goes to whichever thread is free, so small
 * products (a MoE layer's chosen experts) keep all threads busy with one wake-up instead of one each. */
#define MOTE_MAX_TASKS 64
typedef struct {
    mote_range_fn fn;
    void *ctx;
    int64_t n, grain;
} mote_task;
void mote_parallel_tasks(const mote_task *tasks, int ntasks);  /* ntasks <= MOTE_MAX_TASKS */

/* One ternary product of a batch: mote_tern_gemm's arguments. For the lookup-table family `w` is the LUT-packed
 * matrix and block_bytes / row_bytes / sumq are not read. A batch runs all its products in one pool job. */
typedef struct {
    const uint8_t *w;
    int64_t block_bytes, row_bytes, N, Kp;
    const int8_t *q;
    int64_t q_stride;
    const int32_t *sumq;
    const float *step, *scale;
    int64_t T;
    float *y;
    int64_t y_stride;
} mote_tern_call;
int mote_tern_gemm_batch(const mote_tern_call *calls, int n, int isa);  /* multiply-add (ternary_mad.c) */
int mote_lut_gemm_batch(const mote_tern_call *calls, int n, int isa);   /* lookup-table (ternary_lut.c) */

/* training (ternary_values.c): sum |w| in the exporter's order (every isa the same bits; one that does not run:
 * NaN); codes * s for a finite scale s on `threads` threads (every isa the same values; -1: isa does not run);
 * the per-token int8 values of T rows of K activations (contiguous; -1: isa does not run, -2: bad sizes) */
double mote_abs_sum_f32(const float *w, int64_t n, int threads, double *block_sums, int isa);
int mote_ternary_values_f32(const float *w, int64_t n, float s, float *out, int threads, int isa);
int mote_act_fake_quant_f32(const float *x, int64_t T, int64_t K, float eps, float *out, int threads, int isa);
/* the threads of those three: torch's OpenMP team (libgomp's GOMP_parallel, or NULL: short-lived pthreads) */
void mote_train_set_team(void *gomp_parallel);

#endif
