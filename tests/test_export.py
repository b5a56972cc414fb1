"""export: the folder it writes, and every refusal, each as one line with nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from conftest import TINY, export_quietly, run_env
from dialogpt_edge.runtime.manifest import sha256_file


def export_cli(*args: str) -> subprocess.CompletedProcess:
    if "--quantize" not in args:
        args = (*args, "--quantize", "none")  # fp32 unless a test is about quantization: faster
    return subprocess.run(
        [sys.executable, "-m", "dialogpt_edge.runtime", "export", *args],
        capture_output=True, text=True, env=run_env(), timeout=600,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name or ".old-" in p.name]


def test_manifest_describes_the_folder(tiny_model, tiny_checkpoint):
    manifest = json.loads((tiny_model / "manifest.json").read_text())
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    arch = manifest["architecture"]
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "eos_token_id"):
        assert arch[key] == config[key], key
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(tiny_model / name)
        assert entry["bytes"] == (tiny_model / name).stat().st_size
    graph = onnx.load(str(tiny_model / "model.onnx"), load_external_data=False).graph
    assert manifest["io"]["inputs"] == [i.name for i in graph.input]
    assert manifest["io"]["outputs"] == [o.name for o in graph.output]
    assert "past_key_values.1.value" in manifest["io"]["inputs"]
    assert "present.1.value" in manifest["io"]["outputs"]
    fidelity = manifest["fidelity"]["fp32_vs_pytorch"]
    assert fidelity["greedy_ids_equal"] is True
    assert fidelity["max_abs_logit_diff"] < 1e-4
    assert manifest["graph"]["fused"] == {"GroupQueryAttention": 2, "FastGelu": 2}
    assert manifest["precision"]["kv_cache"] == "fp32"
    for dist in ("torch", "transformers", "onnxruntime", "onnx"):
        assert manifest["versions"][dist]


def test_tokenizer_merges_are_written_as_strings_unless_a_token_has_a_space(tiny_model, tmp_path):
    """Strings parse faster than pairs and every tokenizers version reads them; pairs stay where a
    token has a space, which the string form cannot say. Either way the file encodes as the source
    tokenizer does (tests/test_tokenizer.py compares the exported one with GPT-2's)."""
    import tokenizers
    from tokenizers.models import BPE

    from dialogpt_edge.export.pipeline import write_tokenizer

    merges = json.loads((tiny_model / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) == 50000 and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)

    spaced = tokenizers.Tokenizer(BPE({"a": 0, " ": 1, "b": 2, "a ": 3, "a b": 4}, [("a", " "), ("a ", "b")]))
    write_tokenizer(spaced, tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"] == [["a", " "], ["a ", "b"]]
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("a b").ids == [4]


def test_residual_layer_norms_stay_unfused_when_onnxruntime_loads_them(tiny_model, tmp_path):
    """The graph writes Sum + LayerNormalization because onnxruntime's fused SkipLayerNormalization is
    slower on one row (benchmarks/results/experiments.md); its optimizer fuses an Add + LayerNormalization
    back into one, so the graph it actually runs must still hold no SkipLayerNormalization."""
    import onnxruntime as ort

    from dialogpt_edge.runtime.session import session_options

    opts = session_options(1)
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tiny_model / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    assert "SkipLayerNormalization" not in ops
    assert ops.count("LayerNormalization") == 2 * TINY["n_layer"] + 1, ops


def test_tied_embedding_is_stored_once(tiny_model, tiny_checkpoint):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint / "model.safetensors"), "np") as f:
        params = sum(f.get_tensor(k).size for k in f.keys() if not k.endswith("attn.bias"))
    wte = 50257 * 64
    size = sum(p.stat().st_size for p in tiny_model.glob("model.onnx*"))
    # every weight once (lm_head shares wte) plus small graph overhead; twice would add 12.9 MB
    assert size < 4 * params + 4 * wte * 0.1, (size, params)


def test_the_fp32_lm_head_reads_the_token_table_in_row_views(tiny_model):
    """Four matmuls over consecutive quarters of the one table the runtime reads token rows from:
    onnxruntime packs each quarter while only that quarter of the file is mapped."""
    import onnx

    from dialogpt_edge.export.builder import LM_HEAD_PARTS

    graph = onnx.load(str(tiny_model / "model.onnx"), load_external_data=False).graph
    table = json.loads((tiny_model / "manifest.json").read_text())["token_embedding"]
    where = {i.name: {e.key: e.value for e in i.external_data} for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    parts = [n for n in graph.node if n.op_type == "MatMul" and n.name.startswith("lm_head_part")]
    assert len(parts) == LM_HEAD_PARTS
    start = table["rows"]["offset"]
    for part in parts:
        transpose = producer[part.input[1]]
        assert transpose.op_type == "Transpose"
        view = where[transpose.input[0]]
        assert int(view["offset"]) == start
        start += int(view["length"])
    assert start == table["rows"]["offset"] + table["rows"]["bytes"]
    concat = producer["logits"]
    assert concat.op_type == "Concat" and list(concat.input) == [p.output[0] for p in parts]


def test_export_cli_end_to_end_then_generate(tiny_checkpoint, tmp_path):
    out = tmp_path / "exported"
    proc = export_cli(str(tiny_checkpoint), "--output", str(out), "--quantize", "int8", "--fidelity-tokens", "512")
    assert proc.returncode == 0, proc.stderr
    assert "verifying fp32 against PyTorch" in proc.stderr
    # the long steps say how far they are: parity over several prompts, fidelity over several dialogs
    steps = {line.split("] ")[1].split(" ...")[0]: line for line in proc.stderr.splitlines() if line.startswith("[")}
    for step in ("verifying fp32 against PyTorch (greedy ids, logits at every position)",
                 "measuring int8 with an int8 KV cache fidelity on held-out dialogs"):
        assert " ... 25% 50% 75% " in steps[step], steps[step]
    assert (out / "manifest.json").is_file()
    assert leftovers(tmp_path) == []


def test_existing_output_is_refused_without_force(tiny_checkpoint, model_copy):
    before = sha256_file(model_copy / "manifest.json")
    err = assert_one_line_error(export_cli(str(tiny_checkpoint), "--output", str(model_copy)), "already exists", "--force")
    assert str(model_copy) in err
    assert sha256_file(model_copy / "manifest.json") == before


def test_too_few_fidelity_tokens_are_refused_before_any_work(tiny_checkpoint, tmp_path):
    out = tmp_path / "few"
    assert_one_line_error(export_cli(str(tiny_checkpoint), "--output", str(out), "--fidelity-tokens", "10"),
                          "--fidelity-tokens 10 is too few", "--no-verify")
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_block_size_the_kernels_do_not_take_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    """The CLI's choices stop a bad --block-size; a caller of export_model gets the same one line."""
    from dialogpt_edge.export.pipeline import export_model
    from dialogpt_edge.runtime.errors import UserError

    with pytest.raises(UserError, match=r"unknown --block-size 48 \(choose one of: 16, 32, 64, 128, 256\)"):
        export_model(str(tiny_checkpoint), tmp_path / "odd", quantize="int4", block_size=48)
    assert leftovers(tmp_path) == [] and not (tmp_path / "odd").exists()


@pytest.mark.parametrize("flag", [["--block-size", "64"], ["--accuracy-level", "4"]])
def test_quantization_settings_for_an_fp32_export_are_refused(tiny_checkpoint, tmp_path, flag):
    out = tmp_path / "fp32"
    assert_one_line_error(export_cli(str(tiny_checkpoint), "--output", str(out), "--quantize", "none", *flag),
                          "--block-size and --accuracy-level set how weights are quantized", "--quantize int8 / int4")
    assert not out.exists()


def test_an_output_folder_that_takes_no_new_folders_is_one_line(tiny_checkpoint):
    """/proc takes no new folders, whoever runs the tests (root ignores a read-only mode bit)."""
    assert_one_line_error(export_cli(str(tiny_checkpoint), "--output", "/proc/dialogpt-edge-model"),
                          "cannot write in /proc", "choose another --output")


def test_force_replaces_a_model_folder(tiny_checkpoint, model_copy):
    (model_copy / "stale.txt").write_text("from an older export")
    proc = export_cli(str(tiny_checkpoint), "--output", str(model_copy), "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (model_copy / "stale.txt").exists()
    assert leftovers(model_copy.parent) == []


def test_force_never_replaces_a_folder_that_is_not_a_model(tiny_checkpoint, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert_one_line_error(
        export_cli(str(tiny_checkpoint), "--output", str(precious), "--force"), "refusing to replace", "not a dialogpt-edge model folder"
    )
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_a_model_folder_given_as_the_source_is_told_to_use_its_checkpoint(tiny_model, tiny_checkpoint, tmp_path):
    line = assert_one_line_error(export_cli(str(tiny_model), "--output", str(tmp_path / "out")))
    assert line == (f"error: {tiny_model} is a dialogpt-edge model folder, already exported; give the checkpoint it "
                    f"came from instead (its manifest names {tiny_checkpoint.name})")
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path):
    assert_one_line_error(export_cli(str(tmp_path / "nope" / "ckpt"), "--output", str(tmp_path / "out")), "no such folder")
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_id(tmp_path):
    err = assert_one_line_error(export_cli("microsoft/DialoGPT-small", "--output", str(tmp_path / "out")), "microsoft/DialoGPT-small", "hub")
    assert "local checkpoint folder" in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(export_cli(str(tmp_path / "empty"), "--output", str(tmp_path / "out")), "no config.json")


@pytest.mark.parametrize(
    "config, found",
    [
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "model_type 'bert'"),
        ({"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]}, "GPT2ForSequenceClassification"),
        ({"model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"]}, "model_type 'gpt_neo'"),
    ],
)
def test_not_a_gpt2_causal_lm(tmp_path, config, found):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    assert_one_line_error(export_cli(str(src), "--output", str(tmp_path / "out")), "not a GPT-2-architecture causal LM", found)
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_tokenizer(tiny_checkpoint, tmp_path):
    src = tmp_path / "no_tok"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (src / name).write_bytes((tiny_checkpoint / name).read_bytes())
    assert_one_line_error(export_cli(str(src), "--output", str(tmp_path / "out")), "has no tokenizer files")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_parity_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    from dialogpt_edge.export import pipeline, verify
    from dialogpt_edge.runtime.errors import UserError

    monkeypatch.setattr(verify, "LOGIT_ATOL", 0.0)
    monkeypatch.setattr(verify, "LOGIT_RTOL", 0.0)
    with pytest.raises(verify.ParityError, match="differ from PyTorch"):
        pipeline.export_model(str(tiny_checkpoint), tmp_path / "out")
    assert issubclass(verify.ParityError, UserError)
    assert list(tmp_path.iterdir()) == []


def test_fp16_kv_cache_is_measured_against_the_fp32_reference(tiny_checkpoint, tiny_model, tmp_path):
    """--kv-cache fp16 ships a second graph: its fidelity against the verified fp32-cache graph is recorded."""
    import numpy as np

    from dialogpt_edge.runtime import Session, load

    folder = export_quietly(tiny_checkpoint, tmp_path / "kv16", "none", kv_cache="fp16", fidelity_tokens=1024)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["precision"]["weights"], manifest["precision"]["kv_cache"]) == ("fp32", "fp16")
    fid = manifest["fidelity"]["quantized_vs_fp32"]
    assert fid["tokens"] >= 1000 and fid["top1_agreement"] > 0.95 and abs(fid["perplexity_ratio"] - 1) < 0.01
    session = Session(load(folder))
    assert session.new_cache().keys[0].dtype == np.float16
    ids = [15496, 11, 703, 389, 345, 30, 50256]
    reference = Session(load(tiny_model))
    np.testing.assert_allclose(session.forward(ids, session.new_cache()), reference.forward(ids, reference.new_cache()), atol=2e-2)


def test_int8_kv_cache_is_calibrated_on_training_dialogs_and_measured_on_held_out_ones(tiny_checkpoint, tiny_model, tmp_path):
    """--kv-cache int8: per-channel scales from the training split, fidelity from the held-out split."""
    import numpy as np
    import onnx

    from dialogpt_edge.runtime import Session, load

    folder = export_quietly(tiny_checkpoint, tmp_path / "kv8", "none", kv_cache="int8", fidelity_tokens=1024)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["precision"]["weights"], manifest["precision"]["kv_cache"]) == ("fp32", "int8")
    assert manifest["precision"]["kv_cache_calibration"]["data"] == "chitchat-dataset training split"
    assert manifest["precision"]["kv_cache_calibration"]["tokens"] >= 8192
    fid = manifest["fidelity"]["quantized_vs_fp32"]
    assert fid["tokens"] >= 1000 and fid["top1_agreement"] > 0.95 and abs(fid["perplexity_ratio"] - 1) < 0.02

    from conftest import TINY
    from dialogpt_edge.export import dialogs
    from dialogpt_edge.runtime import Tokenizer

    model = onnx.load(str(folder / "model.onnx"))
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == TINY["n_layer"] and all(len(n.input) == 14 for n in attention)
    assert not [n for n in model.graph.node if n.op_type == "Cast"]  # activations stay fp32 around the int8 cache
    reference = Session(load(tiny_model))
    session = Session(load(folder))
    # a scale is a channel's largest magnitude on the training dialogs over 127: a training
    # conversation never exceeds it
    tok = Tokenizer(reference.spec.tokenizer_path, reference.spec.eos_token_id)
    (first,) = dialogs.sequences("train", tok.encode, tok.eos_token_id, 200, reference.spec.n_positions)[:1]
    cache = reference.new_cache()
    reference.forward(first, cache)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for layer in range(TINY["n_layer"]):
        for kind, buffers in (("k", cache.keys), ("v", cache.values)):
            scale = inits[f"h.{layer}.attn.{kind}_cache_scale"].reshape(TINY["n_head"], -1)
            seen = np.abs(buffers[layer][0, :, : cache.length]).max(axis=1)
            assert np.all(scale > 0) and np.all(seen <= 127 * scale * (1 + 1e-5))

    ids = [15496, 11, 703, 389, 345, 30, 50256, 40, 1101, 3621]
    c = session.new_cache()
    assert c.keys[0].dtype == np.int8
    full = session.forward(ids, c)
    exact = reference.forward(ids, reference.new_cache())
    assert np.abs(full - exact).max() < 0.05 * np.abs(exact).max()  # int8 steps of each channel's range
    # prompt then steps reads back the same cache as one pass over everything
    c = session.new_cache()
    session.forward(ids[:6], c)
    steps = [session.decode_step(t, c) for t in ids[6:]]
    np.testing.assert_allclose(np.stack(steps[:-1]), full[6:-1], atol=1e-3)


@pytest.mark.parametrize("variant, message", [
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true are not supported"),
    # onnxruntime's attention refuses it at run time, deep in the parity check, without this check
    ({"n_head": 16}, "a head size of 4 (n_embd 64 / n_head 16) is not supported"),
])
def test_gpt2_variants_the_graph_would_get_wrong_are_refused(tmp_path, variant, message):
    from conftest import TINY, make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", **{**TINY, **variant})
    proc = export_cli(str(ckpt), "--output", str(tmp_path / "out"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_model_with_few_positions_exports_and_generates_to_its_end(tmp_path):
    """The parity prompts and continuations are fitted to the model (transformers failed at 40 positions)."""
    from transformers import GPT2LMHeadModel

    from conftest import TINY, make_checkpoint, torch_greedy
    from dialogpt_edge.runtime import Session, SamplingConfig, generate, load

    ckpt = make_checkpoint(tmp_path / "ckpt", n_positions=40, **TINY)
    folder = export_quietly(ckpt, tmp_path / "int8", "int8", fidelity_tokens=256)
    session = Session(load(folder), threads=1)
    assert session.spec.n_positions == 40
    prompt = [15496, 11, 703, 389, 345, 30, 50256]
    ids = list(generate(session, prompt, SamplingConfig.greedy(max_new_tokens=100, min_new_tokens=100)))
    assert len(ids) == 40 - len(prompt) + 1  # up to the last position, then the token it predicts
    fp32 = Session(load(export_quietly(ckpt, tmp_path / "fp32")), threads=1)
    model = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    assert list(generate(fp32, prompt, SamplingConfig.greedy(max_new_tokens=20))) == torch_greedy(model, prompt, 20)


def test_an_untied_lm_head_is_exported_and_quantized_as_its_own_matrix(tmp_path):
    """DialoGPT ties the lm_head to the embedding; a checkpoint that does not is still computed right."""
    import torch
    from transformers import GPT2LMHeadModel

    from conftest import TINY, make_checkpoint, torch_greedy
    from dialogpt_edge.runtime import Session, generate, load

    ckpt = make_checkpoint(tmp_path / "ckpt", **TINY, tie_word_embeddings=False)
    model = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    fp32 = export_quietly(ckpt, tmp_path / "fp32")  # the export's own parity check holds it to PyTorch
    prompt = [15496, 11, 703, 389, 345, 30, 50256]
    assert list(generate(Session(load(fp32)), prompt, max_new_tokens=16)) == torch_greedy(model, prompt, 16)
    int8 = export_quietly(ckpt, tmp_path / "int8", "int8", fidelity_tokens=1024)
    q = json.loads((int8 / "manifest.json").read_text())["precision"]["quantization"]
    assert q["quantized_matmuls"] == q["expected_matmuls"] and q["embedding"] == "fp32 (untied)"
