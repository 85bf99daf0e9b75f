/* Multiply-add ternary kernels: 2-bit codes unpacked with shifts and masks, multiplied with the int8
 * activations and accumulated in int32 (layout and output formula: mote_kernels.h).
 *
 * Codes are stored as weight + 1 in {0, 1, 2} (unsigned), so the x86 paths use the u8 x s8 instructions
 * directly (VNNI vpdpbusd, AVX2 vpmaddubsw) and subtract sum(q) once per token and row at the end:
 *   sum_k q_k * (c_k - 1) = sum_k q_k * c_k - sum_k q_k.
 * AVX2's vpmaddubsw adds two u8 x s8 products into an int16 lane: |2 * 2 * 128| = 512, and four of them
 * summed before widening stay <= 2048, far from int16 saturation, so the int32 result is exact.
 * NEON subtracts 1 from the codes (signed -1/0/+1) and widens products with vmull/vpadal.
 *
 * Each thread takes a range of rows and runs every token over them in tiles of up to TOK_TILE tokens, so a
 * row's codes are unpacked once per tile (prefill) and decode (T = 1) streams each row once.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mote_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#define TOK_TILE 4
#define ROW_GRAIN 16

/* ---- activation quantisation (per token, as mote_edge/quant.py quantize_activation_int8) --------------- */

int mote_quant_act(const float *x, int64_t x_stride, int64_t T, int64_t K, int64_t Kp, float eps, int8_t *q,
                   int64_t q_stride, int32_t *sumq, float *step, int isa) {
    /* Scalar on every ISA: it is O(T * K) against the product's O(T * K * N), and plain C keeps the exact
     * float32 semantics torch uses: its `127 / amax` is amax.reciprocal() * 127 (two roundings, not one
     * division), then one multiply and rint (round half to even). */
    if (mote_isa_pick(isa) < 0) return -1;
    if (T < 0 || K <= 0 || Kp < K || Kp % 256 || q_stride < Kp || x_stride < K) return -2;
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * x_stride;
        int8_t *qr = q + t * q_stride;
        float amax = 0.0f, xk;
        for (int64_t k = 0; k < K; k++) {
            memcpy(&xk, xr + k, sizeof xk);  /* x may be a view at any byte address */
            float a = fabsf(xk);
            amax = a > amax ? a : amax;
        }
        amax = amax > eps ? amax : eps;
        const float inv = (1.0f / amax) * 127.0f;  /* torch's 127 / amax: reciprocal, then times 127 */
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) {
            memcpy(&xk, xr + k, sizeof xk);
            float v = rintf(xk * inv);
            if (v != v) v = 0.0f;  /* NaN (a file with NaN weights): casting it to int8 is undefined */
            v = v > 127.0f ? 127.0f : (v < -128.0f ? -128.0f : v);
            qr[k] = (int8_t)v;
            s += qr[k];
        }
        memset(qr + K, 0, (size_t)(Kp - K));
        const float st = amax / 127.0f;
        memcpy(sumq + t, &s, sizeof s);
        memcpy(step + t, &st, sizeof st);
    }
    return 0;
}

/* ---- the product ---------------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *w;
    int64_t block_bytes, row_bytes, blocks;
    const int8_t *q;  /* the activations as the path reads them (AVX512: block order, see below) */
    int64_t q_stride;
    const int32_t *sumq;
    const float *step, *scale;
    int64_t T;
    float *y;
    int64_t y_stride;
} job_t;

static inline void store(const job_t *J, int64_t t, int64_t n, int32_t dot) {
    /* step / scale / sumq / y may sit at any byte address (numpy views): memcpy, never a misaligned load */
    int32_t sq;
    float st, sc;
    memcpy(&sq, J->sumq + t, sizeof sq);
    memcpy(&st, J->step + t, sizeof st);
    memcpy(&sc, J->scale + n, sizeof sc);
    const float y = (float)((double)(dot - sq) * ((double)st * (double)sc));
    memcpy(J->y + t * J->y_stride + n, &y, sizeof y);
}

static void rows_scalar(void *ctx, int64_t n0, int64_t n1) {
    const job_t *J = ctx;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = J->w + n * J->row_bytes;
        for (int64_t t = 0; t < J->T; t++) {
            const int8_t *qt = J->q + t * J->q_stride;
            int32_t dot = 0;
            for (int64_t b = 0; b < J->blocks; b++) {
                const uint8_t *blk = row + b * J->block_bytes;
                const int8_t *qb = qt + b * 256;
                for (int h = 0; h < 2; h++)
                    for (int j = 0; j < 32; j++) {
                        const unsigned v = blk[h * 32 + j];
                        for (int s = 0; s < 4; s++) dot += (int32_t)((v >> (2 * s)) & 3u) * qb[h * 128 + j + 32 * s];
                    }
            }
            store(J, t, n, dot);
        }
    }
}

#if defined(__x86_64__)

__attribute__((target("avx2"))) static inline int32_t hsum_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* One row x TT tokens; TT is a compile-time constant at each call so the accumulators stay in registers. */
__attribute__((target("avx2"), always_inline)) static inline void row_avx2(const job_t *J, int64_t n, int64_t t0,
                                                                           const int TT) {
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[TOK_TILE];
    for (int i = 0; i < TT; i++) acc[i] = _mm256_setzero_si256();
    const uint8_t *row = J->w + n * J->row_bytes;
    for (int64_t b = 0; b < J->blocks; b++) {
        for (int h = 0; h < 2; h++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(row + b * J->block_bytes + 32 * h));
            const __m256i c0 = _mm256_and_si256(w, m3), c1 = _mm256_and_si256(_mm256_srli_epi16(w, 2), m3);
            const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m3), c3 = _mm256_and_si256(_mm256_srli_epi16(w, 6), m3);
            for (int i = 0; i < TT; i++) {
                const int8_t *qq = J->q + (t0 + i) * J->q_stride + b * 256 + h * 128;
                __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i *)qq)),
                                             _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i *)(qq + 32))));
                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i *)(qq + 64))));
                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i *)(qq + 96))));
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int i = 0; i < TT; i++) store(J, t0 + i, n, hsum_avx2(acc[i]));
}

__attribute__((target("avx2"))) static void rows_avx2(void *ctx, int64_t n0, int64_t n1) {
    const job_t *J = ctx;
    for (int64_t n = n0; n < n1; n++) {
        int64_t t = 0;
        for (; t + TOK_TILE <= J->T; t += TOK_TILE) row_avx2(J, n, t, TOK_TILE);
        for (; t < J->T; t++) row_avx2(J, n, t, 1);
    }
}

#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi"

/* AVX512 reads a whole block (64 code bytes: both halves) per load, so the activations are put in block
 * order first: for each 256-block, 64 bytes per shift s = q[32s .. 32s+31] then q[128+32s .. 128+32s+31]. */
static void to_block_order(const int8_t *q, int64_t q_stride, int64_t T, int64_t Kp, int8_t *out) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t b = 0; b < Kp / 256; b++) {
            const int8_t *src = q + t * q_stride + b * 256;
            int8_t *dst = out + t * Kp + b * 256;
            for (int s = 0; s < 4; s++) {
                memcpy(dst + 64 * s, src + 32 * s, 32);
                memcpy(dst + 64 * s + 32, src + 128 + 32 * s, 32);
            }
        }
}

__attribute__((target(AVX512_TARGET), always_inline)) static inline void row_avx512(const job_t *J, int64_t n,
                                                                                   int64_t t0, const int TT) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[TOK_TILE];
    for (int i = 0; i < TT; i++) acc[i] = _mm512_setzero_si512();
    const uint8_t *row = J->w + n * J->row_bytes;
    for (int64_t b = 0; b < J->blocks; b++) {
        const __m512i w = _mm512_loadu_si512((const void *)(row + b * J->block_bytes));
        const __m512i c0 = _mm512_and_si512(w, m3), c1 = _mm512_and_si512(_mm512_srli_epi16(w, 2), m3);
        const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(w, 4), m3), c3 = _mm512_and_si512(_mm512_srli_epi16(w, 6), m3);
        for (int i = 0; i < TT; i++) {
            const int8_t *qq = J->q + (t0 + i) * J->q_stride + b * 256;
            __m512i a = _mm512_dpbusd_epi32(acc[i], c0, _mm512_loadu_si512((const void *)qq));
            a = _mm512_dpbusd_epi32(a, c1, _mm512_loadu_si512((const void *)(qq + 64)));
            a = _mm512_dpbusd_epi32(a, c2, _mm512_loadu_si512((const void *)(qq + 128)));
            acc[i] = _mm512_dpbusd_epi32(a, c3, _mm512_loadu_si512((const void *)(qq + 192)));
        }
    }
    for (int i = 0; i < TT; i++) store(J, t0 + i, n, _mm512_reduce_add_epi32(acc[i]));
}

__attribute__((target(AVX512_TARGET))) static void rows_avx512(void *ctx, int64_t n0, int64_t n1) {
    const job_t *J = ctx;
    for (int64_t n = n0; n < n1; n++) {
        int64_t t = 0;
        for (; t + TOK_TILE <= J->T; t += TOK_TILE) row_avx512(J, n, t, TOK_TILE);
        for (; t < J->T; t++) row_avx512(J, n, t, 1);
    }
}
#endif /* __x86_64__ */

#if defined(__aarch64__)
static void rows_neon(void *ctx, int64_t n0, int64_t n1) {
    const job_t *J = ctx;
    const uint8x16_t m3 = vdupq_n_u8(3);
    const int8x16_t one = vdupq_n_s8(1);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = J->w + n * J->row_bytes;
        for (int64_t t = 0; t < J->T; t++) {
            const int8_t *qt = J->q + t * J->q_stride;
            int32x4_t acc = vdupq_n_s32(0);
            for (int64_t b = 0; b < J->blocks; b++)
                for (int h = 0; h < 2; h++)
                    for (int j = 0; j < 32; j += 16) {  /* 16 code bytes = 64 weights: j..j+15 + 32 s */
                        const uint8x16_t w = vld1q_u8(row + b * J->block_bytes + 32 * h + j);
                        const int8_t *qq = qt + b * 256 + h * 128 + j;
                        int16x8_t p = vdupq_n_s16(0);  /* 8 products of |1 * 128| per lane at most */
                        for (int s = 0; s < 4; s++) {
                            const uint8x16_t u = vandq_u8(vshlq_u8(w, vdupq_n_s8((int8_t)(-2 * s))), m3);
                            const int8x16_t c = vsubq_s8(vreinterpretq_s8_u8(u), one);
                            const int8x16_t x = vld1q_s8(qq + 32 * s);
                            p = vmlal_s8(p, vget_low_s8(c), vget_low_s8(x));
                            p = vmlal_high_s8(p, c, x);
                        }
                        acc = vpadalq_s16(acc, p);
                    }
            /* the codes were made signed above, so sum(q) is already accounted for: add it back for store() */
            store(J, t, n, vaddvq_s32(acc) + J->sumq[t]);
        }
    }
}
#endif

/* The arguments mote_tern_gemm checks (mote_kernels.h's layout); 0 when they describe a product. */
static int bad_call(const mote_tern_call *c) {
    return c->N < 0 || c->T < 0 || c->Kp <= 0 || c->Kp % 256 || c->block_bytes < 64 ||
           c->row_bytes < c->Kp / 256 * c->block_bytes || c->q_stride < c->Kp || c->y_stride < c->N;
}

static mote_range_fn rows_fn(int isa) {
    switch (isa) {
#if defined(__x86_64__)
    case MOTE_AVX2: return rows_avx2;
    case MOTE_AVX512: return rows_avx512;
#endif
#if defined(__aarch64__)
    case MOTE_NEON: return rows_neon;
#endif
    default: return rows_scalar;
    }
}

int mote_tern_gemm_batch(const mote_tern_call *calls, int n, int isa) {
    isa = mote_isa_pick(isa);
    if (isa < 0) return -1;
    if (n < 0 || n > MOTE_MAX_TASKS) return -2;
    for (int i = 0; i < n; i++)
        if (bad_call(calls + i)) return -2;
    job_t J[MOTE_MAX_TASKS];
    mote_task tasks[MOTE_MAX_TASKS];
#if defined(__x86_64__)
    const mote_tern_call *src[MOTE_MAX_TASKS];  /* the call each job was made from */
#endif
    int8_t *owned[MOTE_MAX_TASKS];              /* AVX512: the block-order copy this job allocated, or NULL */
    int nt = 0, rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const mote_tern_call *c = calls + i;
        if (c->N == 0 || c->T == 0) continue;
        J[nt] = (job_t){c->w, c->block_bytes, c->row_bytes, c->Kp / 256, c->q, c->q_stride, c->sumq, c->step,
                        c->scale, c->T, c->y, c->y_stride};
        owned[nt] = NULL;
#if defined(__x86_64__)
        src[nt] = c;
        if (isa == MOTE_AVX512) {  /* block order once per distinct activation set (an expert's gate and up share one) */
            for (int k = 0; k < nt; k++)
                if (src[k]->q == c->q && src[k]->q_stride == c->q_stride && src[k]->T == c->T && src[k]->Kp == c->Kp) {
                    J[nt].q = J[k].q;
                    break;
                }
            if (J[nt].q == c->q) {
                owned[nt] = malloc((size_t)(c->T * c->Kp));
                if (!owned[nt]) {
                    rc = -3;
                    break;
                }
                to_block_order(c->q, c->q_stride, c->T, c->Kp, owned[nt]);
                J[nt].q = owned[nt];
            }
            J[nt].q_stride = c->Kp;
        }
#endif
        tasks[nt] = (mote_task){rows_fn(isa), J + nt, c->N, ROW_GRAIN};
        nt++;
    }
    if (rc == 0) mote_parallel_tasks(tasks, nt);
    for (int k = 0; k < nt; k++) free(owned[k]);
    return rc;
}

int mote_tern_gemm(const uint8_t *w, int64_t block_bytes, int64_t row_bytes, int64_t N, int64_t Kp, const int8_t *q,
                   int64_t q_stride, const int32_t *sumq, const float *step, const float *scale, int64_t T, float *y,
                   int64_t y_stride, int isa) {
    const mote_tern_call c = {w, block_bytes, row_bytes, N, Kp, q, q_stride, sumq, step, scale, T, y, y_stride};
    return mote_tern_gemm_batch(&c, 1, isa);
}
