// W2A8 decode helpers shared by the GPU kernel (w2a8.cu) and its host test library (w2a8_host.cpp):
// the same source compiles for the device (nvcc) and for the host (g++), so the host build, tested
// against the torch integer reference, checks the exact decode logic the GPU runs.
//
// Layout (cuda_kernels/w2a8.py): a uint32 word holds 16 codes q = code + 1 in {0, 1, 2} of inputs
// k = 16 w + r at bit 8 (r % 4) + 2 (r // 4); so (word >> 2j) & 0x03030303 holds the codes of inputs
// 16 w + 4j .. 4j + 3 as four bytes, a dp4a operand against four consecutive int8 activations.
// The dot is taken with q itself; the caller subtracts the token's sum of activations once
// (xq . code = xq . q - sum(xq)), so no per-weight subtract is needed.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define W2A8_HD __host__ __device__ __forceinline__
#else
#define W2A8_HD static inline
#endif

// lop3.b32: any bitwise function of three inputs, immLut as PTX defines it (a = 0xF0, b = 0xCC,
// c = 0xAA): result bit i = bit (4 a_i + 2 b_i + c_i) of LUT. The host branch evaluates that table.
template <int LUT>
W2A8_HD uint32_t w2a8_lop3(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
    return d;
#else
    uint32_t d = 0;
    for (int i = 0; i < 32; ++i) {
        const int idx = (int)((((a >> i) & 1u) << 2) | (((b >> i) & 1u) << 1) | ((c >> i) & 1u));
        d |= (uint32_t)((LUT >> idx) & 1) << i;
    }
    return d;
#endif
}

// (a & b) | c: BitNet's decode LUT (0xF0 & 0xCC) | 0xAA
#define W2A8_LUT_AND_OR 0xEA

// Bytes = the codes q of inputs 16 w + 4j .. 4j + 3 (j = 0..3): one shift and one lop3, the OR input
// zero (BitNet adds its bias here with a second instruction; the caller's sum(xq) replaces it).
W2A8_HD uint32_t w2a8_decode4(uint32_t word, int j) {
    return w2a8_lop3<W2A8_LUT_AND_OR>(word >> (2 * j), 0x03030303u, 0u);
}

// dp4a: c + the sum of the four signed-byte products of a and b.
W2A8_HD int32_t w2a8_dp4a(uint32_t a, uint32_t b, int32_t c) {
#if defined(__CUDA_ARCH__)
    return __dp4a((int)a, (int)b, c);
#else
    for (int i = 0; i < 4; ++i)
        c += (int32_t)(int8_t)(a >> (8 * i)) * (int32_t)(int8_t)(b >> (8 * i));
    return c;
#endif
}

// acc + q . x over the 16 inputs of one word; x4[j] = activations 16 w + 4j .. 4j + 3 (little endian).
W2A8_HD int32_t w2a8_dot16(uint32_t word, const uint32_t x4[4], int32_t acc) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc = w2a8_dp4a(w2a8_decode4(word, j), x4[j], acc);
    return acc;
}
