"""Weight-only quantization of a GPT-2 graph: SCHEMES = int8 (per-channel) and int4 (block-wise MatMulNBits).

Only MatMuls whose B is a weight are quantized; attention's two activation-by-activation
MatMuls (QK^T and softmax x V) stay float. GPT-2's Conv1D layers may arrive as Gemm
nodes, which onnxruntime's quantizers skip, so Gemm is rewritten as MatMul + Add first.
The tied embedding / lm_head matrix is quantized once, in blocks of the scheme's width
(8 or 4 bits), and read by both ends (see _tied_blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dialogpt_edge.runtime.errors import UserError

from .builder import LM_HEAD_PARTS, MS_DOMAIN, row_view, set_token_table, token_table, view_base

QUANTIZED_OPS = ("DynamicQuantizeMatMul", "MatMulNBits")


class QuantizationError(UserError):
    pass


@dataclass
class QuantReport:
    scheme: str
    quantized_matmuls: int
    expected_matmuls: int
    embedding: str
    block_size: int | None = None
    accuracy_level: int | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "scheme": self.scheme,
            "quantized_matmuls": self.quantized_matmuls,
            "expected_matmuls": self.expected_matmuls,
            "embedding": self.embedding,
        }
        if self.block_size is not None:
            out["block_size"] = self.block_size
            out["accuracy_level"] = self.accuracy_level
        return out


class _Graph:
    """Index over one onnx graph: initializers by name, producer and consumers of each value."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def add_init(self, array: np.ndarray, name: str) -> str:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def add_view(self, base: str, start: int, stop: int, name: str) -> str:
        """Rows [start, stop) of initializer `base`, stored once in the saved file (builder.row_view)."""
        self.graph.initializer.append(row_view(self.inits[base], start, stop, name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def drop_unused_initializers(self) -> None:
        """Keeps the token table too: no node reads it, the runtime does (builder.TOKEN_TABLE)."""
        table = token_table(self.model)
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        used |= {table["rows"], table["scales"]}
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)

    def replace(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        """Put `new_nodes` where `node` was, keeping the node list topologically sorted."""
        nodes = list(self.graph.node)
        key = tuple(node.output)  # outputs are unique in SSA form; message identity is not stable
        at = next(i for i, n in enumerate(nodes) if tuple(n.output) == key)
        nodes[at : at + 1] = new_nodes
        del self.graph.node[:]
        self.graph.node.extend(nodes)


def _ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def gemm_to_matmul(g: _Graph) -> int:
    """Rewrite each Gemm with a weight B as MatMul (+ Add of its bias)."""
    count = 0
    for node in [n for n in g.graph.node if n.op_type == "Gemm"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        if len(node.input) < 2 or node.input[1] not in g.inits:
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            weight = g.add_init(np.ascontiguousarray(g.array(weight).T), weight + "_t")
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=node.name + "_MatMul")]
        if has_bias:
            new.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_Bias"))
        g.replace(node, new)
        count += 1
    return count


@dataclass
class _Tied:
    lm_head: onnx.NodeProto  # MatMul(hidden, Transpose(E))
    transpose: onnx.NodeProto
    embedding: str  # E: (vocab, n_embd), the token table the runtime reads rows of


def _find_tied(g: _Graph) -> _Tied | None:
    """GPT-2's tied lm_head reads the token table (builder.TOKEN_TABLE) through a Transpose."""
    table = token_table(g.model)["rows"]
    for node in g.graph.node:
        if node.op_type != "MatMul":
            continue
        t = g.producer.get(node.input[1])
        if t is not None and t.op_type == "Transpose" and t.input[0] == table and len(g.consumers[table]) == 1:
            return _Tied(lm_head=node, transpose=t, embedding=table)
    return None


def _weight_matmuls(g: _Graph) -> list[onnx.NodeProto]:
    return [
        n for n in g.graph.node
        if n.op_type == "MatMul" and n.input[1] in g.inits and len(g.inits[n.input[1]].dims) == 2
        and g.inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
    ]


def _take_bias(g: _Graph, node: onnx.NodeProto, n: int) -> tuple[str, str]:
    """If the matmul's only consumer adds an (n,) bias initializer, drop that Add: the quantized op adds it.

    Returns (bias name or "", the output name the quantized op must write).
    """
    users = g.consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in {o.name for o in g.graph.output}:
        add = users[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        init = g.inits.get(other)
        if init is not None and list(init.dims) == [n] and init.data_type == onnx.TensorProto.FLOAT:
            g.replace(add, [])
            return other, add.output[0]
    return "", node.output[0]


# ---- int8: per-output-channel symmetric weights, activations quantized on the fly ----------


def _symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """w -> int8 values in [-127, 127] and a float32 scale per slice along `axis` (the slice's absmax / 127)."""
    scale = np.abs(w).max(axis=axis, keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axis=axis)


def _int8_matmul(g: _Graph, node: onnx.NodeProto, w: np.ndarray, stem: str) -> None:
    q, scale = _symmetric_int8(w, axis=0)  # w (K, N): a scale per output column
    qname, sname = g.add_init(q, stem + "_int8"), g.add_init(scale, stem + "_scale")
    bias, out = _take_bias(g, node, w.shape[1])
    inputs = [node.input[0], qname, sname] + (["", bias] if bias else [])
    g.replace(node, [helper.make_node("DynamicQuantizeMatMul", inputs, [out], name=node.name + "_int8", domain=MS_DOMAIN)])


def quantize_int8(g: _Graph, tied: _Tied | None, *, block_size: int, accuracy_level: int) -> QuantReport:
    for node in _weight_matmuls(g):
        _int8_matmul(g, node, g.array(node.input[1]), node.input[1])
    embedding = "fp32 (untied)"
    if tied is not None:
        _tied_blocks(g, tied, 8, block_size, accuracy_level)
        embedding = f"int8 in blocks of {block_size}, shared with lm_head"
    return QuantReport("int8", 0, 0, embedding, block_size=block_size if tied else None,
                       accuracy_level=accuracy_level if tied else None)


# ---- int4: block-wise MatMulNBits, int8 compute (accuracy_level 4) ---------------------------


BLOCK_SIZES = (16, 32, 64, 128, 256)
# 256 only when asked for: it decoded the DialoGPT-small / medium shapes' int4 10-12 % faster than 128
# on an AMD Zen 5, but what one scale per 256 weights costs on trained DialoGPT weights is not measured
# here (the shipped 320-wide model, partly padded: perplexity +2.75 % against +2.69 % at 128)
WIDEST_DEFAULT_BLOCK = 128


def default_block_size(n_embd: int) -> int:
    """The widest default block that divides the model width (so no block is padding): 128 for every DialoGPT size.

    Wider blocks decode faster (fewer scales per weight; measured on the DialoGPT-small shape:
    block 32 4.79, 64 3.92, 128 3.14 ms/token) at a small fidelity cost (see the README).
    """
    defaults = [b for b in BLOCK_SIZES if b <= WIDEST_DEFAULT_BLOCK]
    return next((b for b in reversed(defaults) if n_embd % b == 0), WIDEST_DEFAULT_BLOCK)


def pack_int4_blocks(w_nk: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """w (N, K) -> MatMulNBits' B (N, ceil(K/bs), bs/2) uint8 and scales (N, ceil(K/bs)); symmetric, zero point 8.

    A K that the block size does not divide is padded with zeros, as MatMulNBits expects.
    """
    blocks = _blocks(w_nk, block_size)
    absmax = np.abs(blocks).max(axis=-1)
    # map the largest magnitude to -8 when it is negative, to use the full [-8, 7] range
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scale = np.where(signed_max < 0, absmax / 8.0, absmax / 7.0)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = (np.clip(np.rint(blocks / scale[..., None]), -8, 7) + 8).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale


def pack_int8_blocks(w_nk: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """w (N, K) -> MatMulNBits' 8-bit B (N, ceil(K/bs), bs) uint8 and scales (N, ceil(K/bs)); symmetric, zero point 128."""
    q, scale = _symmetric_int8(_blocks(w_nk, block_size), axis=-1)
    return (q.astype(np.int16) + 128).astype(np.uint8), scale


def _blocks(w_nk: np.ndarray, block_size: int) -> np.ndarray:
    n, k = w_nk.shape
    pad = -k % block_size
    if pad:
        w_nk = np.concatenate([w_nk, np.zeros((n, pad), w_nk.dtype)], axis=1)
    return w_nk.reshape(n, (k + pad) // block_size, block_size)


def _int4_matmul(g: _Graph, node: onnx.NodeProto, w_kn: np.ndarray, stem: str, block_size: int, accuracy_level: int):
    k, n = w_kn.shape
    packed, scale = pack_int4_blocks(np.ascontiguousarray(w_kn.T), block_size)
    bname, sname = g.add_init(packed, stem + "_int4"), g.add_init(scale, stem + "_scales")
    bias, out = _take_bias(g, node, n)
    inputs = [node.input[0], bname, sname] + (["", "", bias] if bias else [])
    g.replace(node, [_matmul_nbits(inputs, out, node.name + "_int4", k, n, 4, block_size, accuracy_level)])


def _matmul_nbits(inputs: list[str], out: str, name: str, k: int, n: int, bits: int, block_size: int, accuracy_level: int):
    return helper.make_node("MatMulNBits", inputs, [out], name=name, domain=MS_DOMAIN,
                            K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)




def _tied_blocks(g: _Graph, tied: _Tied, bits: int, block_size: int, accuracy_level: int) -> None:
    """Quantize E (vocab, n_embd) once in MatMulNBits' row-major blocks: the lm_head's B and the token table.

    The runtime reads token rows from these bytes (builder.TOKEN_TABLE); the lm_head multiplies
    by LM_HEAD_PARTS row views of them and concatenates the logits (why: builder.LM_HEAD_PARTS).
    """
    e = g.array(tied.embedding)  # (vocab, n_embd): already MatMulNBits' transposed layout
    vocab, n_embd = e.shape
    packed, scale = (pack_int8_blocks if bits == 8 else pack_int4_blocks)(e, block_size)
    stem = f"{tied.embedding}_lm_head_int{bits}"
    bname, sname = g.add_init(packed, stem), g.add_init(scale, stem + "_scales")
    bounds = np.linspace(0, vocab, min(LM_HEAD_PARTS, vocab) + 1).astype(int)
    parts, logits = [], tied.lm_head.output[0]
    for j, (start, stop) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        rows = [g.add_view(name, start, stop, f"{name}.rows{start}-{stop}") for name in (bname, sname)]
        parts.append(_matmul_nbits([tied.lm_head.input[0], *rows], f"{logits}.part{j}", f"lm_head_int{bits}_part{j}",
                                   n_embd, stop - start, bits, block_size, accuracy_level))
    parts.append(helper.make_node("Concat", [p.output[0] for p in parts], [logits], axis=-1, name="lm_head_concat"))
    g.replace(tied.lm_head, parts)

    set_token_table(g.model, rows=bname, scales=sname, bits=bits, block_size=block_size)
    g.replace(tied.transpose, [])


def quantize_int4(g: _Graph, tied: _Tied | None, *, block_size: int, accuracy_level: int) -> QuantReport:
    for node in _weight_matmuls(g):
        _int4_matmul(g, node, g.array(node.input[1]), node.input[1], block_size, accuracy_level)
    embedding = "fp32 (untied)"
    if tied is not None:
        _tied_blocks(g, tied, 4, block_size, accuracy_level)
        embedding = "int4, shared with lm_head"
    return QuantReport("int4", 0, 0, embedding, block_size=block_size, accuracy_level=accuracy_level)


SCHEMES: dict[str, Callable[..., QuantReport] | None] = {"none": None, "int8": quantize_int8, "int4": quantize_int4}


def quantize(model: onnx.ModelProto, scheme: str, *, n_layer: int, block_size: int = 32, accuracy_level: int = 4) -> QuantReport:
    """Quantize in place. Every weight matrix (4 per block + lm_head) must end up quantized, or this raises."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r} (choose one of: {', '.join(SCHEMES)})")
    if SCHEMES[scheme] is None:
        raise ValueError("nothing to quantize for scheme 'none'")
    g = _Graph(model)
    gemms = gemm_to_matmul(g)
    g = _Graph(model)
    tied = _find_tied(g)
    _ensure_ms_opset(model)
    report = SCHEMES[scheme](g, tied, block_size=block_size, accuracy_level=accuracy_level)
    g.drop_unused_initializers()
    report.expected_matmuls = 4 * n_layer + 1
    report.quantized_matmuls = count_quantized(model)
    report.details["gemm_rewritten"] = gemms
    left = [n.name for n in _weight_matmuls(_Graph(model))] + [n.name for n in model.graph.node if n.op_type == "Gemm"]
    if report.quantized_matmuls != report.expected_matmuls or left:
        raise QuantizationError(
            f"{scheme}: quantized {report.quantized_matmuls} weight matrices, expected {report.expected_matmuls} "
            f"(4 per layer + lm_head); still float: {left[:4]} (the graph is not the GPT-2 shape this exporter knows)"
        )
    return report


def count_quantized(model: onnx.ModelProto) -> int:
    """Weight matrices the graph reads quantized: the lm_head's parts, views of one matrix, count once."""
    inits = {i.name: i for i in model.graph.initializer}
    return len({view_base(inits[n.input[1]]) or n.input[1] for n in model.graph.node if n.op_type in QUANTIZED_OPS})
