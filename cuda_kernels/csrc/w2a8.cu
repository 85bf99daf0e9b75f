// W2A8 decode GEMV in CUDA C: 2-bit packed ternary codes x per-token int8 activations, dp4a + lop3
// (BitNet's GPU kernel style). Built on demand by cuda_kernels/cuda_lib.py with nvcc for sm_80 + sm_90a
// (+ compute_80 PTX for later GPUs) into an extern "C" .so that ctypes loads; it launches on the torch
// stream it is handed. Layout and decode: w2a8_decode.cuh (shared with the host test build).
//
// One warp per output row, 4 rows a block; each lane streams 16-byte chunks (64 codes) of its row, four
// loads in flight, and the matching 64 activations of each token (MT tokens at once, so a weight chunk is read once for all of
// them), 16 dp4a per chunk and token; a warp shuffle sums the lanes. Epilogue as the Triton kernels:
// (float(acc - sum(xq)) * xs) * ws, so both give the same bits.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "w2a8_decode.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kUnroll = 4;

template <int MT>
__global__ void __launch_bounds__(kWarps * 32)
w2a8_gemv_kernel(const uint4* __restrict__ W, const int8_t* __restrict__ xq, const int32_t* __restrict__ xsum,
                 const float* __restrict__ xs, const float* __restrict__ ws, void* __restrict__ out,
                 int out_mode, int M, int N, int K) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * kWarps + (threadIdx.x >> 5);
    const int m0 = blockIdx.y * MT;
    if (n >= N) return;
    const int kv = K / 64;  // 16-byte chunks a row
    const uint4* wrow = W + (int64_t)n * kv;
    int32_t acc[MT];
#pragma unroll
    for (int t = 0; t < MT; ++t) acc[t] = 0;
    // kUnroll weight chunks are loaded before any is used: a decode GEMV is bound by the bytes in flight
    for (int c0 = lane; c0 < kv; c0 += 32 * kUnroll) {
        uint4 wv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (c0 + 32 * u < kv) wv[u] = __ldcs(wrow + c0 + 32 * u);  // streamed once: evict first
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int c = c0 + 32 * u;
            if (c >= kv) break;
            const uint32_t wd[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
            for (int t = 0; t < MT; ++t) {
                if (m0 + t < M) {  // the same for the whole warp
                    const uint4* xrow = reinterpret_cast<const uint4*>(xq + (int64_t)(m0 + t) * K) + 4 * c;
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const uint4 xv = __ldg(xrow + i);  // activations: reused by every row, cached
                        const uint32_t x4[4] = {xv.x, xv.y, xv.z, xv.w};
                        acc[t] = w2a8_dot16(wd[i], x4, acc[t]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MT; ++t)
        for (int off = 16; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);
    if (lane != 0) return;
    const float w_scale = ws[0];
#pragma unroll
    for (int t = 0; t < MT; ++t) {
        const int m = m0 + t;
        if (m >= M) break;
        const int32_t v = acc[t] - xsum[m];
        const int64_t at = (int64_t)m * N + n;
        if (out_mode == 2) {
            static_cast<int32_t*>(out)[at] = v;
        } else {
            const float y = (float)v * xs[m] * w_scale;
            if (out_mode == 1)
                static_cast<__nv_bfloat16*>(out)[at] = __float2bfloat16_rn(y);
            else
                static_cast<float*>(out)[at] = y;
        }
    }
}

template <int MT>
cudaError_t launch(const void* W, const void* xq, const void* xsum, const void* xs, const void* ws, void* out,
                   int out_mode, int M, int N, int K, cudaStream_t stream) {
    const dim3 grid((N + kWarps - 1) / kWarps, (M + MT - 1) / MT);
    w2a8_gemv_kernel<MT><<<grid, kWarps * 32, 0, stream>>>(
        static_cast<const uint4*>(W), static_cast<const int8_t*>(xq), static_cast<const int32_t*>(xsum),
        static_cast<const float*>(xs), static_cast<const float*>(ws), out, out_mode, M, N, K);
    return cudaGetLastError();
}

}  // namespace

extern "C" {

int mote_w2a8_abi_version(void) { return 1; }

// out [M, N] (out_mode 0 fp32, 1 bf16, 2 int32 dot) = xq [M, K] int8 . codes^T, W = words [N, K / 16]
// (16-byte aligned, K % 64 == 0), xsum [M] int32, xs [M] fp32, ws [1] fp32; returns a cudaError_t.
int mote_w2a8_gemv(const void* W, const void* xq, const void* xsum, const void* xs, const void* ws, void* out,
                   int out_mode, int M, int N, int K, void* stream) {
    if (M <= 0 || N <= 0 || K <= 0 || K % 64 != 0 || out_mode < 0 || out_mode > 2) return (int)cudaErrorInvalidValue;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (M == 1) return (int)launch<1>(W, xq, xsum, xs, ws, out, out_mode, M, N, K, s);
    if (M == 2) return (int)launch<2>(W, xq, xsum, xs, ws, out, out_mode, M, N, K, s);
    if (M <= 4) return (int)launch<4>(W, xq, xsum, xs, ws, out, out_mode, M, N, K, s);
    return (int)launch<8>(W, xq, xsum, xs, ws, out, out_mode, M, N, K, s);
}

const char* mote_w2a8_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
