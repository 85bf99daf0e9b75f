// Host build of the W2A8 decode helpers (g++), so the lop3 / dp4a decode the GPU kernel runs is tested
// on any machine against the torch integer reference. Same loop structure as w2a8.cu.
#include "w2a8_decode.cuh"

extern "C" {

uint32_t mote_host_lop3_and_or(uint32_t a, uint32_t b, uint32_t c) { return w2a8_lop3<W2A8_LUT_AND_OR>(a, b, c); }

int32_t mote_host_dp4a(uint32_t a, uint32_t b, int32_t c) { return w2a8_dp4a(a, b, c); }

// words [n_words] -> codes [16 n_words] in {-1, 0, 1} (code = decoded byte - 1)
void mote_host_decode(const uint32_t* words, int64_t n_words, int8_t* codes) {
    for (int64_t w = 0; w < n_words; ++w)
        for (int j = 0; j < 4; ++j) {
            const uint32_t v = w2a8_decode4(words[w], j);
            for (int b = 0; b < 4; ++b) codes[16 * w + 4 * j + b] = (int8_t)((v >> (8 * b)) & 0xFF) - 1;
        }
}

// out[m, n] = xq[m] . code[n] (int32), xq [M, K] int8 with K % 16 == 0, words [N, K / 16], xsum [M]
void mote_host_gemv_int(const uint32_t* words, const int8_t* xq, const int32_t* xsum, int M, int N, int K,
                        int32_t* out) {
    const int kw = K / 16;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            int32_t acc = 0;
            for (int w = 0; w < kw; ++w) {
                uint32_t x4[4];
                for (int j = 0; j < 4; ++j) {
                    const uint8_t* p = (const uint8_t*)(xq + (int64_t)m * K + 16 * w + 4 * j);
                    x4[j] = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
                }
                acc = w2a8_dot16(words[(int64_t)n * kw + w], x4, acc);
            }
            out[(int64_t)m * N + n] = acc - xsum[m];
        }
}

}  // extern "C"
