"""build_gpt2(): a GPT-2 decoder graph written straight from the weights, fused for onnxruntime's CPU provider.

Why not optimum's export: its graph leaves attention unfused (~730 small nodes per step)
and concatenates the whole KV cache every step. This graph has one GroupQueryAttention
per layer (kv_num_heads = num_heads, no rotary: plain causal multi-head attention) reading
and writing a preallocated cache buffer in place, one Sum + LayerNormalization for every
residual add + LayerNorm, FastGelu with its bias, and the lm_head applied only to the
last `logits_to_keep` positions. The optimum export stays the reference it is checked
against (tests/test_parity.py).

Graph contract (GRAPH_LAYOUT):
  inputs   inputs_embeds float32 (batch, seq, n_embd): the token embedding's rows, looked up by the
           runtime (runtime/embedding.py) in the table the graph's TOKEN_TABLE metadata names,
           position_ids int64 (batch, seq),
           seqlens_k int32 (batch,) = positions held after this run - 1,
           total_sequence_length int32 scalar = seqlens_k.max() + 1,
           logits_to_keep int64 scalar (1 when decoding, seq for every position),
           past_key_values.{i}.key/value (batch, n_head, capacity, head_dim) in the cache dtype
           (fp32, fp16, or int8 with fixed per-channel scales stored in the graph)
  outputs  logits float32 (batch, logits_to_keep, vocab),
           present.{i}.key/value: the past buffers with this run's positions written in;
           bind each to its past buffer and the cache never moves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dialogpt_edge.runtime.errors import UserError

GRAPH_LAYOUT = "gqa-inplace-v2"  # v2: the token embedding is looked up outside the graph
# metadata key: JSON {"rows": initializer, "scales": initializer or null, "bits": 32 / 8 / 4, "block_size": int or null}
TOKEN_TABLE = "dialogpt_edge.token_table"
MS_DOMAIN = "com.microsoft"
OPSET = 17
CACHE_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "int8": TensorProto.INT8}


def default_cache_dtype(quantize: str) -> str:
    """int8 for quantized weights: a quarter of the fp32 cache's bytes per step, read through
    onnxruntime's fused dequantizing attention kernels, and decoding is faster than with fp16 at
    every context measured (benchmarks/results/experiments.md) for a fidelity cost within noise.
    fp32 weights keep an fp32 cache, so their greedy ids stay exactly PyTorch's."""
    return "fp32" if quantize == "none" else "int8"


# HF activation name -> how this graph computes it (FastGelu is the tanh approximation)
_ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu_fast": "FastGelu", "gelu": "BiasGelu"}


class UnsupportedConfig(UserError):
    pass


def check_config(config) -> None:
    """Refuse GPT-2 variants this graph would compute differently from transformers."""
    act = getattr(config, "activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise UnsupportedConfig(f"activation_function {act!r} is not supported (DialoGPT uses gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(config, flag, False):
            raise UnsupportedConfig(f"GPT-2 configs with {flag}=true are not supported (DialoGPT has it false)")
    if not getattr(config, "scale_attn_weights", True):
        raise UnsupportedConfig("GPT-2 configs with scale_attn_weights=false are not supported (DialoGPT has it true)")
    if config.n_embd % config.n_head:
        raise UnsupportedConfig(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head} (check config.json)")
    if (config.n_embd // config.n_head) % 8:
        raise UnsupportedConfig(
            f"a head size of {config.n_embd // config.n_head} (n_embd {config.n_embd} / n_head {config.n_head}) is not "
            "supported: onnxruntime's GroupQueryAttention on CPU needs a multiple of 8 (DialoGPT's is 64)"
        )


class _Builder:
    """Writes straight into the ModelProto it returns: onnx.helper's make_graph / make_model copy every
    initializer they are given, which held three copies of DialoGPT-large's fp32 weights (9 GB) at once."""

    def __init__(self):
        self.model = onnx.ModelProto()
        self.nodes: list[onnx.NodeProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def build_gpt2(weights: Mapping[str, np.ndarray], config, *, cache_dtype: str = "fp32",
               kv_scales: list[tuple[np.ndarray, np.ndarray]] | None = None) -> onnx.ModelProto:
    """weights: a GPT2LMHeadModel state dict as numpy arrays (names as transformers saves them).

    cache_dtype is a key of CACHE_DTYPES (export_model checks the user's choice before any work).
    An int8 cache needs kv_scales: per layer, the (n_embd,) key and value scales (one per head
    channel; a cached value is int8 * scale), from export/kv_scales.py.
    """
    check_config(config)
    if cache_dtype == "int8" and (kv_scales is None or len(kv_scales) != config.n_layer):
        raise ValueError("an int8 KV cache needs (key, value) scales for every layer")
    w = {k.removeprefix("transformer."): np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    if not getattr(config, "tie_word_embeddings", True) and "lm_head.weight" not in w:
        raise UnsupportedConfig("the checkpoint unties the lm_head from the embedding but has no lm_head.weight")
    n_layer, n_head, n_embd = config.n_layer, config.n_head, config.n_embd
    head_dim = n_embd // n_head
    eps = float(config.layer_norm_epsilon)
    cache_onnx = CACHE_DTYPES[cache_dtype]
    activation = _ACTIVATIONS[getattr(config, "activation_function", "gelu_new")]
    b = _Builder()

    # Token + position embeddings, added inside the first LayerNorm. The token rows come in as
    # inputs_embeds: a lookup inside the graph reads the memory-mapped table, and every lookup maps a
    # whole page-cache folio (up to 2 MiB), so diverse ids left most of the table resident (DialoGPT-small
    # int8: peak RSS 236 MiB against 201 for one repeated id). The runtime reads its rows with pread.
    b.init("wte", w["wte.weight"])
    set_token_table(b.model, rows="wte", scales=None, bits=32, block_size=None)
    b.init("wpe", w["wpe.weight"])
    b.node("Gather", ["wpe", "position_ids"], ["pos_emb"], "embed_positions")
    x, residual = _skip_ln(b, "inputs_embeds", "pos_emb", w, "h.0.ln_1", eps, "layer0_ln_1")

    for i in range(n_layer):
        p = f"h.{i}"
        qkv = _linear(b, x, w, f"{p}.attn.c_attn", f"layer{i}_qkv")
        if cache_dtype == "fp16":
            qkv = b.node("Cast", [qkv], [f"{p}.qkv_half"], f"layer{i}_qkv_half", to=cache_onnx)[0]
        attn_inputs = [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length"]
        quant = {}
        if cache_dtype == "int8":
            # activations stay fp32; the op quantizes each new key / value on write and reads the
            # cache through fused dequantizing kernels (inputs 12 and 13 are its scales)
            b.init(f"{p}.attn.k_cache_scale", kv_scales[i][0])
            b.init(f"{p}.attn.v_cache_scale", kv_scales[i][1])
            attn_inputs += [""] * 5 + [f"{p}.attn.k_cache_scale", f"{p}.attn.v_cache_scale"]
            quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        attn = b.node(
            "GroupQueryAttention", attn_inputs,
            [f"{p}.attn_out", f"present.{i}.key", f"present.{i}.value"],
            f"layer{i}_attention", MS_DOMAIN, num_heads=n_head, kv_num_heads=n_head, scale=float(head_dim**-0.5), **quant,
        )[0]
        if cache_dtype == "fp16":
            attn = b.node("Cast", [attn], [f"{p}.attn_out_float"], f"layer{i}_attn_float", to=TensorProto.FLOAT)[0]
        proj = _matmul(b, attn, w, f"{p}.attn.c_proj", f"layer{i}_attn_proj")
        x, residual = _skip_ln(b, proj, residual, w, f"{p}.ln_2", eps, f"layer{i}_ln_2", bias=f"{p}.attn.c_proj.bias")

        fc = _matmul(b, x, w, f"{p}.mlp.c_fc", f"layer{i}_fc")
        b.init(f"{p}.mlp.c_fc.bias", w[f"{p}.mlp.c_fc.bias"])
        act = b.node(activation, [fc, f"{p}.mlp.c_fc.bias"], [f"{p}.act"], f"layer{i}_gelu", MS_DOMAIN)[0]
        down = _matmul(b, act, w, f"{p}.mlp.c_proj", f"layer{i}_mlp_proj")
        last = i == n_layer - 1
        x, residual = _skip_ln(b, down, residual, w, "ln_f" if last else f"h.{i + 1}.ln_1", eps,
                               "final_ln" if last else f"layer{i + 1}_ln_1", bias=f"{p}.mlp.c_proj.bias")

    # only the positions whose logits are wanted go through the (vocab-wide) lm_head
    b.init("int64_max", np.array([2**62], np.int64))
    b.init("seq_axis", np.array([1], np.int64))
    b.node("Neg", ["logits_to_keep"], ["keep_neg"], "keep_neg")
    b.node("Reshape", ["keep_neg", "seq_axis"], ["keep_start"], "keep_start")  # seq_axis doubles as shape [1]
    b.node("Slice", [x, "keep_start", "int64_max", "seq_axis"], ["hidden_kept"], "keep_last")
    if getattr(config, "tie_word_embeddings", True):
        # the tied lm_head reads the embedding through a Transpose, so the quantizer finds one matrix for both ends
        b.node("Transpose", ["wte"], ["wte_t"], "lm_head_weight", perm=[1, 0])
        b.node("MatMul", ["hidden_kept", "wte_t"], ["logits"], "lm_head")
    else:
        b.init("lm_head.weight_t", w["lm_head.weight"].T)
        b.node("MatMul", ["hidden_kept", "lm_head.weight_t"], ["logits"], "lm_head")

    batch, seq, cap = "batch", "sequence", "capacity"
    cache_shape = [batch, n_head, cap, head_dim]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [batch, seq, n_embd]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, seq]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [batch]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, "kept", config.vocab_size])]
    for i in range(n_layer):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", cache_onnx, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", cache_onnx, cache_shape))
    model = b.model
    model.graph.name = "dialogpt_edge_gpt2"
    model.graph.node.extend(b.nodes)
    model.graph.input.extend(inputs)
    model.graph.output.extend(outputs)
    model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.producer_name, model.ir_version = "dialogpt-edge", 9
    model.metadata_props.add(key="dialogpt_edge.layout", value=GRAPH_LAYOUT)
    return model


# The tied lm_head runs as this many matmuls over consecutive vocab rows, each reading its own view
# of the token table's bytes (row_view). onnxruntime packs a matmul's weights while the file's copy
# of them is mapped and lets that copy go once packed, so over the whole table both copies were
# resident at once; over a quarter, a quarter. DialoGPT-small, load peak RSS: int8 227 -> 201 MiB
# (8 parts: 201), fp32 682 -> 572; decode time unchanged, fp32 logits bit-identical
# (benchmarks/results/experiments.md). The quantizer splits its own (quantize._tied_blocks).
LM_HEAD_PARTS = 4


def split_tied_lm_head(model: onnx.ModelProto) -> bool:
    """For a graph whose lm_head stays fp32: MatMul(x, Transpose(E)) becomes LM_HEAD_PARTS MatMuls over
    row views of E, their logits concatenated. False (nothing done) for an untied lm_head.

    Apply it to graphs that are not quantized afterwards: the quantizer looks for the single MatMul.
    """
    nodes = list(model.graph.node)
    table = token_table(model)["rows"]
    producer = {o: n for n in nodes for o in n.output}
    lm_head = next((n for n in nodes if n.op_type == "MatMul" and (t := producer.get(n.input[1])) is not None
                    and t.op_type == "Transpose" and t.input[0] == table), None)
    if lm_head is None:
        return False
    base = next(i for i in model.graph.initializer if i.name == table)
    bounds = np.linspace(0, base.dims[0], min(LM_HEAD_PARTS, base.dims[0]) + 1).astype(int).tolist()
    parts, logits = [], []
    for j, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        view = row_view(base, start, stop, f"{table}.rows{start}-{stop}")
        model.graph.initializer.append(view)
        logits.append(f"{lm_head.output[0]}.part{j}")
        parts += [helper.make_node("Transpose", [view.name], [view.name + "_t"], name=f"lm_head_weight_part{j}", perm=[1, 0]),
                  helper.make_node("MatMul", [lm_head.input[0], view.name + "_t"], [logits[-1]], name=f"lm_head_part{j}")]
    parts.append(helper.make_node("Concat", logits, [lm_head.output[0]], name="lm_head_concat", axis=-1))
    at = nodes.index(lm_head)
    nodes[at : at + 1] = parts
    nodes.remove(producer[lm_head.input[1]])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return True


def token_table(model: onnx.ModelProto) -> dict:
    """The graph's TOKEN_TABLE record: which initializers hold the token embedding the runtime reads."""
    value = next((p.value for p in model.metadata_props if p.key == TOKEN_TABLE), None)
    if value is None:
        raise ValueError(f"the graph has no {TOKEN_TABLE} metadata (not built by build_gpt2)")
    return json.loads(value)


def set_token_table(model: onnx.ModelProto, *, rows: str, scales: str | None, bits: int, block_size: int | None) -> None:
    """Record (or replace) where the token embedding is: rows, their block scales (quantized tables), bits per value."""
    props = [p for p in model.metadata_props if p.key != TOKEN_TABLE]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=TOKEN_TABLE, value=json.dumps({"rows": rows, "scales": scales, "bits": bits, "block_size": block_size}))


def _matmul(b: _Builder, x: str, w: dict, stem: str, name: str) -> str:
    """x @ W (GPT-2's Conv1D stores W as (in, out), MatMul's layout); the bias is left to the caller."""
    b.init(f"{stem}.weight", w[f"{stem}.weight"])
    return b.node("MatMul", [x, f"{stem}.weight"], [f"{stem}.out"], name)[0]


def _linear(b: _Builder, x: str, w: dict, stem: str, name: str) -> str:
    """x @ W + bias; the quantizer folds the Add into its matmul's bias input."""
    mm = _matmul(b, x, w, stem, name)
    b.init(f"{stem}.bias", w[f"{stem}.bias"])
    return b.node("Add", [mm, f"{stem}.bias"], [f"{stem}.biased"], name + "_bias")[0]


def _skip_ln(b: _Builder, x: str, skip: str, w: dict, ln: str, eps: float, name: str,
             bias: str | None = None) -> tuple[str, str]:
    """LayerNorm(x + skip [+ bias]); also returns x + skip + bias, the next residual.

    A Sum and a LayerNormalization rather than onnxruntime's fused SkipLayerNormalization: on one
    row the fused kernel costs about 7 us a call where the two cost about 3 (chains of 24, width
    1,024, warm). In whole DialoGPT-small decode steps that is at most a few per cent, within this
    machine's noise (benchmarks/results/experiments.md), and no loss. A Sum, unlike an Add, is
    not fused back into SkipLayerNormalization by onnxruntime's optimizer when the session loads.
    """
    b.init(f"{ln}.weight", w[f"{ln}.weight"])
    b.init(f"{ln}.bias", w[f"{ln}.bias"])
    terms = [x, skip]
    if bias is not None:
        b.init(bias, w[bias])
        terms.append(bias)
    total = b.node("Sum", terms, [f"{name}.sum"], f"{name}_residual")[0]
    out = b.node("LayerNormalization", [total, f"{ln}.weight", f"{ln}.bias"], [f"{name}.out"], name, axis=-1, epsilon=eps)[0]
    return out, total


def fused_ops(model: onnx.ModelProto) -> dict[str, int]:
    """How many of each fused onnxruntime op the graph holds (recorded in the manifest)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == MS_DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


DATA_FILE_SUFFIX = ".data"
_ALIGN = 4096  # page-aligned offsets let onnxruntime map each tensor straight from the file


_VIEW = "view-of:"  # the location of a row_view() until save_model() gives it its base's place in the data file


def row_view(base: onnx.TensorProto, start: int, stop: int, name: str) -> onnx.TensorProto:
    """An initializer holding rows [start, stop) of `base` without a copy of its own.

    save_model() points it at those rows of the base's bytes in the data file, and
    onnxruntime maps it separately: a consumer that repacks its weights (and so releases
    them) lets go of its view while another consumer of the base keeps reading the base.
    Until saved, only its name, type and shape can be read.
    """
    row_bytes = int(np.prod(base.dims[1:], dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(base.data_type).itemsize
    view = onnx.TensorProto(name=name, dims=[stop - start, *base.dims[1:]], data_type=base.data_type,
                            data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", _VIEW + base.name), ("offset", str(start * row_bytes)), ("length", str((stop - start) * row_bytes))):
        view.external_data.add(key=key, value=value)
    return view


def view_base(tensor: onnx.TensorProto) -> str | None:
    """The name of the initializer a row_view() reads, or None for a tensor with data of its own."""
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    return location[len(_VIEW):] if location.startswith(_VIEW) else None


def save_model(model: onnx.ModelProto, path) -> list:
    """Write model.onnx (the graph) and model.onnx.data (the weights, raw and page-aligned).

    Weights in a side file are memory-mapped by onnxruntime instead of parsed out of a
    protobuf and copied: measured on the DialoGPT-small shape (int8), session creation
    0.29 s -> 0.14 s and peak RSS 273 -> 213 MiB. It is also the only way past
    protobuf's 2 GB limit (DialoGPT-large in fp32). A row_view() is written as a range
    of its base's bytes, not as a copy. `model` itself is left as it was.
    """
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    data_name = path.name + DATA_FILE_SUFFIX
    inits = list(model.graph.initializer)
    table = token_table(model) if any(p.key == TOKEN_TABLE for p in model.metadata_props) else {}
    in_file = {table.get("rows"), table.get("scales")} - {None}  # the runtime reads these from the data file
    stubs, placed = {}, {}  # name -> what is saved; name -> offset of its bytes in the data file
    with open(path.parent / data_name, "wb") as f:
        for tensor in inits:
            if view_base(tensor) is not None:
                continue
            raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            if len(raw) < 1024 and tensor.name not in in_file:
                stubs[tensor.name] = tensor
                continue
            f.write(b"\0" * (-f.tell() % _ALIGN))
            placed[tensor.name] = f.tell()
            f.write(raw)
            stubs[tensor.name] = _external(tensor, data_name, placed[tensor.name], len(raw))
    by_name = {t.name: t for t in inits}
    for tensor in inits:
        base = view_base(tensor)
        if base is None:
            continue
        ext = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
        if base in placed:
            stubs[tensor.name] = _external(tensor, data_name, placed[base] + ext["offset"], ext["length"])
        else:  # a base too small for the data file: the view gets its own copy of the rows
            rows = numpy_helper.to_array(by_name[base]).reshape(by_name[base].dims[0], -1)
            row_bytes = rows[0].nbytes
            start = ext["offset"] // row_bytes
            stubs[tensor.name] = numpy_helper.from_array(
                rows[start : start + ext["length"] // row_bytes].reshape(tensor.dims), tensor.name)
    onnx.save_model(_with_initializers(model, [stubs[t.name] for t in inits]), str(path))
    return [path, path.parent / data_name]


def token_table_section(path) -> dict:
    """The manifest's "token_embedding" for the graph saved at `path`: where its token table's bytes
    lie in the data file (runtime/manifest.py: TokenTable reads and checks it)."""
    model = onnx.load(str(path), load_external_data=False)
    table = token_table(model)
    inits = {i.name: i for i in model.graph.initializer}

    def where(name: str) -> dict:
        ext = {e.key: e.value for e in inits[name].external_data}
        return {"file": ext["location"], "offset": int(ext["offset"]), "bytes": int(ext["length"])}

    rows = where(table["rows"])
    section = {"file": rows.pop("file"), "bits": table["bits"], "rows": rows}
    if table["scales"] is not None:
        scales = where(table["scales"])
        del scales["file"]  # the same: save_model writes every tensor into one data file
        section.update(block_size=table["block_size"], scales=scales)
    return section


def _with_initializers(model: onnx.ModelProto, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    """A copy of `model` whose graph holds `initializers` in place of its own, made without copying the
    model's weights: swapping them in and out of `model` itself would copy every one of them, which
    held two extra copies of DialoGPT-large's fp32 weights (3 GB each) while saving."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    shell.graph.initializer.extend(initializers)
    return shell


def _copy_fields(source, target, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        slot = getattr(target, field.name)
        if hasattr(slot, "extend"):  # a repeated field
            slot.extend(value)
        elif hasattr(slot, "CopyFrom"):  # a message
            slot.CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _external(tensor: onnx.TensorProto, data_name: str, offset: int, length: int) -> onnx.TensorProto:
    stub = onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        stub.external_data.add(key=key, value=value)
    return stub
