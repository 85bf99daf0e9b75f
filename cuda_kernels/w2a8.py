"""W2A8 inference kernels (Triton): 2-bit packed ternary codes x per-token int8 activations.

Math (the deployable form of mote_edge/quant.py): activations absmax per token to int8 with
round-half-even, xq = clip(round(x * (127 / max(amax, 1e-5))), -128, 127) with 127 / amax taken as torch
takes it (amax.reciprocal() * 127, two IEEE roundings), scale xs = amax / 127 (IEEE);
weights = codes in {-1, 0, 1} times one fp32 scale ws per matrix. y = (xq . codes) * xs * ws, the dot
exact in int32. Codes are stored as q = code + 1 in {0, 1, 2}, so the kernels feed q itself to the
int8 dot and subtract the token's sum of xq once: xq . codes = xq . q - sum(xq) (no per-weight subtract).

Packed layout (one for every kernel, the Triton ones and the CUDA C GEMV of csrc/w2a8.cu): int32 words
[..., N, ceil(K / 16)], 16 codes a word, row n contiguous along K. Code k = 16 w + r of a row sits in word
w at bit 8 (r % 4) + 2 (r // 4), so (word >> 2j) & 0x03030303 holds the codes of k = 16 w + 4j .. 4j + 3 as
four bytes: one lop3 gives a dp4a operand (BitNet's GPU layout). Padding codes past K are q = 1 (zero).
Why not upload the GGUF's TQ2_0 blocks as they are: a 66-byte block is not 4-byte aligned (no word or
vector loads), its byte j holds weights j, j+32, j+64, j+96 (no dp4a operand without a shuffle), its fp16
`d` repeats the matrix scale every 256 weights, and the Q2_0 / TQ1_0 / Q4_0 files of the same model need a
decode anyway. So the GPU reads the same GGUF (one export serves every engine) and repacks each expert
matrix once at load (`pack_gguf_ternary`, every block checked by runtime_cpu.quants): exactly 2 bits a
weight in GPU memory, 2.0 bpw against 2.0625 on file.

Kernels: `quantize_act` (per-token int8), `w2a8_linear` (decode GEMV on CUDA cores for M <= GEMV_MAX_M,
tensor-core GEMM with `tl.dot` int8 -> int32 above, BM = 16 for decode batches, 128 for prefill; both can
split K, the splits adding int32 partials atomically, so the result is the same bits in any order),
`w2a8_grouped` (all experts of a layer in one launch over tokens sorted by expert; ragged and empty
groups). Every shipped config is in SHIPPED (the compile gate and the device check read it from there).
The CUDA C GEMV (cuda_lib.w2a8_gemv_cuda, K % 64 == 0) reads the same words and gives the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ..exporters.errors import MoteExportError
from . import ternary_train as tt

QB = 127
EPS = 1e-5
CODES_PER_WORD = 16

# Every config the wrappers launch, in one place. Tiles: BM tokens x BN outputs x BK inputs. Chosen so that
# each compiles for sm_80 / sm_90a without spills (compile_gate); not yet timed on a GPU: device_check's
# sweeps and decode picks are the measurements to choose them (and GEMV_MAX_M, and CUDA C vs Triton) from.
SHIPPED = {
    # CUDA-core GEMV (multiply + tl.sum): the weight tile is decoded once and used for every token.
    # SPLIT_K = 0: split K until the launch has about two programs per SM (split_k_for); the down
    # projection (N = hidden) has too few row tiles to keep a GPU's memory busy otherwise
    "gemv": {1: dict(BM=1, BN=16, BK=512, SPLIT_K=0, num_warps=4, num_stages=2),
             2: dict(BM=2, BN=16, BK=256, SPLIT_K=0, num_warps=4, num_stages=2),
             4: dict(BM=4, BN=16, BK=256, SPLIT_K=0, num_warps=4, num_stages=2)},
    # tensor-core GEMM: int8 tl.dot -> int32 (mma.sync on sm_80; wgmma on sm_90a from BM = 64)
    "gemm": {"decode": dict(BM=16, BN=64, BK=128, SPLIT_K=0, num_warps=4, num_stages=3),
             "prefill": dict(BM=128, BN=128, BK=128, SPLIT_K=1, num_warps=8, num_stages=3)},
    "grouped": {"experts": dict(BM=64, BN=128, BK=128, num_warps=4, num_stages=3)},
}
GEMV_MAX_M = 4  # decode batches up to this size take the GEMV; M <= 16 the decode GEMM, above the prefill GEMM
DECODE_MAX_M = 16
MAX_SPLIT_K = 16


def _launch_opts(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}


def _tiles(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}


_SMS: dict = {}


def split_k_for(cfg: dict, tiles: int, kw: int, device) -> int:
    """The config's SPLIT_K, or for 0 (auto) the split that gives about two programs per SM (1 on CPU),
    at most one split per BK step of K and MAX_SPLIT_K."""
    if cfg.get("SPLIT_K", 1) > 0:
        return cfg.get("SPLIT_K", 1)
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    steps = -(-kw // (cfg["BK"] // CODES_PER_WORD))
    return max(1, min(steps, MAX_SPLIT_K, -(-2 * _SMS[device] // max(tiles, 1))))


_WORKSPACE: dict = {}


def _workspace(device, elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K partial sums and arrival counters of a device: zero, and left zero by every launch (the
    last split of a tile resets them), so they are allocated once and grow only. One stream at a time."""
    part, lock = _WORKSPACE.get(device, (None, None))
    if part is None or part.numel() < elems:
        _RETIRED.append(part)  # a CUDA graph captured earlier may still point at the smaller one
        part = torch.zeros(max(elems, 1), dtype=torch.int32, device=device)
    if lock is None or lock.numel() < tiles:
        _RETIRED.append(lock)
        lock = torch.zeros(max(tiles, 1), dtype=torch.int32, device=device)
    _WORKSPACE[device] = (part, lock)
    return part, lock


_RETIRED: list = []


# ----------------------------------------------------------------------------------------------- packing

def _shifts(device=None) -> torch.Tensor:
    r = torch.arange(CODES_PER_WORD, device=device)
    return (r % 4) * 8 + (r // 4) * 2


def pack_w2(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., N, K] in {-1, 0, 1} -> int32 words [..., N, ceil(K / 16)] (layout above)."""
    if codes.dtype != torch.int8 or codes.dim() < 2:
        raise MoteExportError(f"pack_w2 wants int8 codes [..., N, K], got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) > 1):
        raise MoteExportError("ternary codes must be in {-1, 0, 1}")
    *lead, n, k = codes.shape
    kw = -(-k // CODES_PER_WORD)
    q = torch.ones((*lead, n, kw * CODES_PER_WORD), dtype=torch.int64, device=codes.device)
    q[..., :k] = codes.to(torch.int64) + 1
    words = (q.view(*lead, n, kw, CODES_PER_WORD) << _shifts(codes.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the top bit pair makes a word negative
    return words.to(torch.int32).contiguous()


def unpack_w2(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 words [..., N, KW] -> int8 codes [..., N, k] (the reference decode)."""
    q = (words.to(torch.int64)[..., None] >> _shifts(words.device)) & 3
    return (q.flatten(-2)[..., :k] - 1).to(torch.int8)


@dataclass
class PackedTernary:
    """Ternary matrices ready for the kernels: words [..., N, KW] int32, one fp32 scale per matrix
    (a device tensor, so launches never sync), k = the input width."""
    words: torch.Tensor
    scales: torch.Tensor
    k: int

    @property
    def n(self) -> int:
        return self.words.shape[-2]

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales) -> "PackedTernary":
        s = torch.as_tensor(scales, dtype=torch.float32, device=codes.device).reshape(codes.shape[:-2])
        return cls(pack_w2(codes), s.contiguous(), codes.shape[-1])

    def to(self, device) -> "PackedTernary":
        return PackedTernary(self.words.to(device), self.scales.to(device), self.k)


def pack_gguf_ternary(raw: np.ndarray, qtype, shape: tuple[int, ...], scales, name: str = "") -> PackedTernary:
    """A GGUF ternary tensor (TQ2_0 / TQ1_0 / Q2_0 / Q4_0 codes 7-9 / F16, numpy shape [..., rows, K]) and
    its mote.ternary_scales -> PackedTernary. Every block is checked to be the exporter's exact form."""
    from ..runtime_cpu.quants import decode_ternary

    codes = decode_ternary(raw, qtype, tuple(shape), scales, name)
    return PackedTernary.from_codes(torch.from_numpy(codes), np.asarray(scales, np.float32))


# ------------------------------------------------------------------------------------------- references

def ref_quantize_act(x: torch.Tensor):
    """Torch reference of quantize_act, the op order of mote_edge/quant.py quantize_activation_int8."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    xq = (xf * (QB / amax)).round().clamp(-QB - 1, QB).to(torch.int8)
    # xs = amax / 127 correctly rounded (torch's CUDA `tensor / scalar` multiplies by fp32(1 / 127) instead);
    # an fp64 quotient rounded to fp32 is the IEEE fp32 quotient (53 >= 2 * 24 + 2: no double-rounding error)
    xs = (amax.double() / QB).float().reshape(-1)
    return xq, xs, xq.to(torch.int32).sum(-1, dtype=torch.int32)


def ref_int_dot(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact xq [M, K] . codes [N, K]^T as int32: int64 matmul on CPU; float64 on CUDA (no integer
    matmul there), exact since every partial sum is below 128 * K << 2^53."""
    if xq.device.type == "cpu":
        return (xq.to(torch.int64) @ codes.to(torch.int64).T).to(torch.int32)
    return (xq.double() @ codes.double().T).round().to(torch.int32)


def ref_epilogue(acc: torch.Tensor, xs: torch.Tensor, ws) -> torch.Tensor:
    """The kernels' fp32 epilogue in the same op order: (float(acc) * xs) * ws."""
    return acc.float() * xs.float()[:, None] * torch.as_tensor(ws, dtype=torch.float32, device=acc.device)


# ---------------------------------------------------------------------------------------------- kernels

@triton.jit
def _store_out(acc, offs_m, m_mask, offs_n, n_mask, xsum_ptr, xs_ptr, ws, out_ptr, stride_om,
               OUT_INT32: tl.constexpr):
    """acc = xq . q; subtract sum(xq) (q = code + 1), then the int32 result or (acc * xs) * ws."""
    xsum = tl.load(xsum_ptr + offs_m, mask=m_mask, other=0)
    acc = acc - xsum[:, None]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if OUT_INT32:
        tl.store(ptrs, acc, mask=mask)
    else:
        xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
        y = acc.to(tl.float32) * xs[:, None] * ws
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(acc, offs_m, m_mask, offs_n, n_mask, xsum_ptr, xs_ptr, ws, out_ptr, stride_om, part_ptr, lock_ptr,
            tile, N, OUT_INT32: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write a tile. With SPLIT_K > 1 every split adds its int32 partial into the workspace (integer adds:
    exact in any order) and counts itself in; the last to arrive takes the total with an atomic exchange
    against 0 (leaving the workspace zeroed for the next call), resets the counter and writes the output.
    One launch, no memset, bit-identical to SPLIT_K = 1."""
    if SPLIT_K == 1:
        _store_out(acc, offs_m, m_mask, offs_n, n_mask, xsum_ptr, xs_ptr, ws, out_ptr, stride_om, OUT_INT32)
    else:
        mask = m_mask[:, None] & n_mask[None, :]
        parts = part_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(parts, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is in before the count says so
        arrived = tl.atomic_add(lock_ptr + tile, 1)
        if arrived == SPLIT_K - 1:
            total = tl.atomic_xchg(parts, tl.zeros_like(acc), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)
            _store_out(total, offs_m, m_mask, offs_n, n_mask, xsum_ptr, xs_ptr, ws, out_ptr, stride_om, OUT_INT32)


@triton.jit
def _split_range(KW, pid_k, BK: tl.constexpr, SPLIT_K: tl.constexpr):
    """Words [lo, hi) of split pid_k: whole BK steps, the last splits possibly empty."""
    per = tl.cdiv(tl.cdiv(KW, BK // 16), SPLIT_K) * (BK // 16)
    lo = pid_k * per
    return lo, tl.minimum(KW, lo + per)


@triton.jit
def _gemv_kernel(xq_ptr, xsum_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, KW, stride_xm,
                 stride_om, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                 OUT_INT32: tl.constexpr):
    """Decode: BN output rows a program (and 1 / SPLIT_K of K); each [BN, BK] weight tile is decoded once
    for all M <= BM tokens."""
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BM)
    offs_w = tl.arange(0, BK // 16)
    r = tl.arange(0, 16)
    shifts = (r % 4) * 8 + (r // 4) * 2
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * KW
    acc = tl.zeros([BM, BN], tl.int32)
    lo, hi = _split_range(KW, tl.program_id(1), BK, SPLIT_K)
    # the tile stays [BN, BK/16 words, 16 codes] (no reshape, so no layout shuffle through shared memory);
    # the loop runs over words so the compiler sees 16-divisible offsets and vectorizes the loads
    for w0 in range(lo, hi, BK // 16):
        wi = w0 + offs_w
        p = tl.load(w_rows + wi[None, :], mask=n_mask[:, None] & (wi < hi)[None, :], other=0)
        q = (p[:, :, None] >> shifts[None, None, :]) & 3
        k2 = wi[:, None] * 16 + r[None, :]
        k_mask = k2 < K
        for m in tl.static_range(BM):
            xk = tl.load(xq_ptr + m * stride_xm + k2, mask=k_mask & (m < M), other=0).to(tl.int32)
            part = tl.sum(tl.sum(q * xk[None, :, :], axis=2), axis=1)
            acc += tl.where(offs_m[:, None] == m, part[None, :], 0)
    ws = tl.load(ws_ptr)
    _finish(acc, offs_m, offs_m < M, offs_n, n_mask, xsum_ptr, xs_ptr, ws, out_ptr, stride_om, part_ptr, lock_ptr,
            pid, N, OUT_INT32, SPLIT_K)


@triton.jit
def _mma_tile(xq_ptr, stride_xm, offs_m, m_mask, w_ptr, offs_n, n_mask, K, KW, lo, hi,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """int32 [BM, BN] = xq[offs_m] . q[offs_n] over the words [lo, hi) of K: int8 tl.dot on tensor cores.
    Weight words past hi load as 0 (q = 0), so whatever activations meet them add nothing."""
    offs_k = tl.arange(0, BK)
    offs_w = tl.arange(0, BK // 16)
    r = tl.arange(0, 16)
    shifts = (r % 4) * 8 + (r // 4) * 2
    x_rows = xq_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * KW
    acc = tl.zeros([BM, BN], tl.int32)
    for w0 in range(lo, hi, BK // 16):
        k0 = w0 * 16
        a = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None] & (k0 + offs_k < K)[None, :], other=0)
        wi = w0 + offs_w
        p = tl.load(w_cols + wi[:, None], mask=(wi < hi)[:, None] & n_mask[None, :], other=0)  # [BK/16, BN]
        b = tl.reshape(((p[:, None, :] >> shifts[None, :, None]) & 3).to(tl.int8), (BK, BN))
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _gemm_kernel(xq_ptr, xsum_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, KW, stride_xm,
                 stride_om, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                 OUT_INT32: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    lo, hi = _split_range(KW, tl.program_id(2), BK, SPLIT_K)
    acc = _mma_tile(xq_ptr, stride_xm, offs_m, m_mask, w_ptr, offs_n, n_mask, K, KW, lo, hi, BM, BN, BK)
    ws = tl.load(ws_ptr)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    _finish(acc, offs_m, m_mask, offs_n, n_mask, xsum_ptr, xs_ptr, ws, out_ptr, stride_om, part_ptr, lock_ptr,
            tile, N, OUT_INT32, SPLIT_K)


@triton.jit
def _grouped_kernel(xq_ptr, xsum_ptr, xs_ptr, w_ptr, ws_ptr, offs_ptr, out_ptr, N, K, KW, E,
                    stride_xm, stride_om, stride_we,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, OUT_INT32: tl.constexpr):
    """Tokens sorted by expert; expert e owns rows offs[e]:offs[e + 1] (offs int32 [E + 1], as the training
    ops take them). Program t takes the t-th BM-row tile of the concatenated groups (found by walking the E groups, so no
    tile table and no host sync); programs past the last tile exit."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    group = t * 0 - 1
    row0 = t * 0
    row_end = t * 0
    seen = t * 0
    start = tl.load(offs_ptr)
    for e in range(E):
        end = tl.load(offs_ptr + e + 1)
        tiles = tl.cdiv(end - start, BM)
        hit = (t >= seen) & (t < seen + tiles)
        group = tl.where(hit, e, group)
        row0 = tl.where(hit, start + (t - seen) * BM, row0)
        row_end = tl.where(hit, end, row_end)
        seen += tiles
        start = end
    if group >= 0:
        offs_m = row0 + tl.arange(0, BM)
        m_mask = offs_m < row_end
        w_e = w_ptr + group.to(tl.int64) * stride_we
        acc = _mma_tile(xq_ptr, stride_xm, offs_m, m_mask, w_e, offs_n, n_mask, K, KW, 0, KW, BM, BN, BK)
        ws = tl.load(ws_ptr + group)
        _store_out(acc, offs_m, m_mask, offs_n, n_mask, xsum_ptr, xs_ptr, ws, out_ptr, stride_om, OUT_INT32)


# --------------------------------------------------------------------------------------------- wrappers

@dataclass
class QuantizedAct:
    """Per-token int8 activations: xq [M, K] int8, xs [M] fp32 (amax / 127), xsum [M] int32 (sum of xq)."""
    xq: torch.Tensor
    xs: torch.Tensor
    xsum: torch.Tensor


def _out(out, shape, dtype, device, what: str) -> torch.Tensor:
    """A caller's output tensor (tests poison it first, so unwritten elements show), checked, or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device) or not out.is_contiguous():
        raise MoteExportError(f"{what}: out must be a contiguous {dtype} {tuple(shape)} on {device}, got "
                              f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def quantize_act(x: torch.Tensor, out: QuantizedAct | None = None) -> QuantizedAct:
    """x [M, K] (fp32 / bf16 / fp16, last dim contiguous) -> QuantizedAct, equal to ref_quantize_act."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise MoteExportError(f"quantize_act wants a [M, K] tensor with contiguous rows, got {tuple(x.shape)}")
    m, k = x.shape
    xq = _out(out and out.xq, (m, k), torch.int8, x.device, "quantize_act")
    xs = _out(out and out.xs, (m,), torch.float32, x.device, "quantize_act")
    xsum = _out(out and out.xsum, (m,), torch.int32, x.device, "quantize_act")
    if m:  # training's per-token quantiser, with the row sums
        tt._launch(tt.act_quant_int8_kernel, "act_quant_int8", (m,), x, xq, xs, xsum, k, x.stride(0), xq.stride(0),
                   tt.EPS, WITH_SUM=True)
    return QuantizedAct(xq, xs, xsum)


def _check(a: QuantizedAct, w: PackedTernary, grouped: bool):
    m, k = a.xq.shape
    if k != w.k or w.words.dim() != (3 if grouped else 2) or w.words.shape[-1] != -(-k // CODES_PER_WORD):
        raise MoteExportError(f"W2A8: activations [{m}, {k}] do not match packed weights "
                              f"{tuple(w.words.shape)} of input width {w.k}")
    if a.xq.device != w.words.device:
        raise MoteExportError(f"W2A8: activations on {a.xq.device}, weights on {w.words.device}")


def pick_kernel(m: int) -> tuple[str, dict]:
    """(kernel, config) the dispatch uses for M tokens."""
    if m <= GEMV_MAX_M:
        bm = 1 if m <= 1 else 2 if m <= 2 else 4
        return "gemv", SHIPPED["gemv"][bm]
    return "gemm", SHIPPED["gemm"]["decode" if m <= DECODE_MAX_M else "prefill"]


def w2a8_linear(a: QuantizedAct, w: PackedTernary, out_dtype=torch.float32, out_int32: bool = False,
                kernel: str | None = None, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = xq . codes^T * xs * ws (or the int32 dot with out_int32). kernel/config override the
    dispatch (pick_kernel) for measurements and tests."""
    _check(a, w, grouped=False)
    m, k = a.xq.shape
    n = w.n
    out = _out(out, (m, n), torch.int32 if out_int32 else out_dtype, a.xq.device, "w2a8_linear")
    if m == 0 or n == 0:
        return out
    name, cfg = pick_kernel(m) if kernel is None else (kernel, config)
    if name not in ("gemv", "gemm"):
        raise MoteExportError(f"unknown W2A8 kernel {name!r}; accepted: gemv, gemm")
    tiles = _tiles(cfg)
    if name == "gemv" and m > tiles["BM"]:
        raise MoteExportError(f"W2A8 GEMV config BM={tiles['BM']} takes at most that many tokens, got {m}")
    kw = w.words.shape[-1]
    grid_mn = (triton.cdiv(n, tiles["BN"]),) if name == "gemv" else (triton.cdiv(m, tiles["BM"]),
                                                                      triton.cdiv(n, tiles["BN"]))
    n_tiles = grid_mn[0] * (grid_mn[-1] if len(grid_mn) > 1 else 1)
    tiles["SPLIT_K"] = split = split_k_for(cfg, n_tiles, kw, a.xq.device)
    part, lock = _workspace(a.xq.device, m * n if split > 1 else 0, n_tiles if split > 1 else 0)
    args = (a.xq, a.xsum, a.xs, w.words, w.scales, out, part, lock, m, n, k, kw, a.xq.stride(0), out.stride(0))
    kern = _gemv_kernel if name == "gemv" else _gemm_kernel
    kern[(*grid_mn, tiles["SPLIT_K"])](*args, **tiles, OUT_INT32=out_int32, **_launch_opts(cfg))
    return out


def w2a8_grouped(a: QuantizedAct, w: PackedTernary, offs: torch.Tensor, out_dtype=torch.float32,
                 out_int32: bool = False, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """All experts of a layer in one launch. a: tokens sorted by expert; w: words [E, N, KW], scales [E];
    offs int32 [E + 1]: expert e owns rows offs[e]:offs[e + 1] (offs[0] == 0, offs[E] == M; equal
    neighbours = an empty group). On CUDA offs is trusted (checking it would sync), as torch._grouped_mm does."""
    _check(a, w, grouped=True)
    m, k = a.xq.shape
    e, n, kw = w.words.shape
    if offs.dtype != torch.int32 or offs.shape != (e + 1,) or offs.device != a.xq.device:
        raise MoteExportError(f"w2a8_grouped wants offs int32 [{e + 1}] on {a.xq.device}, got {offs.dtype} "
                              f"{tuple(offs.shape)} on {offs.device}")
    if offs.device.type == "cpu" and (bool((offs.diff() < 0).any()) or int(offs[0]) != 0 or int(offs[-1]) != m):
        raise MoteExportError(f"w2a8_grouped: offs must rise from 0 to M = {m}, got {offs.tolist()}")
    out = _out(out, (m, n), torch.int32 if out_int32 else out_dtype, a.xq.device, "w2a8_grouped")
    if m == 0 or n == 0 or e == 0:
        return out
    cfg = config or SHIPPED["grouped"]["experts"]
    tiles = _tiles(cfg)
    grid = (triton.cdiv(m, tiles["BM"]) + e, triton.cdiv(n, tiles["BN"]))  # an upper bound on the tiles
    _grouped_kernel[grid](a.xq, a.xsum, a.xs, w.words, w.scales, offs, out, n, k, kw, e, a.xq.stride(0),
                          out.stride(0), w.words.stride(0), **tiles, OUT_INT32=out_int32, **_launch_opts(cfg))
    return out
