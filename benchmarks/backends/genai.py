"""onnxruntime-genai (onnxruntime's own C++ generation loop) running this project's exported graph.

Same weights, same graph, same kernels as ours: what differs is the loop around them, so this
peer measures what our Python decode loop costs against a native one. genai has no builder for
GPT-2, and its decoder contract differs from ours in three places, all bridged inside the graph:
it feeds input_ids (the token rows are gathered in-graph from the same table the runtime reads
itself), an attention_mask (GroupQueryAttention's seqlens_k and total_sequence_length are derived
from it in-graph; one unpadded sequence, as the bench runs), and it expects the prompt's logits at every position (ours
computes the lm_head for the last one only), which it pays for in its time to first token.

On CPUs whose u8 x s8 kernels clamp (runtime/cpus.py: int8_products_saturate) ours turns on
onnxruntime's exact u8 x u8 kernels with a session option that genai cannot pass; genai's copy gets
the same rewrite onnxruntime makes for that option, stored (exact_int8_weights), so both still
compute one function.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

PRECISIONS = ("fp32", "int8", "int4")  # ours' default exports of each


def available() -> str | None:
    from dialogpt_edge.benchmarks.backends import missing

    return missing("onnxruntime-genai", "pip install onnxruntime-genai", "onnxruntime_genai")


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    """genai's folder for ours' export of `precision`, rebuilt whenever that export or this bridge changes."""
    from dialogpt_edge.benchmarks.backends import cached_conversion, conversion_stamp, ours
    from dialogpt_edge.runtime.cpus import int8_products_saturate

    source = ours.prepare(checkpoint, cache_dir, precision)
    out = cache_dir / f"genai-{precision}"
    exact = int8_products_saturate()
    cached_conversion(out, conversion_stamp(__file__, (source / "manifest.json").read_text(), f"exact u8 {exact}"),
                      lambda folder: write_folder(source, folder, exact_int8=exact))
    return out


def write_folder(source: Path, folder: Path, *, exact_int8: bool = False) -> None:
    """genai_config.json, the bridged model.onnx and a copy of the export's weights file: genai reads
    external data only from inside the model's folder (a symlink out is refused), and a hard link
    would make onnx refuse the export's own file (it takes a second link for a hardlink attack)."""
    import onnx

    from dialogpt_edge.runtime import load

    source, folder = Path(source), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = load(source, verify_checksums=False)
    graph = onnx.load(str(source / "model.onnx"), load_external_data=False)
    bridge_inputs(graph)
    for data in {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}:
        shutil.copyfile(source / data, folder / data)
    if exact_int8:
        exact_int8_weights(graph, folder)
    onnx.save(graph, str(folder / "model.onnx"))
    (folder / "genai_config.json").write_text(json.dumps(genai_config(spec), indent=1))


def exact_int8_weights(model, folder: Path) -> None:
    """Every DynamicQuantizeMatMul's int8 weights as uint8 with zero point 128, in place in `folder`'s
    copy of the weights file: the same values, run by onnxruntime's u8 x u8 kernel, which does not
    clamp (what the session option session.x64quantprecision makes onnxruntime do at load)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for node in g.node:
        if node.op_type != "DynamicQuantizeMatMul" or len(node.input) > 3 and node.input[3]:
            continue
        weights = inits[node.input[1]]
        if weights.data_type != TensorProto.INT8:
            continue
        where = {e.key: e.value for e in weights.external_data}
        offset, length = int(where.get("offset", 0)), int(where["length"])
        with open(folder / where["location"], "r+b") as f:  # s8 + 128 as u8 is the byte with its top bit flipped
            f.seek(offset)
            flipped = (np.frombuffer(f.read(length), np.uint8) ^ 0x80).tobytes()
            f.seek(offset)
            f.write(flipped)
        weights.data_type = TensorProto.UINT8
        zero_point = numpy_helper.from_array(np.full(weights.dims[-1], 128, np.uint8), node.input[1] + ".zero_point")
        g.initializer.append(zero_point)
        node.input[:] = [*node.input[:3], zero_point.name, *node.input[4:]]


def bridge_inputs(model) -> None:
    """Rewrite ours' graph inputs (inputs_embeds, seqlens_k, total_sequence_length, logits_to_keep)
    into genai's (input_ids, attention_mask), in place."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from dialogpt_edge.export.builder import MS_DOMAIN, token_table

    g = model.graph
    table = token_table(model)
    width = next(i for i in g.input if i.name == "inputs_embeds").type.tensor_type.shape.dim[2].dim_value
    kept = [i for i in g.input if i.name not in ("inputs_embeds", "seqlens_k", "total_sequence_length", "logits_to_keep")]
    del g.input[:]
    g.input.extend([helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]), *kept])

    def const(name, value):
        g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), "genai." + name))
        return "genai." + name

    if table["bits"] == 32:
        nodes = [helper.make_node("Gather", [table["rows"], "input_ids"], ["inputs_embeds"], name="genai_embed")]
    else:
        rows = next(t for t in g.initializer if t.name == table["rows"])
        vocab, blocks, block = rows.dims[0], rows.dims[1], table["block_size"]
        nodes = [
            # GatherBlockQuantized wants scales of the data's rank
            helper.make_node("Reshape", [table["scales"], const("scale_shape", [vocab, blocks, 1])], ["genai.scales3"]),
            helper.make_node("GatherBlockQuantized", [table["rows"], "input_ids", "genai.scales3"], ["genai.blocks"],
                             name="genai_embed", domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=block,
                             bits=table["bits"]),
            helper.make_node("Reshape", ["genai.blocks", const("row_shape", [0, 0, blocks * block])], ["genai.rows"]),
            # the last block's zero padding off (a width that is not a multiple of the block size)
            helper.make_node("Slice", ["genai.rows", const("zero", [0]), const("width", [width]), const("axis2", [2])],
                             ["inputs_embeds"]),
        ]
    nodes += [
        helper.make_node("ReduceSum", ["attention_mask", const("axis1", [1])], ["genai.held"], keepdims=0),
        helper.make_node("Sub", ["genai.held", const("one", 1)], ["genai.last"]),
        helper.make_node("Cast", ["genai.last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["genai.mask_shape"], start=1, end=2),
        helper.make_node("Squeeze", ["genai.mask_shape"], ["genai.total"]),
        helper.make_node("Cast", ["genai.total"], ["total_sequence_length"], to=TensorProto.INT32),
        helper.make_node("Shape", ["input_ids"], ["genai.id_shape"], start=1, end=2),
        helper.make_node("Squeeze", ["genai.id_shape"], ["logits_to_keep"]),
    ]
    graph_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes + graph_nodes)


def genai_config(spec) -> dict:
    return {
        "model": {
            "type": "decoder", "context_length": spec.n_positions, "vocab_size": spec.vocab_size,
            "bos_token_id": spec.eos_token_id, "eos_token_id": spec.eos_token_id, "pad_token_id": spec.eos_token_id,
            "decoder": {
                "filename": "model.onnx", "num_hidden_layers": spec.n_layer, "num_attention_heads": spec.n_head,
                "num_key_value_heads": spec.n_head, "head_size": spec.head_dim, "hidden_size": spec.n_embd,
                "session_options": {"log_id": "dialogpt-edge-bench", "provider_options": []},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        # the cache one buffer of max_length positions, written in place (as ours)
        "search": {"do_sample": False, "num_beams": 1, "max_length": spec.n_positions, "past_present_share_buffer": True},
    }


def version() -> str:
    from importlib import metadata

    return f"onnxruntime-genai {metadata.version('onnxruntime-genai')} / onnxruntime {metadata.version('onnxruntime')}"


class Runner:
    def __init__(self, artifact: Path, threads: int, precision: str = ""):
        import onnxruntime_genai as og

        config = og.Config(str(artifact))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                             "inter_op_num_threads": 1}}}}))
        self.og = og
        self.model = og.Model(config)

    def generate(self, prompt_ids: list[int], n_new: int):
        length = len(prompt_ids) + n_new
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)  # min_length: eos ignored
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)
        stamps, ids = [], []
        while len(ids) < n_new:
            generator.generate_next_token()
            stamps.append(time.perf_counter())
            ids.append(int(generator.get_next_tokens()[0]))
        return ids, stamps
