"""ONNX graphs built from numpy arrays, without torch: a small node builder, the one external-data file
every model of an export folder shares, and the ai.mote custom ops with their function bodies.

* `WeightFile`: every initializer of vision.onnx, embedding.onnx and decoder.onnx is appended to one
  file (`model.onnx.data`) as it is made, so an export holds about one tensor in memory; a tensor used
  by several models (the token embedding: embedding.onnx, the decoder's input_ids path, the tied head)
  is written once and referenced by each. Offsets are aligned (4 KiB, 64 KiB for tensors of 1 MiB and
  more) so onnxruntime can map large tensors.
* `Graph`: nodes with unique names, inline constants (deduplicated), external weights, inputs,
  outputs, and the ModelProto (opset 21, IR 10, plus the ai.mote domain).
* `ai.mote::TernaryMatMul(X, W, S) -> Y`: a routed-expert linear, Y = X @ (W * S) with int8
  per-token activations, W the int8 ternary codes [K, N] and S the fp32 matrix scale. Its definition
  ships in the model as a FunctionProto, so stock onnxruntime (and onnx.reference) run the body, and a
  runtime with its own kernel for the op may use that instead. The `exact` body is MoTE's forward:
    amax = max(ReduceMax(|X|, last axis), 1e-5);  q = Clip(Round(X * (Reciprocal(amax) * 127)), -128, 127)
    Y = float(MatMulInteger(uint8(q + 128), W, a_zero_point=128)) * (amax / 127) * S
  Round is half-to-even, as torch.round; the int32 sum of q * code is exact, so Y differs from
  mote_edge.quant's fake-quantized fp32 product only by fp32 rounding of that product.
* `ai.mote::TernaryMatMulNBits(X, B, S; K, N) -> Y`: the same product from 2-bit codes (the `fast`
  export): B uint8 [N, ceil(K / 128), 32] holds code t + 2 of each ternary weight t, 4 a byte along K,
  the first in the lowest bits (the last block padded with code 2 = 0); S [N * ceil(K / 128)] is the
  matrix scale in every block. Body: com.microsoft::MatMulNBits(bits 2, block_size 128,
  accuracy_level 4), onnxruntime's fast 2-bit kernel, which quantizes activations to int8 per block of
  128 along K (not per token as MoTE trains): close to the exact body, not equal. Only onnxruntime runs
  that body (onnx.reference has no com.microsoft ops).
* `quantize_nbits` / `gguf_to_nbits`: a float weight in GGUF's Q8_0 / Q4_0 numbers (gguf-py's quantizer)
  as com.microsoft::MatMulNBits' B and scales (bits 8 / 4, block 32, default zero points 128 / 8), for
  --shared-type / --other-type / --expert-type q8_0 | q4_0; `dequantize_nbits` is MatMulNBits' definition.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10
MOTE_DOMAIN = "ai.mote"
MOTE_OPSET = 1
MS_DOMAIN = "com.microsoft"
NBITS_BLOCK = 128
DATA_FILE = "model.onnx.data"
INLINE_MAX = 1024  # initializers below this many bytes stay inside the .onnx file
QB, EPS = 127.0, 1e-5  # mote_edge/quant.py


class WeightFile:
    """The one external-data file of an export folder, appended to tensor by tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.location = self.path.name
        self._f = open(self.path, "wb")
        self._offset = 0
        self._index: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}
        self.tensors = 0

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def nbytes(self) -> int:
        return self._offset

    def has(self, key: str) -> bool:
        return key in self._index

    def tensor(self, name: str, array: np.ndarray | None, key: str | None = None,
               make=None, shape: tuple[int, ...] | None = None) -> TensorProto:
        """A TensorProto `name` whose data lies in this file. `key` identifies the data: a second call
        with the same key references the bytes already written (array and make are then not used).
        Either `array` or `make()` gives the data. `shape` views the same bytes with other dims (same
        element count): one quantized embedding serves GatherBlockQuantized [V, H * bits / 8] and the
        tied head's MatMulNBits [V, H / 32, 32 * bits / 8]."""
        key = key or name
        if key not in self._index:
            a = np.ascontiguousarray(array if array is not None else make())
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            align = 65536 if a.nbytes >= 2 ** 20 else 4096
            pad = -self._offset % align
            if pad:
                self._f.write(b"\0" * pad)
                self._offset += pad
            self._f.write(a.tobytes())
            self._index[key] = (self._offset, a.nbytes, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            self._offset += a.nbytes
            self.tensors += 1
        offset, length, dtype, stored = self._index[key]
        if shape is not None and int(np.prod(shape)) != int(np.prod(stored)):
            raise ValueError(f"{name}: shape {shape} does not view the {stored} tensor {key!r}")
        t = TensorProto(name=name, data_type=dtype, dims=list(stored if shape is None else shape))
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        t.data_location = TensorProto.EXTERNAL
        return t


class Graph:
    """Nodes, initializers and value infos of one graph (or subgraph), with unique names."""

    def __init__(self, name: str, weights: WeightFile | None = None):
        self.name, self.weights = name, weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []  # types onnx's inference cannot derive (com.microsoft bodies)
        self._used = Counter()
        self._consts: dict[tuple, str] = {}
        self.scope = ""

    def fresh(self, hint: str) -> str:
        base = f"{self.scope}{hint}"
        self._used[base] += 1
        n = self._used[base]
        return base if n == 1 else f"{base}_{n - 1}"

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", hint: str | None = None,
           **attrs):
        """Add a node; returns its output name (or a tuple of names when outputs > 1)."""
        hint = hint or op_type
        names = outputs if isinstance(outputs, list) else [self.fresh(hint if outputs == 1 else f"{hint}.{i}")
                                                           for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(f"{hint}/node"),
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 else tuple(names)

    def const(self, value, dtype=np.float32) -> str:
        """An inline constant initializer (deduplicated by value)."""
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(a, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def weight(self, name: str, array: np.ndarray | None = None, key: str | None = None, make=None,
               shape: tuple[int, ...] | None = None) -> str:
        """A named initializer: in the external-data file when it has INLINE_MAX bytes or more (and the
        graph has a file), else inline. `key` names data already written (or to be shared); `shape`
        views shared data with other dims (WeightFile.tensor)."""
        if self.weights is not None and key is not None and self.weights.has(key):
            self.inits.append(self.weights.tensor(name, None, key=key, shape=shape))
            return name
        a = np.asarray(array if array is not None else make())
        if self.weights is not None and a.nbytes >= INLINE_MAX:
            self.inits.append(self.weights.tensor(name, a, key=key))
        else:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        if value != name:
            self.op("Identity", value, outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=self.inits,
                                 value_info=self.value_info)

    def model(self, functions: list[onnx.FunctionProto] = (), doc: str = "") -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", OPSET)]
        if any(f.domain == MOTE_DOMAIN for f in functions):
            opsets.append(helper.make_opsetid(MOTE_DOMAIN, MOTE_OPSET))
        if any(nd.domain == MS_DOMAIN for f in functions for nd in f.node) or _uses_domain(self.nodes, MS_DOMAIN):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        m = helper.make_model(self.graph(), opset_imports=opsets, functions=list(functions),
                              producer_name="mote-export", doc_string=doc)
        m.ir_version = IR_VERSION
        return m

    # ---- small composite helpers ----------------------------------------------------------------------------

    def linear(self, x: str, w: str, b: str | None = None, hint: str = "linear") -> str:
        y = self.op("MatMul", x, w, hint=hint)
        return self.op("Add", y, b, hint=f"{hint}.bias") if b else y

    def shape_dim(self, x: str, i: int) -> str:
        """Dimension i of x as an int64 scalar."""
        return self.op("Squeeze", self.op("Shape", x, start=i, end=i + 1, hint="dim"), self.ints(0), hint="dim")


def _uses_domain(nodes, domain: str) -> bool:
    """A node of `domain` among `nodes` or in their subgraphs (If branches)."""
    for nd in nodes:
        if nd.domain == domain:
            return True
        for a in nd.attribute:
            if a.type == onnx.AttributeProto.GRAPH and _uses_domain(a.g.node, domain):
                return True
            if any(_uses_domain(sg.node, domain) for sg in a.graphs):
                return True
    return False


def ternary_matmul_exact() -> onnx.FunctionProto:
    """ai.mote::TernaryMatMul, exact body (see the module docstring)."""
    n = []

    def node(op, ins, out, **attrs):
        n.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def cst(name, value, dtype=np.float32):
        return node("Constant", [], name, value=numpy_helper.from_array(np.asarray(value, dtype=dtype), name))

    axes = cst("axes", [-1], np.int64)
    absx = node("Abs", ["X"], "absx")
    amax0 = node("ReduceMax", [absx, axes], "amax0", keepdims=1)
    amax = node("Max", [amax0, cst("eps", EPS)], "amax")
    qb = cst("qb", QB)
    # torch: x * (QB / amax), which torch evaluates as amax.reciprocal() * QB (two roundings)
    inv = node("Mul", [node("Reciprocal", [amax], "rcp"), qb], "inv_scale")
    r = node("Round", [node("Mul", ["X", inv], "xs")], "r")
    c = node("Clip", [r, cst("lo", -QB - 1), cst("hi", QB)], "c")
    u = node("Cast", [node("Add", [c, cst("off", 128.0)], "cu")], "xu8", to=TensorProto.UINT8)
    acc = node("MatMulInteger", [u, "W", cst("zp", 128, np.uint8)], "acc")
    accf = node("Cast", [acc], "accf", to=TensorProto.FLOAT)
    deq = node("Div", [amax, qb], "deq")  # torch: * (amax / QB)
    node("Mul", [node("Mul", [accf, deq], "y0"), "S"], "Y")
    return helper.make_function(MOTE_DOMAIN, "TernaryMatMul", ["X", "W", "S"], ["Y"], n,
                                [helper.make_opsetid("", OPSET)],
                                doc_string="Y = X @ (W * S): int8 per-token activations (absmax / 127, round half "
                                           "to even, clip -128..127), int8 ternary codes W [K, N], fp32 matrix scale "
                                           "S; MatMulInteger u8 x s8 (exact body)")


def ternary_matmul_nbits() -> onnx.FunctionProto:
    """ai.mote::TernaryMatMulNBits, fast body (see the module docstring); K and N are attributes."""
    node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain=MS_DOMAIN, bits=2,
                            block_size=NBITS_BLOCK, accuracy_level=4)
    for name in ("K", "N"):
        a = onnx.AttributeProto(name=name, ref_attr_name=name, type=onnx.AttributeProto.INT)
        node.attribute.append(a)
    return helper.make_function(MOTE_DOMAIN, "TernaryMatMulNBits", ["X", "B", "S"], ["Y"], [node],
                                [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                                attributes=["K", "N"],
                                doc_string="Y = X @ (codes * S) from 2-bit codes t + 2 (zero point 2), blocks of "
                                           "128 along K; body com.microsoft::MatMulNBits, accuracy_level 4 (fast)")


def pack_nbits2(codes_nk: np.ndarray, scale: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Ternary codes [N, K] (int8, -1/0/1) -> (B uint8 [N, ceil(K/128), 32], scales float32 [N * blocks])."""
    n, k = codes_nk.shape
    blocks = -(-k // NBITS_BLOCK)
    q = np.full((n, blocks * NBITS_BLOCK), 2, np.uint8)
    q[:, :k] = (codes_nk.astype(np.int16) + 2).astype(np.uint8)
    q = q.reshape(n, blocks, NBITS_BLOCK // 4, 4)
    packed = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)
    return np.ascontiguousarray(packed), np.full(n * blocks, scale, np.float32)


def unpack_nbits2(packed: np.ndarray, k: int) -> np.ndarray:
    """The inverse of pack_nbits2's codes: [N, blocks, 32] uint8 -> int8 codes [N, K]."""
    q = np.stack([(packed >> np.uint8(2 * j)) & np.uint8(3) for j in range(4)], axis=-1)
    return (q.reshape(packed.shape[0], -1)[:, :k].astype(np.int16) - 2).astype(np.int8)


# ---- full-precision weights in GGUF's Q8_0 / Q4_0 numbers (--shared-type / --other-type / --expert-type) -------

GGUF_BLOCK = 32  # Q8_0 and Q4_0: 32 weights, one f16 scale d
NBITS_TYPES = {"q8_0": 8, "q4_0": 4}  # MatMulNBits bits; default zero point 2^(bits-1): 128 and 8
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


def gguf_to_nbits(raw: np.ndarray, qtype: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0 / Q4_0 rows (uint8 [N, K / 32 * block bytes], as exporters/quantize.py writes them) ->
    MatMulNBits (B uint8 [N, K / 32, 32 * bits / 8], scales float32 [N, K / 32]): the same numbers.
      Q8_0  d * q, q int8           -> byte q + 128, zero point 128: (q + 128 - 128) * d
      Q4_0  d * (q - 8), q 0..15    -> the same nibble, zero point 8; GGUF packs element j with j + 16 in a
                                       byte, MatMulNBits elements 2j and 2j + 1 (first in the low bits)
    d (f16) widens to float32 exactly."""
    n, blocks = raw.shape[0], k // GGUF_BLOCK
    blk = np.ascontiguousarray(raw).reshape(n, blocks, _BLOCK_BYTES[qtype])
    scales = np.ascontiguousarray(blk[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    qs = blk[..., 2:]
    if qtype == "q8_0":
        return (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8), scales
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)  # [N, blocks, 32], element order
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << np.uint8(4))), scales


def quantize_nbits(w_nk: np.ndarray, qtype: str, name: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """A float weight [N, K] (K a multiple of 32) -> MatMulNBits (B, scales) holding GGUF's Q8_0 / Q4_0 numbers,
    quantized by gguf-py's quantizer (exporters/quantize.py), so a GGUF export of the same checkpoint
    dequantizes to the same float32 weights, bit for bit."""
    from gguf import GGMLQuantizationType

    from .quantize import quantize_tensor

    raw = quantize_tensor(np.asarray(w_nk, np.float32), GGMLQuantizationType[qtype.upper()], name)
    return gguf_to_nbits(raw, qtype, w_nk.shape[1])


def dequantize_nbits(b: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' weights as it defines them, (q - 2^(bits-1)) * scale, float32 [N, K] (tests, checks)."""
    n = b.shape[0]
    if bits == 8:
        q = b.reshape(n, -1, GGUF_BLOCK).astype(np.int16)
    else:
        q = np.stack([b & np.uint8(15), b >> np.uint8(4)], axis=-1).reshape(n, -1, GGUF_BLOCK).astype(np.int16)
    zero = np.float32(1 << (bits - 1))
    return ((q.astype(np.float32) - zero) * scales.reshape(n, -1, 1).astype(np.float32)).reshape(n, -1)[:, :k]


RUNTIME_DOMAINS = ("", "ai.onnx", MS_DOMAIN)  # op sets runtimes implement (com.microsoft: onnxruntime's)


def graph_nodes(g: onnx.GraphProto):
    """Every node of a graph, those of its subgraphs (If / Loop branches) included, depth first."""
    for nd in g.node:
        yield nd
        for a in nd.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from graph_nodes(a.g)
            for sg in a.graphs:
                yield from graph_nodes(sg)


def functions_used(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """(domain, op_type) of every custom-domain node in the model (not an ONNX or onnxruntime op), subgraphs
    and function bodies included: each must have its FunctionProto in model.functions."""
    nodes = [*graph_nodes(model.graph), *(nd for fn in model.functions for nd in fn.node)]
    return {(nd.domain, nd.op_type) for nd in nodes if nd.domain not in RUNTIME_DOMAINS}


def loaded_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers as onnxruntime holds them once loaded: an fp16 weight that feeds a
    Cast to float is folded into an fp32 copy (twice its bytes), and kept as well if another node reads it
    (the fp16 embedding rows); everything else as stored. The engine's memory plan counts this."""
    consumers: dict[str, list] = {}
    for nd in graph_nodes(model.graph):
        for name in nd.input:
            consumers.setdefault(name, []).append(nd)
    total = 0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        uses = consumers.get(t.name, [])
        widened = [nd for nd in uses if nd.op_type == "Cast" and t.data_type == TensorProto.FLOAT16]
        total += 2 * size * bool(widened) + size * (len(widened) < len(uses) or not uses)
    return total


def save_model(model: onnx.ModelProto, path: Path) -> int:
    """Serialize (the weights are already in the external-data file); returns the bytes written."""
    data = model.SerializeToString()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return len(data)
