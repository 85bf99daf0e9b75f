/* Float-weight kernels: y[t][n] = sum_k x[t][k] * W[n][k] (+ bias[n]), activations fp32, on the GGUF bytes in
 * place (no float32 copy of the weights: F16 / BF16 / Q8_0 / Q4_0 are decoded in registers, block by block).
 *
 * Weight types (ggml numbers), a row of K weights, rows `row_bytes` apart, no alignment assumed anywhere:
 *   F32 = 0, F16 = 1, BF16 = 30: K values of 4 / 2 / 2 bytes (bf16 = the top half of an fp32).
 *   Q8_0 = 8: K/32 blocks of 34 bytes: fp16 d, 32 int8 q; weight = q * d.
 *   Q4_0 = 2: K/32 blocks of 18 bytes: fp16 d, 16 bytes; byte j = weight j (low nibble) | weight j+16 (high
 *     nibble); weight = (nibble - 8) * d.
 * Every decoded weight is exact in fp32 (an fp16 / bf16 value, or int8 x fp16 d: at most 19 significant bits),
 * so the only roundings are the fp32 sums (FMA: products not rounded; decode of a Q block scales the block's
 * dot by d, one rounding more). Whatever the order, each term goes through at most K + 3 roundings:
 * |y - exact| <= gamma_(K+3) * (sum_k |x w| + |bias|), gamma_n = n u / (1 - n u), u = 2^-24
 * (tests/test_kernels_float.py asserts it for every path, and the paths against each other).
 *
 * Shape of every path: a tile of R rows x TT tokens keeps R*TT vector accumulators; each 32-weight unit of
 * the R rows is decoded once into registers and used by the TT tokens (prefill decodes a weight once per TT
 * tokens, not once per token). R x TT: AVX512 4 x 4 (16-float vectors, 32 weights a unit), AVX2 2 x 4 (8-float,
 * 16 a unit), NEON 2 x 4 (4-float, 32 a unit), scalar 1 x 4. Tokens are processed in chunks of TC (x chunk
 * <= 256 KiB, stays in L2) so the x rows a tile reads stay cached across row tiles. Decode (T = 1) uses the
 * spare accumulators for more FMA chains per row, scales a Q block's dot rather than its weights, and
 * prefetches (PREFETCH_MIN). Float-type K tails (K % 32, or % 16) are done in scalar after the vector part:
 * no load past a row. Threads: the (concatenated) output rows are split with mote_parallel_for, ~4 chunks
 * per thread, each a multiple of 16 rows.
 *
 * Return: 0 done, -1 ISA not runnable, -2 bad sizes (K < 1, K % 32 for Q8_0/Q4_0, row_bytes too small,
 * strides too small, null pointers, more than MOTE_FLOAT_MAX_MATS matrices), -3 unknown weight type.
 *
 * Public functions (declared here; to be added to mote_kernels.h):
 *   int mote_float_gemm(int wtype, const void *w, int64_t row_bytes, int64_t N, int64_t K,
 *                       const float *x, int64_t x_stride, int64_t T, const float *bias,
 *                       float *y, int64_t y_stride, int isa);
 *   int mote_float_gemm_multi(int n_mats, const mote_float_mat *mats, int64_t K, const float *x,
 *                             int64_t x_stride, int64_t T, int isa);
 *     several matrices on the same x (fused q/k/v, gate/up): one pool dispatch over all their rows.
 */
#include <string.h>

#include "mote_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#define WT_F32 0
#define WT_F16 1
#define WT_Q4_0 2
#define WT_Q8_0 8
#define WT_BF16 30
#define MOTE_FLOAT_MAX_MATS 16
#define X_CHUNK_BYTES (256 * 1024)
/* Software prefetch, into L2, of the same place in the rows of a later tile, >= PREFETCH_MIN bytes ahead: the
 * hardware prefetchers stop at 4 KiB pages (a mapped GGUF file has those) and a tile's R short rows look like R
 * short streams to them. Measured on decode from DRAM (CPU-time GB/s, 1 thread, 4 KiB pages, 4864 x 896):
 * none 6.2-7.3 / 4.5 / 3.9 (F16 / Q8_0 / Q4_0), 2 KiB ahead in the row 8.2-9.2 / 5.5-5.8 / 5.6-6.2, this
 * 10.3-11.3 / 8.6-8.8 / 6.2-7.4. A prefetch past the matrix's end touches nothing (prefetches do not fault). */
#define PREFETCH_MIN 8192

typedef struct {
    int wtype;
    const void *w;
    int64_t row_bytes, N;
    const float *bias; /* N values, or NULL */
    float *y;          /* y[t * y_stride + n] */
    int64_t y_stride;
} mote_float_mat;

int mote_float_gemm(int wtype, const void *w, int64_t row_bytes, int64_t N, int64_t K, const float *x,
                    int64_t x_stride, int64_t T, const float *bias, float *y, int64_t y_stride, int isa);
int mote_float_gemm_multi(int n_mats, const mote_float_mat *mats, int64_t K, const float *x, int64_t x_stride,
                          int64_t T, int isa);

typedef void (*rows_fn)(const mote_float_mat *m, int64_t n0, int64_t n1, const float *x, int64_t xs, int64_t K,
                        int64_t T, int64_t TC);

/* bytes of a unit of `n` weights (n = 16 or 32) */
#define UNIT_BYTES(wt, n) ((wt) == WT_F32 ? 4 * (n) : (wt) == WT_Q8_0 ? 34 * (n) / 32 : (wt) == WT_Q4_0 ? 18 * (n) / 32 : 2 * (n))
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE void prefetch_ahead(const uint8_t *p, int64_t ahead) { /* as an integer: no pointer past the buffer */
    __builtin_prefetch((const void *)((uintptr_t)p + (uintptr_t)ahead), 0, 2);
}

/* the prefetch distance: whole tiles of `rmax` rows, at least PREFETCH_MIN bytes */
static inline int64_t tile_ahead(int64_t rb, int rmax) {
    int64_t tile = rb * rmax;
    return tile * ((PREFETCH_MIN + tile - 1) / tile);
}
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* ---------------------------------------------------------------- scalar helpers (every path uses them) */

static inline uint16_t ld16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp16 -> fp32, exact for every value (subnormals by an exact multiply, no reliance on denormal modes). */
static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, em = h & 0x7fff;
    if (em >= 0x7c00) return bits_f32(sign | 0x7f800000u | ((em & 0x3ff) << 13)); /* inf / nan */
    if (em >= 0x0400) return bits_f32(sign | ((em << 13) + ((127 - 15) << 23)));
    float v = (float)em * 0x1p-24f; /* subnormal or zero: m * 2^-24, a normal fp32 */
    return sign ? -v : v;
}

static inline float bf2f(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static int64_t type_row_bytes(int wt, int64_t K) { /* bytes of K weights; -1 unknown type, -2 bad K */
    switch (wt) {
    case WT_F32: return 4 * K;
    case WT_F16:
    case WT_BF16: return 2 * K;
    case WT_Q8_0: return K % 32 ? -2 : K / 32 * 34;
    case WT_Q4_0: return K % 32 ? -2 : K / 32 * 18;
    default: return -1;
    }
}

/* weight k of a float-type row (used for K tails) */
static inline float w_at(int wt, const uint8_t *row, int64_t k) {
    switch (wt) {
    case WT_F32: {
        float f;
        memcpy(&f, row + 4 * k, 4);
        return f;
    }
    case WT_F16: return h2f(ld16(row + 2 * k));
    default: return bf2f(ld16(row + 2 * k)); /* WT_BF16 */
    }
}

/* sum over k in [k0, K) of w[k] * x[k] (float types only; the tail after the vector part) */
static float tail_dot(int wt, const uint8_t *row, int64_t k0, int64_t K, const float *x) {
    float s = 0.0f;
    for (int64_t k = k0; k < K; k++) s += w_at(wt, row, k) * x[k];
    return s;
}

/* y[t0 + t][n + r] = s[r * ld + t] (+ bias[n + r]) */
static inline void store_tile(const mote_float_mat *m, int64_t n, int R, int64_t t0, int tt, const float *s, int ld) {
    for (int r = 0; r < R; r++) {
        float b = m->bias ? m->bias[n + r] : 0.0f;
        for (int t = 0; t < tt; t++) {
            float v = s[r * ld + t];
            m->y[(t0 + t) * m->y_stride + n + r] = m->bias ? v + b : v;
        }
    }
}

/* The token/row loops every vector path shares: `TILE(R, tt)` computes s[R][ATT] for rows n.. and tokens
 * t0..; R is RMAX or 1 (the rows left after full tiles), tt is 1..ATT (the tokens left). (Measured on AVX512:
 * 4 rows x 4 tokens beats 2 x 8, 3 x 6 and 3 x 8 at T = 64 and 512 by ~1.5x; wider tiles run out of registers
 * or lose the rows' shared x loads.) */
#define ROWS_LOOP(RMAX, ATT, TILE)                                                      \
    float s[(RMAX) * (ATT)];                                                            \
    const int64_t pf = tile_ahead(m->row_bytes, (RMAX));                                \
    for (int64_t c0 = 0; c0 < T; c0 += TC) {                                            \
        int64_t c1 = MIN(T, c0 + TC);                                                   \
        for (int64_t n = n0; n < n1;) {                                                 \
            int R = n1 - n >= (RMAX) ? (RMAX) : 1;                                      \
            const uint8_t *wr = (const uint8_t *)m->w + n * m->row_bytes;               \
            for (int64_t t0 = c0; t0 < c1; t0 += (ATT)) {                               \
                int tt = (int)MIN((int64_t)(ATT), c1 - t0);                             \
                const float *xt = x + t0 * xs;                                          \
                if (R == (RMAX)) {                                                      \
                    switch (tt) {                                                       \
                    case 4: TILE(RMAX, 4); break;                                       \
                    case 3: TILE(RMAX, 3); break;                                       \
                    case 2: TILE(RMAX, 2); break;                                       \
                    default: TILE(RMAX, 1); break;                                      \
                    }                                                                   \
                } else {                                                                \
                    switch (tt) {                                                       \
                    case 4: TILE(1, 4); break;                                          \
                    case 3: TILE(1, 3); break;                                          \
                    case 2: TILE(1, 2); break;                                          \
                    default: TILE(1, 1); break;                                         \
                    }                                                                   \
                }                                                                       \
                store_tile(m, n, R, t0, tt, s, (ATT));                                  \
            }                                                                           \
            n += R;                                                                     \
        }                                                                               \
    }

/* ---------------------------------------------------------------- scalar path */

/* the first `len` (<= 32) weights of unit u (weights 32u ..) of a row, as floats */
static inline void sc_unit(int wt, const uint8_t *row, int64_t u, int len, float *wb) {
    switch (wt) {
    case WT_Q8_0: {
        const uint8_t *blk = row + 34 * u;
        float d = h2f(ld16(blk));
        for (int j = 0; j < 32; j++) wb[j] = (float)(int8_t)blk[2 + j] * d;
        break;
    }
    case WT_Q4_0: {
        const uint8_t *blk = row + 18 * u;
        float d = h2f(ld16(blk));
        for (int j = 0; j < 16; j++) {
            wb[j] = (float)((blk[2 + j] & 15) - 8) * d;
            wb[j + 16] = (float)((blk[2 + j] >> 4) - 8) * d;
        }
        break;
    }
    default:
        for (int j = 0; j < len; j++) wb[j] = w_at(wt, row, 32 * u + j);
    }
}

#define SC_TT 4
static void sc_rows(const mote_float_mat *m, int64_t n0, int64_t n1, const float *x, int64_t xs, int64_t K,
                    int64_t T, int64_t TC) {
    int wt = m->wtype;
    float wb[32];
    for (int64_t c0 = 0; c0 < T; c0 += TC) {
        int64_t c1 = MIN(T, c0 + TC);
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t *row = (const uint8_t *)m->w + n * m->row_bytes;
            for (int64_t t0 = c0; t0 < c1; t0 += SC_TT) {
                int tt = (int)MIN((int64_t)SC_TT, c1 - t0);
                float acc[SC_TT] = {0};
                for (int64_t u = 0; u * 32 < K; u++) {
                    int len = (int)MIN((int64_t)32, K - 32 * u);
                    sc_unit(wt, row, u, len, wb);
                    for (int t = 0; t < tt; t++) {
                        const float *xp = x + (t0 + t) * xs + 32 * u;
                        float a = acc[t];
                        for (int j = 0; j < len; j++) a += wb[j] * xp[j];
                        acc[t] = a;
                    }
                }
                store_tile(m, n, 1, t0, tt, acc, SC_TT);
            }
        }
    }
}

/* ---------------------------------------------------------------- x86: AVX2 (+FMA, F16C) and AVX512 */
#if defined(__x86_64__)

#define A2_TARGET "avx2,fma,f16c"
#define A2_INLINE static inline __attribute__((always_inline, target(A2_TARGET)))
#define A2_FN static __attribute__((target(A2_TARGET)))
#define A2_R 2
#define A2_TT 4 /* ROWS_LOOP's switch covers up to 4 */

/* AVX2 unit: 16 weights (half a Q block), elements 16u .. 16u+15, as two 8-float vectors; for Q8_0 / Q4_0 the
 * integer codes, and *d = the block's scale */
A2_INLINE void a2_unit(int wt, const uint8_t *row, int64_t u, __m256 *v0, __m256 *v1, __m256 *d) {
    switch (wt) {
    case WT_F32: {
        const uint8_t *p = row + 64 * u;
        *v0 = _mm256_loadu_ps((const float *)p);
        *v1 = _mm256_loadu_ps((const float *)(p + 32));
        break;
    }
    case WT_F16: {
        const uint8_t *p = row + 32 * u;
        *v0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        *v1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
        break;
    }
    case WT_BF16: {
        const uint8_t *p = row + 32 * u;
        *v0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
        *v1 = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 16))), 16));
        break;
    }
    case WT_Q8_0: {
        const uint8_t *blk = row + 34 * (u >> 1), *q = blk + 2 + 16 * (u & 1);
        *d = _mm256_cvtph_ps(_mm_set1_epi16((short)ld16(blk)));
        *v0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
        *v1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8))));
        break;
    }
    default: { /* WT_Q4_0: half 0 = low nibbles of the 16 bytes, half 1 = high nibbles */
        const uint8_t *blk = row + 18 * (u >> 1);
        *d = _mm256_cvtph_ps(_mm_set1_epi16((short)ld16(blk)));
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
        if (u & 1) q = _mm_srli_epi16(q, 4);
        q = _mm_sub_epi8(_mm_and_si128(q, _mm_set1_epi8(15)), _mm_set1_epi8(8));
        *v0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        *v1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
        break;
    }
    }
}

A2_INLINE float a2_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* s[r * A2_TT + t] = row r . token t, for R rows from w and TT tokens from x */
A2_INLINE void a2_tile(int wt, int R, int TT, const uint8_t *w, int64_t rb, int64_t pf, int64_t K, const float *x,
                       int64_t xs, float *s) {
    const int quant = wt == WT_Q8_0 || wt == WT_Q4_0;
    __m256 acc[A2_R][A2_TT];
    for (int r = 0; r < A2_R; r++)
        for (int t = 0; t < A2_TT; t++) acc[r][t] = _mm256_setzero_ps();
    int64_t nu = K / 16;
    for (int64_t u = 0; u < nu; u++) {
        __m256 w0[A2_R], w1[A2_R], d[A2_R];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            prefetch_ahead(w + r * rb + u * UNIT_BYTES(wt, 16), pf);
            a2_unit(wt, w + r * rb, u, &w0[r], &w1[r], &d[r]);
        }
        if (quant && TT == 1) { /* decode: scale the half block's dot, not its weights */
            __m256 x0 = _mm256_loadu_ps(x + 16 * u), x1 = _mm256_loadu_ps(x + 16 * u + 8);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                acc[r][0] = _mm256_fmadd_ps(_mm256_fmadd_ps(w1[r], x1, _mm256_mul_ps(w0[r], x0)), d[r], acc[r][0]);
            continue;
        }
        if (quant) {
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                w0[r] = _mm256_mul_ps(w0[r], d[r]);
                w1[r] = _mm256_mul_ps(w1[r], d[r]);
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const float *xp = x + t * xs + 16 * u;
            __m256 x0 = _mm256_loadu_ps(xp), x1 = _mm256_loadu_ps(xp + 8);
            int t1 = TT == 1 ? 1 : t; /* decode: a second FMA chain per row in the spare accumulator */
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                acc[r][t] = _mm256_fmadd_ps(w0[r], x0, acc[r][t]);
                acc[r][t1] = _mm256_fmadd_ps(w1[r], x1, acc[r][t1]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        if (TT == 1) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][1]);
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            float v = a2_hsum(acc[r][t]);
            if (K > 16 * nu) v += tail_dot(wt, w + r * rb, 16 * nu, K, x + t * xs);
            s[r * A2_TT + t] = v;
        }
    }
}

#define A2_TILE(R_, TT_) a2_tile(wt, R_, TT_, wr, m->row_bytes, pf, K, xt, xs, s)
A2_INLINE void a2_rows(int wt, const mote_float_mat *m, int64_t n0, int64_t n1, const float *x, int64_t xs, int64_t K,
                       int64_t T, int64_t TC) {
    ROWS_LOOP(A2_R, A2_TT, A2_TILE)
}

#define A5_TARGET "avx512f,avx512bw,avx512vl,avx2,fma,f16c"
#define A5_INLINE static inline __attribute__((always_inline, target(A5_TARGET)))
#define A5_FN static __attribute__((target(A5_TARGET)))
#define A5_R 4
#define A5_TT 4

/* AVX512 unit: 32 weights (one Q block), elements 32u .. 32u+31, as two 16-float vectors; for Q8_0 / Q4_0
 * the integer codes, and *d = the block's scale (the tile multiplies where it costs least) */
A5_INLINE __m512 a5_d(const uint8_t *blk) { /* broadcast the fp16, then convert: fewer uops than scalar cvt */
    return _mm512_cvtph_ps(_mm256_set1_epi16((short)ld16(blk)));
}

A5_INLINE void a5_unit(int wt, const uint8_t *row, int64_t u, __m512 *v0, __m512 *v1, __m512 *d) {
    switch (wt) {
    case WT_F32: {
        const uint8_t *p = row + 128 * u;
        *v0 = _mm512_loadu_ps(p);
        *v1 = _mm512_loadu_ps(p + 64);
        break;
    }
    case WT_F16: {
        const uint8_t *p = row + 64 * u;
        *v0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        *v1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
        break;
    }
    case WT_BF16: {
        const uint8_t *p = row + 64 * u;
        *v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
        *v1 = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 32))), 16));
        break;
    }
    case WT_Q8_0: {
        const uint8_t *blk = row + 34 * u;
        *d = a5_d(blk);
        *v0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
        *v1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
        break;
    }
    default: { /* WT_Q4_0: vpermps reads only the low 4 bits of each index, so the byte itself indexes the
                  table (nibble - 8) for the low nibble, and the byte >> 4 for the high one */
        const uint8_t *blk = row + 18 * u;
        const __m512 tbl = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
        *d = a5_d(blk);
        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)));
        *v0 = _mm512_permutexvar_ps(q, tbl);
        *v1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), tbl);
        break;
    }
    }
}

A5_INLINE void a5_tile(int wt, int R, int TT, const uint8_t *w, int64_t rb, int64_t pf, int64_t K, const float *x,
                       int64_t xs, float *s) {
    const int quant = wt == WT_Q8_0 || wt == WT_Q4_0;
    __m512 acc[A5_R][A5_TT];
    for (int r = 0; r < A5_R; r++)
        for (int t = 0; t < A5_TT; t++) acc[r][t] = _mm512_setzero_ps();
    int64_t nu = K / 32;
    for (int64_t u = 0; u < nu; u++) {
        __m512 w0[A5_R], w1[A5_R], d[A5_R];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            prefetch_ahead(w + r * rb + u * UNIT_BYTES(wt, 32), pf);
            a5_unit(wt, w + r * rb, u, &w0[r], &w1[r], &d[r]);
        }
        if (quant && TT == 1) { /* decode: scale the block's dot, not its weights (3 vector ops, not 4) */
            __m512 x0 = _mm512_loadu_ps(x + 32 * u), x1 = _mm512_loadu_ps(x + 32 * u + 16);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                acc[r][0] = _mm512_fmadd_ps(_mm512_fmadd_ps(w1[r], x1, _mm512_mul_ps(w0[r], x0)), d[r], acc[r][0]);
            continue;
        }
        if (quant) {
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                w0[r] = _mm512_mul_ps(w0[r], d[r]);
                w1[r] = _mm512_mul_ps(w1[r], d[r]);
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const float *xp = x + t * xs + 32 * u;
            __m512 x0 = _mm512_loadu_ps(xp), x1 = _mm512_loadu_ps(xp + 16);
            int t1 = TT == 1 ? 1 : t;
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                acc[r][t] = _mm512_fmadd_ps(w0[r], x0, acc[r][t]);
                acc[r][t1] = _mm512_fmadd_ps(w1[r], x1, acc[r][t1]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        if (TT == 1) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][1]);
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            float v = _mm512_reduce_add_ps(acc[r][t]);
            if (K > 32 * nu) v += tail_dot(wt, w + r * rb, 32 * nu, K, x + t * xs);
            s[r * A5_TT + t] = v;
        }
    }
}

#define A5_TILE(R_, TT_) a5_tile(wt, R_, TT_, wr, m->row_bytes, pf, K, xt, xs, s)
A5_INLINE void a5_rows(int wt, const mote_float_mat *m, int64_t n0, int64_t n1, const float *x, int64_t xs, int64_t K,
                       int64_t T, int64_t TC) {
    ROWS_LOOP(A5_R, A5_TT, A5_TILE)
}

#define X86_ROWS(P, PFN, NAME, WT)                                                                             \
    PFN void P##_rows_##NAME(const mote_float_mat *m, int64_t n0, int64_t n1, const float *x, int64_t xs,     \
                             int64_t K, int64_t T, int64_t TC) {                                              \
        P##_rows(WT, m, n0, n1, x, xs, K, T, TC);                                                             \
    }
X86_ROWS(a2, A2_FN, f32, WT_F32)
X86_ROWS(a2, A2_FN, f16, WT_F16)
X86_ROWS(a2, A2_FN, bf16, WT_BF16)
X86_ROWS(a2, A2_FN, q8_0, WT_Q8_0)
X86_ROWS(a2, A2_FN, q4_0, WT_Q4_0)
X86_ROWS(a5, A5_FN, f32, WT_F32)
X86_ROWS(a5, A5_FN, f16, WT_F16)
X86_ROWS(a5, A5_FN, bf16, WT_BF16)
X86_ROWS(a5, A5_FN, q8_0, WT_Q8_0)
X86_ROWS(a5, A5_FN, q4_0, WT_Q4_0)
#endif /* __x86_64__ */

/* ---------------------------------------------------------------- aarch64: NEON (fp16 conversion is baseline) */
#if defined(__aarch64__)
#define NE_R 2
#define NE_TT 4

ALWAYS_INLINE float32x4_t ne_f16x4(const uint8_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p))); }

ALWAYS_INLINE float ne_d(const uint8_t *p) {
    __fp16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

/* 8 int8 -> two float32x4 scaled by d */
ALWAYS_INLINE void ne_s8x8(int8x8_t q, float d, float32x4_t *v) {
    int16x8_t h = vmovl_s8(q);
    v[0] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), d);
    v[1] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(h))), d);
}

/* NEON unit: 32 weights, elements 32u .. 32u+31, as eight 4-float vectors */
ALWAYS_INLINE void ne_unit(int wt, const uint8_t *row, int64_t u, float32x4_t *v) {
    switch (wt) {
    case WT_F32: {
        const float *p = (const float *)(const void *)(row + 128 * u);
        for (int i = 0; i < 8; i++) v[i] = vreinterpretq_f32_u8(vld1q_u8((const uint8_t *)(p + 4 * i)));
        break;
    }
    case WT_F16: {
        const uint8_t *p = row + 64 * u;
        for (int i = 0; i < 8; i++) v[i] = ne_f16x4(p + 8 * i);
        break;
    }
    case WT_BF16: {
        const uint8_t *p = row + 64 * u;
        for (int i = 0; i < 4; i++) {
            uint16x8_t h = vreinterpretq_u16_u8(vld1q_u8(p + 16 * i));
            v[2 * i] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
            v[2 * i + 1] = vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16));
        }
        break;
    }
    case WT_Q8_0: {
        const uint8_t *blk = row + 34 * u;
        float d = ne_d(blk);
        for (int i = 0; i < 4; i++) ne_s8x8(vreinterpret_s8_u8(vld1_u8(blk + 2 + 8 * i)), d, v + 2 * i);
        break;
    }
    default: { /* WT_Q4_0 */
        const uint8_t *blk = row + 18 * u;
        float d = ne_d(blk);
        uint8x16_t q = vld1q_u8(blk + 2);
        int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), vdupq_n_s8(8));
        int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
        ne_s8x8(vget_low_s8(lo), d, v);
        ne_s8x8(vget_high_s8(lo), d, v + 2);
        ne_s8x8(vget_low_s8(hi), d, v + 4);
        ne_s8x8(vget_high_s8(hi), d, v + 6);
        break;
    }
    }
}

ALWAYS_INLINE void ne_tile(int wt, int R, int TT, const uint8_t *w, int64_t rb, int64_t pf, int64_t K, const float *x,
                           int64_t xs, float *s) {
    float32x4_t acc[NE_R][NE_TT];
    for (int r = 0; r < NE_R; r++)
        for (int t = 0; t < NE_TT; t++) acc[r][t] = vdupq_n_f32(0.0f);
    int64_t nu = K / 32;
    for (int64_t u = 0; u < nu; u++) {
        float32x4_t wv[NE_R][8];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            prefetch_ahead(w + r * rb + u * UNIT_BYTES(wt, 32), pf);
            ne_unit(wt, w + r * rb, u, wv[r]);
        }
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const float *xp = x + t * xs + 32 * u;
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) {
                float32x4_t xv = vld1q_f32(xp + 4 * i);
                int ti = TT == 1 ? (i & 3) : t; /* decode: four FMA chains per row in the spare accumulators */
#pragma GCC unroll 2
                for (int r = 0; r < R; r++) acc[r][ti] = vfmaq_f32(acc[r][ti], wv[r][i], xv);
            }
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; r++) {
        if (TT == 1) acc[r][0] = vaddq_f32(vaddq_f32(acc[r][0], acc[r][1]), vaddq_f32(acc[r][2], acc[r][3]));
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            float v = vaddvq_f32(acc[r][t]);
            if (K > 32 * nu) v += tail_dot(wt, w + r * rb, 32 * nu, K, x + t * xs);
            s[r * NE_TT + t] = v;
        }
    }
}

#define NE_TILE(R_, TT_) ne_tile(wt, R_, TT_, wr, m->row_bytes, pf, K, xt, xs, s)
ALWAYS_INLINE void ne_rows(int wt, const mote_float_mat *m, int64_t n0, int64_t n1, const float *x, int64_t xs,
                           int64_t K, int64_t T, int64_t TC) {
    ROWS_LOOP(NE_R, NE_TT, NE_TILE)
}

#define NE_ROWS(NAME, WT)                                                                                     \
    static void ne_rows_##NAME(const mote_float_mat *m, int64_t n0, int64_t n1, const float *x, int64_t xs,   \
                               int64_t K, int64_t T, int64_t TC) {                                            \
        ne_rows(WT, m, n0, n1, x, xs, K, T, TC);                                                              \
    }
NE_ROWS(f32, WT_F32)
NE_ROWS(f16, WT_F16)
NE_ROWS(bf16, WT_BF16)
NE_ROWS(q8_0, WT_Q8_0)
NE_ROWS(q4_0, WT_Q4_0)
#endif /* __aarch64__ */

/* ---------------------------------------------------------------- dispatch */

static rows_fn pick_rows(int isa, int wt) {
    switch (isa) {
#if defined(__x86_64__)
#define PICK(P)                               \
    switch (wt) {                             \
    case WT_F32: return P##_rows_f32;         \
    case WT_F16: return P##_rows_f16;         \
    case WT_BF16: return P##_rows_bf16;       \
    case WT_Q8_0: return P##_rows_q8_0;       \
    default: return P##_rows_q4_0;            \
    }
    case MOTE_AVX2: PICK(a2)
    case MOTE_AVX512: PICK(a5)
#undef PICK
#endif
#if defined(__aarch64__)
    case MOTE_NEON:
        switch (wt) {
        case WT_F32: return ne_rows_f32;
        case WT_F16: return ne_rows_f16;
        case WT_BF16: return ne_rows_bf16;
        case WT_Q8_0: return ne_rows_q8_0;
        default: return ne_rows_q4_0;
        }
#endif
    default: return sc_rows;
    }
}

typedef struct {
    const mote_float_mat *mats;
    int n;
    int64_t start[MOTE_FLOAT_MAX_MATS + 1]; /* first global row of each matrix */
    rows_fn fn[MOTE_FLOAT_MAX_MATS];
    const float *x;
    int64_t xs, K, T, TC;
} float_job;

static void job_range(void *ctx, int64_t b, int64_t e) {
    const float_job *j = ctx;
    for (int i = 0; i < j->n; i++) {
        int64_t lo = b > j->start[i] ? b : j->start[i], hi = e < j->start[i + 1] ? e : j->start[i + 1];
        if (lo < hi) j->fn[i](&j->mats[i], lo - j->start[i], hi - j->start[i], j->x, j->xs, j->K, j->T, j->TC);
    }
}

int mote_float_gemm_multi(int n_mats, const mote_float_mat *mats, int64_t K, const float *x, int64_t x_stride,
                          int64_t T, int isa) {
    int path = mote_isa_pick(isa);
    if (path < 0) return -1;
    if (n_mats < 1 || n_mats > MOTE_FLOAT_MAX_MATS || !mats || K < 1 || T < 0 || x_stride < K || (T > 0 && !x))
        return -2;
    float_job j = {.mats = mats, .n = n_mats, .x = x, .xs = x_stride, .K = K, .T = T};
    for (int i = 0; i < n_mats; i++) {
        const mote_float_mat *m = &mats[i];
        int64_t need = type_row_bytes(m->wtype, K);
        if (need == -1) return -3;
        if (need < 0 || m->N < 0 || m->row_bytes < need || m->y_stride < m->N) return -2;
        if (m->N > 0 && T > 0 && (!m->w || !m->y)) return -2;
        j.start[i + 1] = j.start[i] + m->N;
        j.fn[i] = pick_rows(path, m->wtype);
    }
    int64_t rows = j.start[n_mats];
    if (rows == 0 || T == 0) return 0;
    /* tokens per chunk: the chunk's x rows (<= 256 KiB) stay in L2 while every row tile of a range reads them */
    j.TC = X_CHUNK_BYTES / (4 * K) / 8 * 8;
    if (j.TC < 8) j.TC = 8;
    /* ~4 chunks per thread (the pool hands them out dynamically), 16-row multiples */
    int64_t threads = mote_threads(), grain = (rows + 4 * threads - 1) / (4 * threads);
    grain = (grain + 15) / 16 * 16;
    mote_parallel_for(job_range, &j, rows, grain);
    return 0;
}

int mote_float_gemm(int wtype, const void *w, int64_t row_bytes, int64_t N, int64_t K, const float *x,
                    int64_t x_stride, int64_t T, const float *bias, float *y, int64_t y_stride, int isa) {
    mote_float_mat m = {.wtype = wtype, .w = w, .row_bytes = row_bytes, .N = N, .bias = bias, .y = y,
                        .y_stride = y_stride};
    return mote_float_gemm_multi(1, &m, K, x, x_stride, T, isa);
}
