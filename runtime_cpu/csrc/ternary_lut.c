/* Lookup-table ternary kernels (TL / T-MAC style): tables of activation partial sums, indexed by packed
 * groups of weights, replace the multiplies. Output semantics as the multiply-add family (mote_kernels.h):
 *   y[t][n] = (float)((double)acc * ((double)step[t] * (double)scale[n])),  acc = sum_k q[t][k] * w[n][k]
 * with acc exact (every path equals an int64 reference bit for bit). sumq is not needed: the tables hold
 * products with w = code - 1 directly.
 *
 * Groups and tables ("sign-magnitude base 3", as bitnet's TL2 but with whole int16 entries):
 *   three consecutive weights (w0, w1, w2) in {-1, 0, 1} form a group; v = (w0+1) + 3 (w1+1) + 9 (w2+1) in
 *   [0, 26], v = 13 is the zero group, and v and 26 - v are negations of each other. A group is stored as
 *   a 5-bit field f = s << 4 | m:  v > 13 -> s = 0, m = v - 13;  v < 13 -> s = 1, m = 13 - v;  v = 13 -> 0.
 *   The table of a group, per token, is 32 int16 entries: tab[m] = T(m) = sum_i q_i * w_i(v = 13 + m) for
 *   m = 1..13, tab[16 + m] = -T(m), tab[0] = tab[16] = tab[14, 15, 30, 31] = 0. So one lookup tab[f] is the
 *   exact partial sum of three products (|tab| <= 384: the tables are exact int16, not int8).
 * Exactness of accumulation: lookups are summed in int16 lanes for at most FLUSH_COLS columns (3 lookups
 *   each: 84 * 384 = 32256 < 2^15), then widened into int32 (|acc| <= 128 K < 2^31).
 *
 * Packed weight layout (version 1), made by mote_lut_pack from the TQ2_0 code layout:
 *   64-byte header: "MOTELUT1", u32 version = 1, u32 row tile = 32, u32 weights per column = 9, u32 0,
 *     i64 N, i64 Kp, i64 ncols, zeros. ncols = ceil((k_last + 1) / 9) <= ceil(Kp / 9), k_last = the last k
 *     holding a non-zero weight in any row, so K's zero padding to Kp (896 -> 1024) is neither stored nor read.
 *   Then ceil(N / 32) row tiles, each ncols columns of 64 bytes = 32 little-endian uint16 words, one per row:
 *     word 2 r = row r, word 2 r + 1 = row 16 + r (r < 16), so the even / odd halves of the 32-bit lanes
 *     widen straight to rows 0..15 and 16..31. Bits 5 j .. 5 j + 4 (j = 0, 1, 2) of a word hold the field of
 *     the weights 9 c + 3 j + {0, 1, 2} of the column c; bit 15 is 0; rows past N are zero (field 0).
 *   1.78 bits per weight (16 per 9) against TQ2_0's 2 (+ its fp16 d). mote_lut_packed_bytes (the allocation)
 *   counts ceil(Kp / 9) columns; the tail past the stored tiles is never written or read.
 *
 * Paths:
 *   AVX512 (BW/VBMI machines): vpermw with the 32-entry int16 table: the column's word vector is its own
 *     index vector (vpermw reads the low 5 bits of each word), the next two fields are a shift away; one
 *     vpermw + one vpaddw per field, i.e. per 32 rows x 3 weights. Tables are loaded once per two tiles.
 *     Measured here (Xeon, Sapphire-Rapids class): vpermw zmm is 2 uops (p0 + p5, vpermb / vpshufb are 1),
 *     so a column of a tile (288 weights) costs 11 uops, ~7-8 cycles in the loop: the floor of this layout.
 *   AVX2: vpshufb on 16-entry byte tables of T(m): lo and hi bytes looked up separately with the index in
 *     the low resp. high byte of each word (the other byte indexes entry 0, which is 0), or-ed into the exact
 *     int16 entry, the sign applied with vpsignw from the field's s bit.
 *   NEON: tbl (vqtbl4q) with the 64-byte int16 table, byte indices 2 f and 2 f + 1 per word.
 *   scalar: the same int16 tables, one lookup per field, int32 sums.
 * Work split: the tables of a block of tokens are built first (by the caller for decode-sized sets, else in
 * parallel over columns), then threads take ranges of row tiles; inside a range the columns go in chunks whose
 * tables (for up to TOK_BLOCK tokens) stay in L1 while the chunk sweeps the range's tiles (their weights stay
 * in L2), so prefill shares each weight load and index shift across the tokens of a block.
 */
#include <stdlib.h>
#include <string.h>

#include "mote_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#define LUT_MAGIC "MOTELUT1"
#define LUT_VERSION 1
#define ROW_TILE 32
#define COL_W 9          /* weights per column (3 groups of 3) */
#define COL_BYTES 64     /* one column of a tile: 32 words */
#define HDR_BYTES 64
#define FLUSH_COLS 28    /* int16 lanes take 28 columns x 3 lookups x 384 = 32256 before widening */
#define TOK_BLOCK 8      /* tokens sharing one pass over a tile's weights */
#define L1_TABLE_BYTES (24 * 1024)        /* tables of one column chunk for one token block */
#define SUPER_TABLE_BYTES (4 * 1024 * 1024)  /* tables built at once (tokens x all columns) */
#define TILE_GRAIN_MAX 8

#if defined(__x86_64__)
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#define T2 __attribute__((target("avx2,fma,f16c")))
#endif

/* ---- groups, fields, tables ---------------------------------------------------------------------------- */

static int64_t ncols_of(int64_t Kp) { return (Kp + COL_W - 1) / COL_W; }
static int64_t ntiles_of(int64_t N) { return (N + ROW_TILE - 1) / ROW_TILE; }

/* field of the group with base-3 value v = c0 + 3 c1 + 9 c2 (codes c = w + 1) */
static uint16_t field_of(int v) { return v == 13 ? 0 : (v > 13 ? (uint16_t)(v - 13) : (uint16_t)(16 | (13 - v))); }

/* w_i of the table slot m (v = 13 + m for m = 1..13; slots 0, 14, 15 are empty) */
static const int8_t SLOT_W[16][3] = {{0, 0, 0},  {1, 0, 0},  {-1, 1, 0}, {0, 1, 0},  {1, 1, 0},  {-1, -1, 1},
                                     {0, -1, 1}, {1, -1, 1}, {-1, 0, 1}, {0, 0, 1},  {1, 0, 1},  {-1, 1, 1},
                                     {0, 1, 1},  {1, 1, 1},  {0, 0, 0},  {0, 0, 0}};

/* The token's q at k, zero past Kp. */
static inline int qat(const int8_t *q, int64_t Kp, int64_t k) { return k < Kp ? q[k] : 0; }

/* int16 tables (32 entries, 64 bytes) of groups [g0, g1) of one token: scalar, AVX512 and NEON paths. */
static void build_w16_scalar(const int8_t *q, int64_t Kp, int64_t g0, int64_t g1, int16_t *tab) {
    for (int64_t g = g0; g < g1; g++) {
        const int a = qat(q, Kp, 3 * g), b = qat(q, Kp, 3 * g + 1), c = qat(q, Kp, 3 * g + 2);
        int16_t *t = tab + (g - g0) * 32;
        for (int m = 0; m < 16; m++) {
            const int e = SLOT_W[m][0] * a + SLOT_W[m][1] * b + SLOT_W[m][2] * c;
            t[m] = (int16_t)e;
            t[16 + m] = (int16_t)-e;
        }
    }
}

/* ---- packing ------------------------------------------------------------------------------------------- */

int64_t mote_lut_packed_bytes(int64_t N, int64_t Kp) {
    if (N < 0 || Kp <= 0 || Kp % 256) return -1;
    return HDR_BYTES + ntiles_of(N) * ncols_of(Kp) * COL_BYTES;
}

typedef struct {
    const uint8_t *w;
    int64_t block_bytes, row_bytes, N, Kp, ncols;
    uint8_t *dst;
    int bad;  /* a code 3 was seen */
} pack_job;

static void pack_tiles(void *ctx, int64_t t0, int64_t t1) {
    pack_job *P = ctx;
    const int64_t nk = P->ncols * COL_W < P->Kp ? P->ncols * COL_W : P->Kp;  /* codes past nk are all 1 */
    uint8_t *codes = malloc((size_t)(ncols_of(P->Kp) * COL_W));
    if (!codes) {
        P->bad = 2;
        return;
    }
    for (int64_t t = t0; t < t1; t++) {
        uint8_t *tile = P->dst + HDR_BYTES + t * P->ncols * COL_BYTES;
        for (int r = 0; r < ROW_TILE; r++) {
            const int64_t n = t * ROW_TILE + r;
            const int wi = r < 16 ? 2 * r : 2 * (r - 16) + 1;
            memset(codes, 1, (size_t)(P->ncols * COL_W));
            if (n < P->N) {
                const uint8_t *row = P->w + n * P->row_bytes;
                for (int64_t b = 0; b < P->Kp / 256; b++)
                    for (int h = 0; h < 2; h++)
                        for (int j = 0; j < 32; j++) {
                            const unsigned v = row[b * P->block_bytes + 32 * h + j];
                            for (int s = 0; s < 4; s++) {
                                const unsigned c = (v >> (2 * s)) & 3u;
                                const int64_t k = b * 256 + h * 128 + 32 * s + j;
                                if (c == 3) P->bad = 1;
                                if (k < nk) codes[k] = (uint8_t)c;
                            }
                        }
            }
            for (int64_t c = 0; c < P->ncols; c++) {
                const uint8_t *g = codes + c * COL_W;
                unsigned word = 0;
                for (int j = 0; j < 3; j++) word |= (unsigned)field_of(g[3 * j] + 3 * g[3 * j + 1] + 9 * g[3 * j + 2]) << (5 * j);
                tile[c * COL_BYTES + 2 * wi] = (uint8_t)(word & 0xff);
                tile[c * COL_BYTES + 2 * wi + 1] = (uint8_t)(word >> 8);
            }
        }
    }
    free(codes);
}

/* The last weight (k) of any row that is not zero, -1 when all are: the columns past it are not stored. */
static int64_t last_nonzero_k(const uint8_t *w, int64_t block_bytes, int64_t row_bytes, int64_t N, int64_t Kp) {
    int64_t kmax = -1;
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        for (int64_t b = Kp / 256 - 1; b >= 0 && b * 256 + 255 > kmax; b--) {
            int64_t found = -1;
            for (int h = 1; h >= 0 && found < 0; h--)
                for (int j = 0; j < 32; j++) {
                    const unsigned v = row[b * block_bytes + 32 * h + j];
                    for (int sh = 0; sh < 4; sh++) {
                        const int64_t k = b * 256 + h * 128 + 32 * sh + j;
                        if (((v >> (2 * sh)) & 3u) != 1 && k > found) found = k;
                    }
                }
            if (found >= 0) {
                kmax = found > kmax ? found : kmax;
                break;
            }
        }
    }
    return kmax;
}

int mote_lut_pack(const uint8_t *w, int64_t block_bytes, int64_t row_bytes, int64_t N, int64_t Kp, uint8_t *dst) {
    if (N < 0 || Kp <= 0 || Kp % 256 || block_bytes < 64 || row_bytes < Kp / 256 * block_bytes) return -2;
    /* trailing all-zero columns (K padded to Kp, e.g. 896 -> 1024) are neither stored nor read */
    int64_t ncols = (last_nonzero_k(w, block_bytes, row_bytes, N, Kp) + COL_W) / COL_W;
    ncols = ncols < 1 ? 1 : ncols;
    uint8_t hdr[HDR_BYTES] = {0};
    const uint32_t u[4] = {LUT_VERSION, ROW_TILE, COL_W, 0};
    const int64_t sz[3] = {N, Kp, ncols};
    memcpy(hdr, LUT_MAGIC, 8);
    memcpy(hdr + 8, u, sizeof u);
    memcpy(hdr + 24, sz, sizeof sz);
    pack_job P = {w, block_bytes, row_bytes, N, Kp, ncols, dst, 0};
    mote_parallel_for(pack_tiles, &P, ntiles_of(N), 4);
    if (P.bad == 2) return -4;
    if (P.bad) return -3;
    memcpy(dst, hdr, HDR_BYTES);  /* last: a failed pack leaves no valid header */
    return 0;
}

/* The stored column count of a packed matrix of N x Kp, 0 when the header does not describe one. */
static int64_t header_cols(const uint8_t *p, int64_t N, int64_t Kp) {
    uint32_t u[4];
    int64_t s[3];
    memcpy(u, p + 8, sizeof u);
    memcpy(s, p + 24, sizeof s);
    const int ok = !memcmp(p, LUT_MAGIC, 8) && u[0] == LUT_VERSION && u[1] == ROW_TILE && u[2] == COL_W && s[0] == N &&
                   s[1] == Kp && s[2] >= 1 && s[2] <= ncols_of(Kp);
    return ok ? s[2] : 0;
}

/* ---- the product: job, epilogue ------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *tiles;  /* first tile (after the header) */
    int64_t N, Kp, ncols;
    const int8_t *q;
    int64_t q_stride;
    const float *step, *scale;
    float *y;
    int64_t y_stride;
    int isa;
    /* the current token super-block: tokens [t0, t0 + ts), tables tab + (t - t0) * tok_stride */
    int64_t t0, ts;
    uint8_t *tab;
    int64_t tab_bytes, tok_stride; /* bytes per group table; per token */
    int64_t chunk_cols;            /* columns per L1 chunk (per token block) */
    int64_t build_cols;            /* columns per table-build item */
} lut_job;

/* step, scale and y may sit at any byte address (numpy views): scalar accesses go through memcpy (a plain
 * load / store once compiled) so a misaligned float is not undefined behaviour; vector paths use loadu. */
static inline float ld_f32(const float *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}

static void epilogue_scalar(const lut_job *J, int64_t tile, int64_t t, const int32_t *acc) {
    const double st = (double)ld_f32(J->step + t);
    float *yt = J->y + t * J->y_stride;
    for (int r = 0; r < ROW_TILE; r++) {
        const int64_t n = tile * ROW_TILE + r;
        if (n >= J->N) break;
        const float v = (float)((double)acc[r] * (st * (double)ld_f32(J->scale + n)));
        memcpy(yt + n, &v, sizeof v);
    }
}

/* ---- scalar path --------------------------------------------------------------------------------------- */

static void tile_scalar1(const lut_job *J, int64_t tile, int64_t c0, int64_t c1, int64_t tb, int nt, int32_t *acc) {
    static const int row_of_word[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const uint8_t *base = J->tiles + tile * J->ncols * COL_BYTES;
    for (int64_t c = c0; c < c1; c++) {
        const uint8_t *col = base + c * COL_BYTES;
        for (int i = 0; i < 32; i++) {
            const unsigned w = (unsigned)col[2 * i] | (unsigned)col[2 * i + 1] << 8;
            const int r = row_of_word[i];
            for (int t = 0; t < nt; t++) {
                const int16_t *tab = (const int16_t *)(J->tab + (tb + t) * J->tok_stride + c * 3 * J->tab_bytes);
                acc[t * ROW_TILE + r] += tab[w & 31] + tab[32 + ((w >> 5) & 31)] + tab[64 + ((w >> 10) & 31)];
            }
        }
    }
}

static void tile_scalar(const lut_job *J, int64_t tile, int ntl, int64_t c0, int64_t c1, int64_t tb, int nt,
                        int32_t *acc) {
    for (int i = 0; i < ntl; i++) tile_scalar1(J, tile + i, c0, c1, tb, nt, acc + i * nt * ROW_TILE);
}

/* ---- AVX512 path --------------------------------------------------------------------------------------- */
#if defined(__x86_64__)

/* Tables of groups [g0, g1) for one token, two groups per register (16 slots each), then [T, -T] per group. */
T512 static void build_w16_avx512(const int8_t *q, int64_t Kp, int64_t g0, int64_t g1, int16_t *tab) {
    /* bit s of P[i] / N[i]: SLOT_W[s & 15][i] is +1 / -1 (words 0..15: group g, 16..31: group g + 1);
     * w2 is never -1 in the s = 0 half */
    const __mmask32 P0 = 0x24922492u, N0 = 0x09240924u, P1 = 0x381c381cu, N1 = 0x00e000e0u, P2 = 0x3fe03fe0u;
    __m512i IDX[3];
    for (int i = 0; i < 3; i++)
        IDX[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)i)), _mm256_set1_epi16((short)(3 + i)), 1);
    const __m512i zero = _mm512_setzero_si512();
    int64_t g = g0;
    for (; g + 2 <= g1; g += 2) {
        const int64_t k = 3 * g, left = Kp - k;
        const __mmask16 lm = left >= 16 ? (__mmask16)0xffff : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1));
        const __m512i q16 = _mm512_zextsi256_si512(_mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(lm, q + k)));
        const __m512i b0 = _mm512_permutexvar_epi16(IDX[0], q16), b1 = _mm512_permutexvar_epi16(IDX[1], q16);
        const __m512i b2 = _mm512_permutexvar_epi16(IDX[2], q16);
        __m512i t = _mm512_maskz_mov_epi16(P0, b0);
        t = _mm512_mask_sub_epi16(t, N0, t, b0);
        t = _mm512_mask_add_epi16(t, P1, t, b1);
        t = _mm512_mask_sub_epi16(t, N1, t, b1);
        t = _mm512_mask_add_epi16(t, P2, t, b2);
        const __m512i n = _mm512_sub_epi16(zero, t);
        _mm512_storeu_si512(tab + (g - g0) * 32, _mm512_shuffle_i64x2(t, n, 0x44));
        _mm512_storeu_si512(tab + (g - g0) * 32 + 32, _mm512_shuffle_i64x2(t, n, 0xee));
    }
    if (g < g1) build_w16_scalar(q, Kp, g, g1, tab + (g - g0) * 32);
}

/* The int16 lanes of acc16 (word 2 r = row r, 2 r + 1 = row 16 + r) added into acc[0..31] (natural rows). */
T512 static inline void flush512(__m512i a16, int32_t *acc) {
    const __m512i ev = _mm512_srai_epi32(_mm512_slli_epi32(a16, 16), 16), od = _mm512_srai_epi32(a16, 16);
    _mm512_storeu_si512(acc, _mm512_add_epi32(_mm512_loadu_si512(acc), ev));
    _mm512_storeu_si512(acc + 16, _mm512_add_epi32(_mm512_loadu_si512(acc + 16), od));
}

/* NTL (1, 2 or 4) tiles from `tile`, columns [c0, c1), NT tokens (compile-time constants at each call, so the
 * accumulators stay in registers); a table is loaded once for both tiles. acc: [tile][token][32]. */
T512 __attribute__((always_inline)) static inline void tile512(const lut_job *J, int64_t tile, const int NTL, int64_t c0,
                                                                int64_t c1, int64_t tb, const int NT, int32_t *acc) {
    const uint8_t *col = J->tiles + (tile * J->ncols + c0) * COL_BYTES;
    const int64_t tstride = J->ncols * COL_BYTES;
    const uint8_t *tab[TOK_BLOCK];
    for (int t = 0; t < NT; t++) tab[t] = J->tab + (tb + t) * J->tok_stride + c0 * 3 * 64;
    __m512i a[4][TOK_BLOCK];
    int64_t c = c0;
    while (c < c1) {
        const int64_t ce = c + FLUSH_COLS < c1 ? c + FLUSH_COLS : c1;
        for (int i = 0; i < NTL; i++)
            for (int t = 0; t < NT; t++) a[i][t] = _mm512_setzero_si512();
        for (; c < ce; c++, col += COL_BYTES) {
            __m512i f0[4], f1[4], f2[4];
            for (int i = 0; i < NTL; i++) {
                f0[i] = _mm512_loadu_si512((const void *)(col + i * tstride));
                f1[i] = _mm512_srli_epi16(f0[i], 5);
                f2[i] = _mm512_srli_epi16(f0[i], 10);
            }
            for (int t = 0; t < NT; t++) {
                const __m512i t0 = _mm512_loadu_si512((const void *)tab[t]);
                const __m512i t1 = _mm512_loadu_si512((const void *)(tab[t] + 64));
                const __m512i t2 = _mm512_loadu_si512((const void *)(tab[t] + 128));
                for (int i = 0; i < NTL; i++) {
                    const __m512i p = _mm512_add_epi16(_mm512_permutexvar_epi16(f0[i], t0), _mm512_permutexvar_epi16(f1[i], t1));
                    a[i][t] = _mm512_add_epi16(a[i][t], _mm512_add_epi16(p, _mm512_permutexvar_epi16(f2[i], t2)));
                }
                tab[t] += 192;
            }
        }
        for (int i = 0; i < NTL; i++)
            for (int t = 0; t < NT; t++) flush512(a[i][t], acc + (i * NT + t) * ROW_TILE);
    }
}

T512 static void tile_avx512(const lut_job *J, int64_t tile, int ntl, int64_t c0, int64_t c1, int64_t tb, int nt,
                             int32_t *acc) {
    /* decode and 2-token blocks take 4 tiles at a time (a table load serves 4 lookups), longer blocks 2 */
    if (ntl >= 4 && nt <= 2) {
        if (nt == 1)
            tile512(J, tile, 4, c0, c1, tb, 1, acc);
        else
            tile512(J, tile, 4, c0, c1, tb, 2, acc);
        ntl -= 4;
        tile += 4;
        acc += 4 * nt * ROW_TILE;
    }
    for (; ntl > 0; ntl -= 2, tile += 2, acc += 2 * nt * ROW_TILE) {
#define TILE512_CASE(n)                                          \
    case n:                                                      \
        if (ntl >= 2)                                            \
            tile512(J, tile, 2, c0, c1, tb, n, acc);             \
        else                                                     \
            tile512(J, tile, 1, c0, c1, tb, n, acc);             \
        break;
        switch (nt) {
            TILE512_CASE(1)
            TILE512_CASE(2)
            TILE512_CASE(3)
            TILE512_CASE(4)
            TILE512_CASE(5)
            TILE512_CASE(6)
            TILE512_CASE(7)
            TILE512_CASE(8)
        default: break;
        }
#undef TILE512_CASE
    }
}

T512 static void epilogue_avx512(const lut_job *J, int64_t tile, int64_t t, const int32_t *acc) {
    if ((tile + 1) * ROW_TILE > J->N) {
        epilogue_scalar(J, tile, t, acc);
        return;
    }
    const __m512d st = _mm512_set1_pd((double)ld_f32(J->step + t));
    float *yt = J->y + t * J->y_stride + tile * ROW_TILE;
    const float *sc = J->scale + tile * ROW_TILE;
    for (int r = 0; r < ROW_TILE; r += 8) {
        const __m512d a = _mm512_cvtepi32_pd(_mm256_loadu_si256((const __m256i *)(acc + r)));
        const __m512d f = _mm512_mul_pd(st, _mm512_cvtps_pd(_mm256_loadu_ps(sc + r)));
        _mm256_storeu_ps(yt + r, _mm512_cvtpd_ps(_mm512_mul_pd(a, f)));
    }
}

/* ---- AVX2 path ----------------------------------------------------------------------------------------- */

/* AVX2 tables: per group 32 bytes, lo bytes of T(0..15) then hi bytes (T(0) = 0, so both bytes of entry 0 are 0). */
T2 static void build_b8_avx2(const int8_t *q, int64_t Kp, int64_t g0, int64_t g1, uint8_t *tab) {
    int16_t W[3][16];
    for (int i = 0; i < 3; i++)
        for (int m = 0; m < 16; m++) W[i][m] = SLOT_W[m][i];
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)W[0]), w1 = _mm256_loadu_si256((const __m256i *)W[1]);
    const __m256i w2 = _mm256_loadu_si256((const __m256i *)W[2]);
    /* per 128-bit lane: lo bytes of the lane's 8 words, then their hi bytes */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t g = g0; g < g1; g++) {
        const __m256i a = _mm256_set1_epi16((short)qat(q, Kp, 3 * g)), b = _mm256_set1_epi16((short)qat(q, Kp, 3 * g + 1));
        const __m256i c = _mm256_set1_epi16((short)qat(q, Kp, 3 * g + 2));
        const __m256i t = _mm256_add_epi16(_mm256_add_epi16(_mm256_sign_epi16(a, w0), _mm256_sign_epi16(b, w1)),
                                           _mm256_sign_epi16(c, w2));
        /* [lo 0-7, hi 0-7 | lo 8-15, hi 8-15] -> qwords 0, 2, 1, 3 -> [lo 0-15, hi 0-15] */
        const __m256i s = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(t, split), 0xd8);
        _mm256_storeu_si256((__m256i *)(tab + (g - g0) * 32), s);
    }
}

/* 16 int16 lanes (word 2 r' = row base + r', 2 r' + 1 = row base + 16 + r', r' < 8) into acc. */
T2 static inline void flush256(__m256i a16, int32_t *acc, int base) {
    const __m256i ev = _mm256_srai_epi32(_mm256_slli_epi32(a16, 16), 16), od = _mm256_srai_epi32(a16, 16);
    int32_t *e = acc + base, *o = acc + base + 16;
    _mm256_storeu_si256((__m256i *)e, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)e), ev));
    _mm256_storeu_si256((__m256i *)o, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)o), od));
}

T2 __attribute__((always_inline)) static inline __m256i look2(__m256i lo_idx, __m256i hi_idx, __m256i sg,
                                                               const uint8_t *tab) {
    const __m256i lo = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tab)), lo_idx);
    const __m256i hi = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tab + 16))), hi_idx);
    return _mm256_sign_epi16(_mm256_or_si256(lo, hi), sg);
}

/* Half h of a tile (words 16 h .. 16 h + 15: rows 8 h .. 8 h + 7 and 16 + 8 h ..), columns [c0, c1), NT tokens. */
T2 __attribute__((always_inline)) static inline void half256(const lut_job *J, int64_t tile, int h, int64_t c0, int64_t c1,
                                                              int64_t tb, const int NT, int32_t *acc) {
    const uint8_t *col = J->tiles + (tile * J->ncols + c0) * COL_BYTES + 32 * h;
    const uint8_t *tab[4];
    for (int t = 0; t < NT; t++) tab[t] = J->tab + (tb + t) * J->tok_stride + c0 * 3 * 32;
    const __m256i lo4 = _mm256_set1_epi16(0x000f);
    __m256i a[4];
    int64_t c = c0;
    while (c < c1) {
        const int64_t ce = c + FLUSH_COLS < c1 ? c + FLUSH_COLS : c1;
        for (int t = 0; t < NT; t++) a[t] = _mm256_setzero_si256();
        for (; c < ce; c++, col += COL_BYTES) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)col);
            /* m of field j in the low byte (high byte 0), in the high byte (low byte 0), and the word with
             * field j's s bit at bit 15 (non-zero whenever m is) for vpsignw */
            const __m256i l0 = _mm256_and_si256(w, lo4), h0 = _mm256_slli_epi16(l0, 8), s0 = _mm256_slli_epi16(w, 11);
            const __m256i l1 = _mm256_and_si256(_mm256_srli_epi16(w, 5), lo4), h1 = _mm256_slli_epi16(l1, 8);
            const __m256i s1 = _mm256_slli_epi16(w, 6);
            const __m256i l2 = _mm256_and_si256(_mm256_srli_epi16(w, 10), lo4), h2 = _mm256_slli_epi16(l2, 8);
            const __m256i s2 = _mm256_slli_epi16(w, 1);
            for (int t = 0; t < NT; t++) {
                const __m256i e = _mm256_add_epi16(_mm256_add_epi16(look2(l0, h0, s0, tab[t]), look2(l1, h1, s1, tab[t] + 32)),
                                                   look2(l2, h2, s2, tab[t] + 64));
                a[t] = _mm256_add_epi16(a[t], e);
                tab[t] += 96;
            }
        }
        for (int t = 0; t < NT; t++) flush256(a[t], acc + t * ROW_TILE, 8 * h);
    }
}

/* Each tile's halves in turn, tokens in blocks of up to 4 (registers: 16 on AVX2). */
T2 static void tile_avx2(const lut_job *J, int64_t tile0, int ntl, int64_t c0, int64_t c1, int64_t tb, int nt,
                         int32_t *acc0) {
    for (int i = 0; i < ntl; i++) {
        const int64_t tile = tile0 + i;
        int32_t *acc = acc0 + i * nt * ROW_TILE;
        for (int h = 0; h < 2; h++) {
            int t = 0;
            for (; t + 4 <= nt; t += 4) half256(J, tile, h, c0, c1, tb + t, 4, acc + t * ROW_TILE);
            switch (nt - t) {
            case 1: half256(J, tile, h, c0, c1, tb + t, 1, acc + t * ROW_TILE); break;
            case 2: half256(J, tile, h, c0, c1, tb + t, 2, acc + t * ROW_TILE); break;
            case 3: half256(J, tile, h, c0, c1, tb + t, 3, acc + t * ROW_TILE); break;
            default: break;
            }
        }
    }
}

T2 static void epilogue_avx2(const lut_job *J, int64_t tile, int64_t t, const int32_t *acc) {
    if ((tile + 1) * ROW_TILE > J->N) {
        epilogue_scalar(J, tile, t, acc);
        return;
    }
    const __m256d st = _mm256_set1_pd((double)ld_f32(J->step + t));
    float *yt = J->y + t * J->y_stride + tile * ROW_TILE;
    const float *sc = J->scale + tile * ROW_TILE;
    for (int r = 0; r < ROW_TILE; r += 4) {
        const __m256d a = _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(acc + r)));
        const __m256d f = _mm256_mul_pd(st, _mm256_cvtps_pd(_mm_loadu_ps(sc + r)));
        _mm_storeu_ps(yt + r, _mm256_cvtpd_ps(_mm256_mul_pd(a, f)));
    }
}
#endif /* __x86_64__ */

/* ---- NEON path ----------------------------------------------------------------------------------------- */
#if defined(__aarch64__)

/* Quarter k of a tile (words 8 k .. 8 k + 7: rows 4 k .. 4 k + 3 and 16 + 4 k ..), columns [c0, c1), NT tokens. */
__attribute__((always_inline)) static inline void quarter_neon(const lut_job *J, int64_t tile, int k, int64_t c0,
                                                               int64_t c1, int64_t tb, const int NT, int32_t *acc) {
    const uint8_t *col = J->tiles + (tile * J->ncols + c0) * COL_BYTES + 16 * k;
    const uint8_t *tab[4];
    for (int t = 0; t < NT; t++) tab[t] = J->tab + (tb + t) * J->tok_stride + c0 * 3 * 64;
    const uint16x8_t m5 = vdupq_n_u16(31), base = vdupq_n_u16(0x0100);
    int16x8_t a[4];
    int64_t c = c0;
    while (c < c1) {
        const int64_t ce = c + FLUSH_COLS < c1 ? c + FLUSH_COLS : c1;
        for (int t = 0; t < NT; t++) a[t] = vdupq_n_s16(0);
        for (; c < ce; c++, col += COL_BYTES) {
            const uint16x8_t w = vreinterpretq_u16_u8(vld1q_u8(col));
            /* byte indices 2 f, 2 f + 1 of the int16 entry f: 0x0202 f + 0x0100 per word */
            const uint8x16_t i0 = vreinterpretq_u8_u16(vmlaq_n_u16(base, vandq_u16(w, m5), 0x0202));
            const uint8x16_t i1 = vreinterpretq_u8_u16(vmlaq_n_u16(base, vandq_u16(vshrq_n_u16(w, 5), m5), 0x0202));
            const uint8x16_t i2 = vreinterpretq_u8_u16(vmlaq_n_u16(base, vshrq_n_u16(w, 10), 0x0202));
            for (int t = 0; t < NT; t++) {
                const int16x8_t p0 = vreinterpretq_s16_u8(vqtbl4q_u8(vld1q_u8_x4(tab[t]), i0));
                const int16x8_t p1 = vreinterpretq_s16_u8(vqtbl4q_u8(vld1q_u8_x4(tab[t] + 64), i1));
                const int16x8_t p2 = vreinterpretq_s16_u8(vqtbl4q_u8(vld1q_u8_x4(tab[t] + 128), i2));
                a[t] = vaddq_s16(a[t], vaddq_s16(vaddq_s16(p0, p1), p2));
                tab[t] += 192;
            }
        }
        for (int t = 0; t < NT; t++) {
            const int32x4_t x = vreinterpretq_s32_s16(a[t]);
            int32_t *e = acc + t * ROW_TILE + 4 * k, *o = e + 16;
            vst1q_s32(e, vsraq_n_s32(vld1q_s32(e), vshlq_n_s32(x, 16), 16));
            vst1q_s32(o, vsraq_n_s32(vld1q_s32(o), x, 16));
        }
    }
}

/* Each tile's quarters in turn, tokens in blocks of up to 4 (registers: 16 on AVX2). */
static void tile_neon(const lut_job *J, int64_t tile0, int ntl, int64_t c0, int64_t c1, int64_t tb, int nt,
                      int32_t *acc0) {
    for (int i = 0; i < ntl; i++) {
        const int64_t tile = tile0 + i;
        int32_t *acc = acc0 + i * nt * ROW_TILE;
        for (int k = 0; k < 4; k++) {
            int t = 0;
            for (; t + 4 <= nt; t += 4) quarter_neon(J, tile, k, c0, c1, tb + t, 4, acc + t * ROW_TILE);
            switch (nt - t) {
            case 1: quarter_neon(J, tile, k, c0, c1, tb + t, 1, acc + t * ROW_TILE); break;
            case 2: quarter_neon(J, tile, k, c0, c1, tb + t, 2, acc + t * ROW_TILE); break;
            case 3: quarter_neon(J, tile, k, c0, c1, tb + t, 3, acc + t * ROW_TILE); break;
            default: break;
            }
        }
    }
}
#endif /* __aarch64__ */

/* ---- driver -------------------------------------------------------------------------------------------- */

/* (job, first tile, tiles (1..4), columns [c0, c1), first token of the block, tokens, acc [tile][token][32]) */
typedef void (*tile_fn)(const lut_job *, int64_t, int, int64_t, int64_t, int64_t, int, int32_t *);
typedef void (*epi_fn)(const lut_job *, int64_t, int64_t, const int32_t *);

static void build_items(void *ctx, int64_t i0, int64_t i1) {
    const lut_job *J = ctx;
    const int64_t per_tok = (J->ncols + J->build_cols - 1) / J->build_cols;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t t = i / per_tok, cb = (i % per_tok) * J->build_cols;
        const int64_t ce = cb + J->build_cols < J->ncols ? cb + J->build_cols : J->ncols;
        const int8_t *q = J->q + (J->t0 + t) * J->q_stride;
        uint8_t *tab = J->tab + t * J->tok_stride + cb * 3 * J->tab_bytes;
        switch (J->isa) {
#if defined(__x86_64__)
        case MOTE_AVX512: build_w16_avx512(q, J->Kp, 3 * cb, 3 * ce, (int16_t *)tab); break;
        case MOTE_AVX2: build_b8_avx2(q, J->Kp, 3 * cb, 3 * ce, tab); break;
#endif
        default: build_w16_scalar(q, J->Kp, 3 * cb, 3 * ce, (int16_t *)tab); break;
        }
    }
}

static void gemm_tiles(void *ctx, int64_t b, int64_t e) {
    const lut_job *J = ctx;
    tile_fn tf = tile_scalar;
    epi_fn ef = epilogue_scalar;
    switch (J->isa) {
#if defined(__x86_64__)
    case MOTE_AVX512: tf = tile_avx512; ef = epilogue_avx512; break;
    case MOTE_AVX2: tf = tile_avx2; ef = epilogue_avx2; break;
#endif
#if defined(__aarch64__)
    case MOTE_NEON: tf = tile_neon; break;
#endif
    default: break;
    }
    int32_t acc[TILE_GRAIN_MAX * TOK_BLOCK * ROW_TILE];
    for (; b < e; b += TILE_GRAIN_MAX) {  /* one thread gets the whole range when the pool has one */
        const int64_t be = b + TILE_GRAIN_MAX < e ? b + TILE_GRAIN_MAX : e;
        for (int64_t tb = 0; tb < J->ts; tb += TOK_BLOCK) {
            const int nt = (int)(J->ts - tb < TOK_BLOCK ? J->ts - tb : TOK_BLOCK);
            /* the chunk's tables for nt tokens stay in L1 while the chunk sweeps the range's tiles; chunks of
             * equal size (multiples of FLUSH_COLS where they are larger) */
            const int64_t cmax = J->chunk_cols / nt > 4 ? J->chunk_cols / nt : 4;
            const int64_t nch = (J->ncols + cmax - 1) / cmax;
            int64_t cc = (J->ncols + nch - 1) / nch;
            if (cc > FLUSH_COLS && nch > 1) cc = (cc + FLUSH_COLS - 1) / FLUSH_COLS * FLUSH_COLS;
            memset(acc, 0, sizeof(int32_t) * (size_t)((be - b) * nt * ROW_TILE));
            for (int64_t c0 = 0; c0 < J->ncols; c0 += cc) {
                const int64_t c1 = c0 + cc < J->ncols ? c0 + cc : J->ncols;
                for (int64_t tile = b; tile < be; tile += 4)
                    tf(J, tile, (int)(be - tile < 4 ? be - tile : 4), c0, c1, tb, nt, acc + (tile - b) * nt * ROW_TILE);
            }
            for (int64_t tile = b; tile < be; tile++)
                for (int t = 0; t < nt; t++) ef(J, tile, J->t0 + tb + t, acc + ((tile - b) * nt + t) * ROW_TILE);
        }
    }
}

/* Tables of one super-block, kept per calling thread between calls (decode calls this hundreds of times a
 * token; a fresh multi-megabyte allocation per call would page-fault every time). */
static _Thread_local uint8_t *tls_tab;
static _Thread_local size_t tls_cap;

static uint8_t *table_buffer(size_t bytes) {
    if (bytes > tls_cap) {
        free(tls_tab);
        tls_tab = aligned_alloc(64, (bytes + 63) / 64 * 64);
        tls_cap = tls_tab ? bytes : 0;
    }
    return tls_tab;
}

/* A product's job from its arguments (tables not yet placed); 0, or -2 when they do not describe one. */
static int setup_job(lut_job *J, const mote_tern_call *c, int isa) {
    if (c->N < 0 || c->T < 0 || c->Kp <= 0 || c->Kp % 256 || c->q_stride < c->Kp || c->y_stride < c->N) return -2;
    const int64_t ncols = header_cols(c->w, c->N, c->Kp);
    if (!ncols) return -2;
    memset(J, 0, sizeof *J);
    J->tiles = c->w + HDR_BYTES;
    J->N = c->N;
    J->Kp = c->Kp;
    J->ncols = ncols;
    J->q = c->q;
    J->q_stride = c->q_stride;
    J->step = c->step;
    J->scale = c->scale;
    J->y = c->y;
    J->y_stride = c->y_stride;
    J->isa = isa;
    J->tab_bytes = isa == MOTE_AVX2 ? 32 : 64;
    J->tok_stride = J->ncols * 3 * J->tab_bytes;
    J->chunk_cols = L1_TABLE_BYTES / (3 * J->tab_bytes);
    J->build_cols = 64;
    int64_t ts = SUPER_TABLE_BYTES / J->tok_stride;  /* tokens whose tables are built at once */
    J->ts = ts < TOK_BLOCK ? TOK_BLOCK : ts / TOK_BLOCK * TOK_BLOCK;
    return 0;
}

static int64_t tile_grain(int64_t N) {
    const int64_t ntiles = ntiles_of(N), threads = mote_threads();
    int64_t grain = ntiles / (4 * threads);  /* ~4 chunks a thread; a multiple of 4 tiles where it can be */
    return grain < 1 ? 1 : (grain > TILE_GRAIN_MAX ? TILE_GRAIN_MAX : (grain >= 4 ? grain / 4 * 4 : grain));
}

static int64_t build_count(const lut_job *J) { return J->ts * ((J->ncols + J->build_cols - 1) / J->build_cols); }

/* One product, its tokens in super-blocks (tables of all columns for `ts` tokens at a time). */
static int gemm_one(lut_job *J, int64_t T) {
    const int64_t ts = J->ts < T ? J->ts : T;
    J->tab = table_buffer((size_t)(ts * J->tok_stride));
    if (!J->tab) return -3;
    for (int64_t t0 = 0; t0 < T; t0 += ts) {
        J->t0 = t0;
        J->ts = t0 + ts <= T ? ts : T - t0;
        /* a decode-sized table set (a few microseconds) is built by the caller: one pool round trip less */
        if (J->ts * J->ncols <= 4096)
            build_items(J, 0, build_count(J));
        else
            mote_parallel_for(build_items, J, build_count(J), 1);
        mote_parallel_for(gemm_tiles, J, ntiles_of(J->N), tile_grain(J->N));
    }
    return 0;
}

int mote_lut_gemm_batch(const mote_tern_call *calls, int n, int isa) {
    isa = mote_isa_pick(isa);
    if (isa < 0) return -1;
    if (n < 0 || n > MOTE_MAX_TASKS) return -2;
    lut_job J[MOTE_MAX_TASKS];
    int owner[MOTE_MAX_TASKS];  /* the job whose tables this job reads (the same activations and columns) */
    int nj = 0;
    size_t bytes = 0;
    for (int i = 0; i < n; i++) {
        int rc = setup_job(J + nj, calls + i, isa);
        if (rc) return rc;
    }
    for (int i = 0; i < n; i++) {
        const mote_tern_call *c = calls + i;
        if (c->N == 0 || c->T == 0) continue;
        setup_job(J + nj, c, isa);
        if (c->T > J[nj].ts) {  /* a long prompt: its own super-blocks, one product at a time */
            int rc = gemm_one(J + nj, c->T);
            if (rc) return rc;
            continue;
        }
        J[nj].ts = c->T;
        owner[nj] = nj;
        for (int k = 0; k < nj; k++)
            if (owner[k] == k && J[k].q == c->q && J[k].q_stride == c->q_stride && J[k].ts == c->T &&
                J[k].ncols == J[nj].ncols && J[k].Kp == c->Kp) {
                owner[nj] = k;
                break;
            }
        if (owner[nj] == nj) bytes += (size_t)(c->T * J[nj].tok_stride);
        nj++;
    }
    if (!nj) return 0;
    /* every table of the batch in one per-thread buffer; long prompts above may have used it already */
    uint8_t *tab = table_buffer(bytes);
    if (!tab) return -3;
    mote_task tasks[MOTE_MAX_TASKS];
    int nt = 0;
    int64_t small = 0;
    for (int k = 0; k < nj; k++)
        if (owner[k] == k) {
            J[k].tab = tab;
            tab += J[k].ts * J[k].tok_stride;
            small += J[k].ts * J[k].ncols;
            tasks[nt++] = (mote_task){build_items, J + k, build_count(J + k), 1};
        }
    if (small <= 4096)  /* decode-sized tables: built here, one pool round trip less */
        for (int k = 0; k < nt; k++) build_items(tasks[k].ctx, 0, tasks[k].n);
    else
        mote_parallel_tasks(tasks, nt);
    for (int k = 0; k < nj; k++) {
        J[k].tab = J[owner[k]].tab;
        tasks[k] = (mote_task){gemm_tiles, J + k, ntiles_of(J[k].N), tile_grain(J[k].N)};
    }
    mote_parallel_tasks(tasks, nj);
    return 0;
}

int mote_lut_gemm(const uint8_t *packed, int64_t N, int64_t Kp, const int8_t *q, int64_t q_stride, const int32_t *sumq,
                  const float *step, const float *scale, int64_t T, float *y, int64_t y_stride, int isa) {
    /* the tables hold q * (code - 1): sum(q) is not read */
    const mote_tern_call c = {packed, 0, 0, N, Kp, q, q_stride, sumq, step, scale, T, y, y_stride};
    return mote_lut_gemm_batch(&c, 1, isa);
}
