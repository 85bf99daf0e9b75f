"""Triton kernels of MoTE training (the paper's STE forward on integer tensor cores).

    absmean_partial -> absmean_finish -> ternary_codes   scale s = fp32(mean|W| in fp64), int8 codes
    act_quant_int8                                       per-token absmax int8 codes + fp32 step
    int8_gemm                                            y = (q @ codes^T) * step * s, int32 accumulate
    grouped_int8_gemm                                    the same for all experts of a layer in one
                                                         launch, over tokens sorted by expert

Exactness, against mote_edge/quant.py (which this package may not import; tests compare the two):
- Scale: mean|W| is summed in float64 in two stages (per-block partial sums, then one program sums the
  partials), divided by n in float64 and rounded once to fp32, as `ternary_scale` does. Torch's own
  fp64 sum order differs between CPU and CUDA and numpy's (exporters/ternary.py) differs again; the
  project's contract is that an fp64 sum of fp32 |w| rounded to fp32 does not depend on the order
  (its error, ~log2(n) * 2^-53 relative, is far below fp32's 2^-24). A Triton reduction keeps W read
  once, where torch's `w.abs().double().mean()` writes an fp64 copy of W first.
- Codes: q = W / s with IEEE division (tl.div_rn: Triton's `/` is approximate for fp32 on NVIDIA),
  code = (q > 0.5) - (q < -0.5), which is clip(round_half_even(q), -1, 1) without rounding.
- Activations: r = (1 / amax) * 127 (div_rn, then a multiply: torch's 127 / amax), y = x * r, round half to even with (y + 1.5*2^23) - 1.5*2^23
  (Triton has no tl.round), clamp to [-128, 127]. The kernel is compiled with fp fusion off
  (ACT_OPTIONS): an FMA would round x*r + 1.5*2^23 once, i.e. round the exact product instead of the
  fp32 product torch rounds, and differ at ties.
- GEMM epilogue: float32(acc) * step[row] * s in that order, as the reference computes it.

Every shipped launch configuration is in CONFIGS; the compile gate (tests/test_cuda_train.py) compiles
exactly these for sm_80 and sm_90a.
"""
from __future__ import annotations

import triton
import triton.language as tl

EPS = 1e-5  # the floor of the weight scale and of a token's absmax (mote_edge/quant.py EPS)
QB = tl.constexpr(127.0)
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: adding and subtracting it rounds |y| < 2^22 half to even

# kernel -> launch meta-parameters (block sizes, warps, stages): the one place the shipped configs live
CONFIGS = {
    "absmean_partial": dict(BLOCK=4096, num_warps=4),
    "absmean_finish": dict(BLOCK=1024, num_warps=4),
    "ternary_codes": dict(BLOCK=2048, num_warps=4),
    "act_quant_int8": dict(BLOCK_K=1024, WITH_SUM=False, num_warps=4),  # w2a8.quantize_act: WITH_SUM=True
    "int8_gemm": dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, num_warps=4, num_stages=3),
    "grouped_int8_gemm": dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, num_warps=4, num_stages=3),
}
# compile options beyond the meta-parameters (also passed by the gate)
OPTIONS = {"act_quant_int8": dict(enable_fp_fusion=False)}


@triton.jit
def absmean_partial_kernel(w_ptr, part_ptr, n, BLOCK: tl.constexpr):
    """part[pid] = sum of |w| over this program's block, accumulated in float64."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(tl.abs(w).to(tl.float64), axis=0))


@triton.jit
def absmean_finish_kernel(part_ptr, scale_ptr, n_parts, n, eps, BLOCK: tl.constexpr):
    """scale = max(float32(sum(part) / n), eps): one program, float64 until the single rounding."""
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, n_parts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < n_parts, other=0.0)
    mean = tl.sum(acc, axis=0) / n.to(tl.float64)
    tl.store(scale_ptr, tl.maximum(mean.to(tl.float32), eps))


@triton.jit
def ternary_codes_kernel(w_ptr, scale_ptr, codes_ptr, n, BLOCK: tl.constexpr):
    """codes = clip(round(w / s), -1, 1) as int8, read from W once the scale is known."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(scale_ptr)
    q = tl.div_rn(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32), s)
    codes = (q > 0.5).to(tl.int8) - (q < -0.5).to(tl.int8)
    tl.store(codes_ptr + offs, codes, mask=mask)


@triton.jit
def act_quant_int8_kernel(x_ptr, q_ptr, step_ptr, sum_ptr, K, stride_x, stride_q, eps, BLOCK_K: tl.constexpr,
                          WITH_SUM: tl.constexpr):
    """One row (token) per program: amax = max(max|x|, eps), q = clamp(round(x * (127 / amax))),
    step = amax / 127 (so the value of q is q * step, mote_edge.quant.quantize_activation_int8).
    WITH_SUM: also sum[row] = sum of q, which the W2A8 kernels subtract (their codes are stored + 1); the one
    per-token quantiser of training (without) and inference (w2a8.quantize_act, with)."""
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = x_ptr + row * stride_x, q_ptr + row * stride_q
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    amax_s = tl.maximum(tl.max(amax, axis=0), eps)
    # torch evaluates quant.py's `QB / amax` as amax.reciprocal() * QB: two IEEE roundings, not one division
    # (div_rn: Triton's plain `/` is approximate on the GPU)
    r = tl.div_rn(tl.full([], 1.0, tl.float32), amax_s) * QB
    total = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for start in range(0, K, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        mask = offs < K
        y = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32) * r
        # launched with enable_fp_fusion=False (OPTIONS), so the multiply is never fused into this add
        y = (y + ROUND_MAGIC) - ROUND_MAGIC
        q = tl.minimum(tl.maximum(y, -QB - 1.0), QB).to(tl.int32)
        tl.store(q_row + offs, q.to(tl.int8), mask=mask)
        if WITH_SUM:
            total += q
    tl.store(step_ptr + row, tl.div_rn(amax_s, QB))
    if WITH_SUM:
        tl.store(sum_ptr + row, tl.sum(total, axis=0))


@triton.jit
def _int8_tile(a_ptr, b_ptr, rows, row_mask, cols, col_mask, K, stride_a, stride_b,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 [BLOCK_N, BLOCK_M] = A[rows, :] @ B[cols, :]^T over all of K (masked tails read as 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a + ks[None, :]
    b_ptrs = b_ptr + cols[None, :] * stride_b + ks[:, None]
    for start in range(0, K, BLOCK_K):
        k_mask = (start + ks) < K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _store_epilogue(c_ptr, acc, rows, row_mask, cols, col_mask, stride_c, step_ptr, s):
    """int32 output: the accumulator itself; float output: float32(acc) * step[row] * s."""
    ptrs = c_ptr + rows[:, None] * stride_c + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if c_ptr.dtype.element_ty == tl.int32:
        tl.store(ptrs, acc, mask=mask)
    else:
        step = tl.load(step_ptr + rows, mask=row_mask, other=0.0)
        y = acc.to(tl.float32) * step[:, None] * s
        tl.store(ptrs, y.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def int8_gemm_kernel(a_ptr, b_ptr, c_ptr, step_ptr, scale_ptr, N, M, K, stride_a, stride_b, stride_c,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """C [N, M] = epilogue(A [N, K] int8 @ B [M, K]^T int8): activations x ternary codes."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask, col_mask = rows < N, cols < M
    acc = _int8_tile(a_ptr, b_ptr, rows, row_mask, cols, col_mask, K, stride_a, stride_b, BLOCK_N, BLOCK_M, BLOCK_K)
    _store_epilogue(c_ptr, acc, rows, row_mask, cols, col_mask, stride_c, step_ptr, tl.load(scale_ptr))


@triton.jit
def grouped_int8_gemm_kernel(a_ptr, b_ptr, c_ptr, step_ptr, scale_ptr, offs_ptr, E, M, K,
                             stride_a, stride_be, stride_b, stride_c,
                             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """All experts in one launch. Rows of A are tokens sorted by expert; expert e owns rows
    offs[e]:offs[e+1] (possibly none) and its codes B[e] [M, K]. Program (t, m) takes the t-th row tile
    counted over all experts' tiles; the grid holds cdiv(T, BLOCK_N) + E tiles (an upper bound known
    without reading offs on the host), and programs past the last tile return at once."""
    pid_t, pid_m = tl.program_id(0), tl.program_id(1)
    expert = pid_t * 0 - 1
    row0 = pid_t * 0
    row_end = pid_t * 0
    first = pid_t * 0
    for e in range(0, E):
        lo = tl.load(offs_ptr + e)
        hi = tl.load(offs_ptr + e + 1)
        n_tiles = tl.cdiv(hi - lo, BLOCK_N)
        mine = (pid_t >= first) & (pid_t < first + n_tiles)
        expert = tl.where(mine, e, expert)
        row0 = tl.where(mine, lo + (pid_t - first) * BLOCK_N, row0)
        row_end = tl.where(mine, hi, row_end)
        first += n_tiles
    if expert < 0:
        return
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_N)
    cols = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask, col_mask = rows < row_end, cols < M
    acc = _int8_tile(a_ptr, b_ptr + expert.to(tl.int64) * stride_be, rows, row_mask, cols, col_mask, K,
                     stride_a, stride_b, BLOCK_N, BLOCK_M, BLOCK_K)
    _store_epilogue(c_ptr, acc, rows, row_mask, cols, col_mask, stride_c, step_ptr, tl.load(scale_ptr + expert))


# ---------------------------------------------------------------------------------------------
# launchers (plain torch tensors in, results out; the torch ops in train_ops.py wrap these). torch is
# imported inside them so that the kernels above can be compiled (the gate) with nothing but triton.


def _launch(kernel, name: str, grid, *args, **meta):
    kernel[grid](*args, **(CONFIGS[name] | OPTIONS.get(name, {}) | meta))


def ternary_quantize(w, scale_out=None, codes_out=None):
    """(codes int8 like w, scale fp32 []) of a weight matrix (any float dtype). The *_out tensors, when
    given, are written instead of new ones (tests poison them first)."""
    import torch

    w = w.contiguous()
    n = w.numel()
    block = CONFIGS["absmean_partial"]["BLOCK"]
    n_parts = max(1, triton.cdiv(n, block))
    parts = torch.empty(n_parts, dtype=torch.float64, device=w.device)
    scale = torch.empty((), dtype=torch.float32, device=w.device) if scale_out is None else scale_out
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device) if codes_out is None else codes_out
    _launch(absmean_partial_kernel, "absmean_partial", (n_parts,), w, parts, n)
    _launch(absmean_finish_kernel, "absmean_finish", (1,), parts, scale, n_parts, n, EPS)
    _launch(ternary_codes_kernel, "ternary_codes", (triton.cdiv(n, CONFIGS["ternary_codes"]["BLOCK"]),),
            w, scale, codes, n)
    return codes, scale


def act_quant_int8(x, q_out=None, step_out=None):
    """x [N, K] float -> (q int8 [N, K], step fp32 [N])."""
    import torch

    x = x.contiguous()
    n, k = x.shape
    q = torch.empty((n, k), dtype=torch.int8, device=x.device) if q_out is None else q_out
    step = torch.empty(n, dtype=torch.float32, device=x.device) if step_out is None else step_out
    if n:
        _launch(act_quant_int8_kernel, "act_quant_int8", (n,), x, q, step, step, k, x.stride(0), q.stride(0), EPS)
    return q, step


def int8_gemm(q, codes, step, scale, out):
    """out [N, M] (int32: the accumulator; float: its epilogue) of q [N, K] int8 and codes [M, K] int8."""
    n, k = q.shape
    m = codes.shape[0]
    cfg = CONFIGS["int8_gemm"]
    if n and m:
        _launch(int8_gemm_kernel, "int8_gemm", (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"])),
                q, codes, out, step, scale, n, m, k, q.stride(0), codes.stride(0), out.stride(0))
    return out


def grouped_int8_gemm(q, codes, step, scales, offsets, out):
    """out [T, M] for rows of q [T, K] sorted by expert, codes [E, M, K], scales [E], offsets [E + 1] int32."""
    t, k = q.shape
    e, m, _ = codes.shape
    cfg = CONFIGS["grouped_int8_gemm"]
    if t and m:
        grid = (triton.cdiv(t, cfg["BLOCK_N"]) + e, triton.cdiv(m, cfg["BLOCK_M"]))
        _launch(grouped_int8_gemm_kernel, "grouped_int8_gemm", grid, q, codes, out, step, scales, offsets,
                e, m, k, q.stride(0), codes.stride(0), codes.stride(1), out.stride(0))
    return out
