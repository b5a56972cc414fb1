"""The benchmark harness on a tiny model with two backends: it runs, and its JSON has every field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import export_quietly, run_env

FIELDS = {
    "schema_version", "model", "backend", "backend_version", "precision", "threads", "prompt_tokens", "new_tokens",
    "warmup", "runs", "passes", "load_s", "cold_start_s", "ttft_ms", "decode_ms_median", "decode_ms_p90",
    "decode_ms_pass_spread", "tokens_per_s", "peak_rss_mb", "model_size_mb", "memory_bandwidth_gbps", "floor_ms",
    "x_floor", "greedy_match_vs_torch", "machine", "packages", "git_sha", "command", "per_run",
}


def test_bench_two_backends(tiny_checkpoint, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "dialogpt_edge.runtime", "bench", "--model", str(tiny_checkpoint), "--backends", "ours,pytorch",
         "--precisions", "fp32,fp32-prepacked,int8", "--prompt-tokens", "16,40", "--new-tokens", "6", "--passes", "2", "--runs", "1",
         "--chat-turns", "3", "--output", str(out), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, env=run_env(), timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / f"{tiny_checkpoint.name}.json").read_text())
    records = data["records"]
    combos = {(r["backend"], r["precision"], r["prompt_tokens"]) for r in records}
    assert combos == {(b, p, n) for b, p in [("ours", "fp32"), ("ours", "fp32-prepacked"), ("ours", "int8"), ("pytorch", "fp32")] for n in (16, 40)}
    # -prepacked opens the same export from its prepacked copy: no second export
    assert [p.name for p in (tmp_path / "cache").glob("*/ours-fp32*") if p.is_dir()] == ["ours-fp32-kv32"]
    # int8 is exported as export does by default, with an int8 cache
    (export,) = (tmp_path / "cache").glob("*/ours-int8-kv8")
    manifest = json.loads((export / "manifest.json").read_text())
    assert (manifest["precision"]["weights"], manifest["precision"]["kv_cache"]) == ("int8", "int8")
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["new_tokens"] == 6 and len(r["per_run"]) == 2
        assert all(len(run["decode_ms"]) == 5 for run in r["per_run"])
        assert r["decode_ms_median"] > 0 and r["peak_rss_mb"] > 0 and r["floor_ms"] > 0
        assert r["backend_version"] and r["machine"]["cores"] >= 1
        # bandwidth probed before and after each prompt length's passes; the floor uses the best
        assert len(r["bandwidth_probes_gbps"]) == 3 and abs(r["memory_bandwidth_gbps"] - max(r["bandwidth_probes_gbps"])) < 0.01
    # our fp32 graph decodes exactly what PyTorch does
    assert all(r["greedy_match_vs_torch"] == 1.0 for r in records if r["precision"].startswith("fp32"))
    chat = data["chat"]
    assert len(chat["cached"]["ttft_ms"]) == len(chat["uncached"]["ttft_ms"]) == 3
    assert chat["cached"]["prefill_tokens"][1:] < chat["uncached"]["prefill_tokens"][1:]
    table = (out / f"{tiny_checkpoint.name}.md").read_text()
    assert "| ours | int8 |" in table and "vs PyTorch" in table
    assert "Versions: ours: dialogpt-edge " in table and "; pytorch: torch " in table  # which build each row measured
    assert (out / f"{tiny_checkpoint.name}_decode.png").stat().st_size > 1000
    assert (out / f"{tiny_checkpoint.name}_context.png").stat().st_size > 1000


def test_unknown_backend_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dialogpt_edge.runtime", "bench", "--shape", "small", "--backends", "ours,tensorflow",
                           "--cache-dir", str(tmp_path)], capture_output=True, text=True, env=run_env(), timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown backend 'tensorflow'")


def test_unknown_precision_is_one_line_before_any_work(tmp_path):
    proc = bench_cli("--shape", "small", "--precisions", "int8,int2", "--cache-dir", str(tmp_path), "--output", str(tmp_path / "out"))
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: unknown precision 'int2' (choose from: fp32, int8, int4, ") and "q4_0" in line
    assert not any(tmp_path.iterdir())  # no checkpoint built, no results written


@pytest.mark.parametrize("backends, precisions, line", [
    # a backend named that would run nothing: the README's full-peer command once left llama.cpp out so
    ("ours,llamacpp", "fp32,int8,int4", "error: llamacpp runs none of the precisions fp32,int8,int4 (add one of q8_0, q4_0, q4_k_m to --precisions)"),
    # a precision named that nothing would run
    ("ours,pytorch", "int8,q4_0", "error: no backend of ours,pytorch runs precision q4_0 (add llamacpp to --backends)"),
    ("pytorch", "int8", "error: no backend of pytorch runs precision int8 (add ours or optimum or ctranslate2 or genai or openvino to --backends)"),
])
def test_a_selection_that_would_measure_less_than_asked_fails_before_any_work(tmp_path, backends, precisions, line):
    proc = bench_cli("--shape", "small", "--backends", backends, "--precisions", precisions,
                     "--cache-dir", str(tmp_path), "--output", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [line]
    assert not any(tmp_path.iterdir())


def test_defaults_run_what_each_backend_supports():
    from dialogpt_edge.benchmarks.backends import BACKENDS, check_selection
    from dialogpt_edge.benchmarks.harness import DEFAULT_BACKENDS, DEFAULT_PRECISIONS

    assert DEFAULT_BACKENDS.split(",") == list(BACKENDS)
    # every backend runs something by default, and precisions a chosen backend lacks are not an error by default
    check_selection(DEFAULT_BACKENDS.split(","), DEFAULT_PRECISIONS.split(","), backends_given=True, precisions_given=False)
    check_selection(["ours", "pytorch"], DEFAULT_PRECISIONS.split(","), backends_given=True, precisions_given=False)
    check_selection(DEFAULT_BACKENDS.split(","), ["int8"], backends_given=False, precisions_given=True)


def bench_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dialogpt_edge.runtime", "bench", *args], capture_output=True, text=True,
                          env=run_env(), timeout=300)


@pytest.mark.parametrize("flags, fragment", [
    (["--threads", "x"], "argument --threads: must be an integer >= 1, got 'x'"),
    (["--prompt-tokens", "32,0"], "argument --prompt-tokens: must be >= 1, got 0"),
    (["--passes", "0"], "argument --passes: must be >= 1"),
    (["--new-tokens", "0"], "argument --new-tokens: must be >= 1"),
])
def test_bad_bench_settings_are_usage_errors(tiny_checkpoint, tmp_path, flags, fragment):
    proc = bench_cli("--model", str(tiny_checkpoint), "--backends", "ours", "--cache-dir", str(tmp_path), *flags)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_runs_longer_than_the_model_fail_before_any_work(tiny_checkpoint, tmp_path):
    proc = bench_cli("--model", str(tiny_checkpoint), "--backends", "ours", "--cache-dir", str(tmp_path),
                     "--prompt-tokens", "32,1000", "--new-tokens", "64", "--output", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --prompt-tokens 1000 + --new-tokens 64 exceed the model's 1024 positions (keep the sum at most 1024)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_peer_that_is_not_installed_is_skipped_with_a_note(monkeypatch, tmp_path):
    from dialogpt_edge.benchmarks import harness
    from dialogpt_edge.benchmarks.backends import backend_module
    from dialogpt_edge.runtime.errors import UserError

    monkeypatch.setattr(backend_module("ctranslate2"), "available", lambda: "ctranslate2 not installed (pip install ctranslate2)")
    plan = harness.Plan(label="x", checkpoint=tmp_path, cache=tmp_path, backends=["ctranslate2"], precisions=["int8"],
                        prompt_tokens=[8], new_tokens=2, threads=[1], runs=1, warmup=0, passes=1, output=tmp_path, command="")
    with pytest.raises(UserError, match=r"ctranslate2: skipped \(ctranslate2 not installed"):
        harness.run(plan)


def test_a_peer_that_is_missing_or_does_not_load_says_so_in_one_line(monkeypatch, tmp_path):
    from dialogpt_edge.benchmarks.backends import missing

    (tmp_path / "broken_peer.py").write_text("raise OSError('libfoo.so.1: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert missing("json", "pip install json", "json") is None
    assert missing("peer", "pip install peer", "json", "no_such_peer_module") == "peer not installed (pip install peer)"
    assert missing("peer", "pip install peer", "broken_peer") == "peer does not load: libfoo.so.1: cannot open shared object file"


def test_a_backend_with_none_of_the_precisions_is_named_in_the_notes(monkeypatch, tmp_path):
    from dialogpt_edge.benchmarks import harness
    from dialogpt_edge.benchmarks.backends import backend_module
    from dialogpt_edge.runtime.errors import UserError

    monkeypatch.setattr(backend_module("llamacpp"), "available", lambda: None)  # installed or not, it has nothing to run
    monkeypatch.setattr(backend_module("optimum"), "available", lambda: "optimum not installed")
    plan = harness.Plan(label="x", checkpoint=tmp_path, cache=tmp_path, backends=["llamacpp", "optimum"], precisions=["int8-kv16"],
                        prompt_tokens=[8], new_tokens=2, threads=[1], runs=1, warmup=0, passes=1, output=tmp_path, command="")
    with pytest.raises(UserError, match=r"llamacpp: runs none of int8-kv16 \(it runs q8_0, q4_0, q4_k_m\)"):
        harness.run(plan)


def test_memory_floor_counts_the_cache_each_precision_really_keeps():
    from dialogpt_edge.benchmarks.record import kv_value_bytes

    # ours follows export's defaults: int8 cache for quantized weights, fp32 for fp32 weights
    assert [kv_value_bytes("ours", p) for p in ("int8", "int4", "fp32")] == [1, 1, 4]
    assert [kv_value_bytes("ours", p) for p in ("int8-kv32", "fp32-kv16", "int8-kv16", "int4-kv8", "int8-prepacked")] == [4, 2, 2, 1, 1]
    assert kv_value_bytes("llamacpp", "q8_0") == 2 and kv_value_bytes("pytorch", "fp32") == 4
    assert kv_value_bytes("genai", "int4") == 1 and kv_value_bytes("genai", "fp32") == 4  # ours' exports, ours' caches


def test_the_machine_line_tells_cpus_that_share_a_model_name_apart(tmp_path):
    """A virtual machine's "AMD EPYC" is a Zen 2 without VNNI or a Zen 5 with it: results must say which."""
    from dialogpt_edge.benchmarks.machine import cpu_name

    def cpuinfo(family, model, flags):
        path = tmp_path / f"cpuinfo-{family}"
        path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                        f"model name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        return path

    assert cpu_name(cpuinfo(23, 49, "fpu sse2 avx avx2 fma")) == "AMD EPYC (family 23 model 49, AVX2)"
    assert cpu_name(cpuinfo(26, 2, "avx2 avx512f avx512bw avx_vnni avx512_vnni")) == "AMD EPYC (family 26 model 2, AVX-512 VNNI)"
    no_fields = tmp_path / "bare"
    no_fields.write_text("model name\t: Some CPU\n")
    assert cpu_name(no_fields) == "Some CPU"


def test_a_cached_export_from_another_exporter_is_redone(tiny_int8, tmp_path, monkeypatch):
    """The bench reuses its exports between runs, but not one that another version of the exporter wrote."""
    import shutil

    from dialogpt_edge.benchmarks.backends import ours
    from dialogpt_edge.export import pipeline

    cached = tmp_path / "ours-int8-kv8"
    shutil.copytree(tiny_int8, cached)
    exports = []
    monkeypatch.setattr(pipeline, "export_model", lambda src, out, **kw: exports.append((src, out, kw)))

    (tmp_path / "ours-int8-kv8.exporter").write_text(ours.exporter_stamp())
    assert ours.prepare(tmp_path / "ckpt", tmp_path, "int8") == cached and exports == []

    (tmp_path / "ours-int8-kv8.exporter").write_text("an older exporter")
    assert ours.prepare(tmp_path / "ckpt", tmp_path, "int8") == cached
    assert [(src, out, kw["quantize"], kw["kv_cache"]) for src, out, kw in exports] == [(str(tmp_path / "ckpt"), cached, "int8", "int8")]
    assert (tmp_path / "ours-int8-kv8.exporter").read_text() == ours.exporter_stamp()


@pytest.mark.parametrize("flags, message", [
    (["--model", "/no/such/checkpoint"], "error: no such folder: /no/such/checkpoint"),
    (["--model", "TINY", "--output", "/proc/dialogpt-edge-results"], "error: cannot write results to /proc/dialogpt-edge-results"),
])
def test_a_missing_checkpoint_or_an_unwritable_output_is_one_line(tiny_checkpoint, tmp_path, flags, message):
    flags = [str(tiny_checkpoint) if f == "TINY" else f for f in flags]
    proc = bench_cli("--backends", "ours", "--cache-dir", str(tmp_path), *flags)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(message), proc.stderr


@pytest.mark.parametrize("returncode, verdict", [(0, "on"), (-11, "off: this build failed with them (signal 11)"),
                                                 (1, "off: this build failed with them (exit code 1)")])
def test_llamacpp_runs_with_its_default_buffer_types_unless_the_build_crashes(monkeypatch, tmp_path, capsys, returncode, verdict):
    """llama.cpp's extra CPU buffer types (weight repacking) are its default and its fastest path, but one build
    here segfaulted with them: a child process tries them, and the runner turns them off only after a failure."""
    from dialogpt_edge.benchmarks.backends import llamacpp

    gguf = tmp_path / "llamacpp-q4_0.gguf"
    assert llamacpp._extra_bufts(gguf) == (True, "on")  # no probe yet: llama.cpp's default
    tried = []
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda cmd, **kw: tried.append(cmd) or subprocess.CompletedProcess(cmd, returncode, "", ""))
    llamacpp._probe_extra_bufts(gguf)
    assert tried and tried[0][-1] == str(gguf)
    assert llamacpp._extra_bufts(gguf) == (returncode == 0, verdict)
    assert ("running without" in capsys.readouterr().err) == (returncode != 0)


def _padded_vocab_checkpoint(folder):
    """A fine-tuned-style checkpoint: two added tokens, the embedding padded to a multiple of 8 (50,264 rows
    for 50,259 tokens), saved in fp16."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import EOS, gpt2_tokenizer

    tok = gpt2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|bot|>"]})
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=EOS, eos_token_id=EOS)).eval()
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=8, mean_resizing=False)
    model.half().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_peer_that_refuses_the_checkpoint_is_left_out_with_a_note(tmp_path):
    """CTranslate2's converter rejects a vocabulary padded past the tokenizer's; the bench reports that and
    measures the rest, instead of ending in the converter's traceback."""
    ckpt = _padded_vocab_checkpoint(tmp_path / "padded")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "dialogpt_edge.runtime", "bench", "--model", str(ckpt), "--backends", "ours,ctranslate2",
         "--precisions", "int8", "--prompt-tokens", "8", "--new-tokens", "4", "--passes", "1", "--runs", "1",
         "--output", str(out), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, env=run_env(), timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    records = json.loads((out / "padded.json").read_text())["records"]
    assert {(r["backend"], r["precision"]) for r in records} == {("ours", "int8")}
    table = (out / "padded.md").read_text()
    assert "Not measured: ctranslate2 int8: could not be prepared: Vocabulary has size 50259" in table


def test_the_pytorch_row_counts_fp32_bytes_for_an_fp16_checkpoint(tmp_path):
    from dialogpt_edge.benchmarks.harness import _weights_bytes

    ckpt = _padded_vocab_checkpoint(tmp_path / "padded")
    from transformers import GPT2LMHeadModel

    stored = GPT2LMHeadModel.from_pretrained(ckpt).state_dict()
    tied = {"lm_head.weight"}  # saved once, as the embedding
    assert _weights_bytes(ckpt) == 4 * sum(t.numel() for name, t in stored.items() if name not in tied)
    assert _weights_bytes(ckpt) > 1.9 * (ckpt / "model.safetensors").stat().st_size  # the file holds fp16


def test_our_runtime_or_the_baseline_failing_stops_the_bench():
    """A peer's failure is a note; ours or PyTorch's would leave nothing to compare, so it is an error."""
    from dialogpt_edge.benchmarks.harness import _peer_failed
    from dialogpt_edge.runtime.errors import UserError

    failed = {}
    _peer_failed(failed, "llamacpp", "q4_0", "failed: segfault", RuntimeError("segfault"))
    assert failed == {("llamacpp", "q4_0"): "failed: segfault"}
    for name in ("ours", "pytorch"):
        with pytest.raises(UserError, match=f"{name} \\(int8\\) could not be prepared: boom"):
            _peer_failed(failed, name, "int8", "could not be prepared: boom", RuntimeError("boom"))


def test_the_gguf_token_list_covers_every_embedding_row():
    from dialogpt_edge.benchmarks.backends.llamacpp import _token_table

    tok = {"model": {"vocab": {"a": 0, "b": 1, "<|endoftext|>": 2}},
           "added_tokens": [{"id": 2, "content": "<|endoftext|>", "special": True},
                            {"id": 3, "content": "<|user|>", "special": True}, {"id": 4, "content": "hi!", "special": False}]}
    tokens, kinds = _token_table(tok, vocab_size=8, eos=2)
    assert tokens == ["a", "b", "<|endoftext|>", "<|user|>", "hi!", "[PAD5]", "[PAD6]", "[PAD7]"]
    assert kinds == ["NORMAL", "NORMAL", "CONTROL", "CONTROL", "USER_DEFINED", "UNUSED", "UNUSED", "UNUSED"]


@pytest.mark.parametrize("repo_files, expected", [
    ({"config.json", "vocab.json", "merges.txt", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"},
     {"config.json", "vocab.json", "merges.txt", "pytorch_model.bin"}),
    ({"config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5"},
     {"config.json", "tokenizer.json", "model.safetensors"}),
])
def test_a_hub_checkpoint_is_fetched_without_other_frameworks_weights(monkeypatch, tmp_path, repo_files, expected):
    """The hub is not reachable here: a stand-in for snapshot_download that honours allow_patterns the way
    the hub client does (fnmatch on file names)."""
    import fnmatch

    import huggingface_hub

    from dialogpt_edge.benchmarks.harness import _download

    def snapshot_download(repo_id, allow_patterns):
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        for name in repo_files:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (folder / name).write_text("x")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert {p.name for p in _download("microsoft/DialoGPT-small").iterdir()} == expected


@pytest.mark.parametrize("model", ["tiny_model", "tiny_int8", "tiny_int4", "tiny_int4_padded", "shipped"])
def test_genai_runs_our_graph_to_our_greedy_ids(request, tmp_path, model):
    """The onnxruntime-genai peer is our exported graph in genai's C++ loop: its bridged inputs (ids
    gathered in-graph, seqlens from the attention mask, every prompt position's logits) must leave the
    computation as it was, so both loops pick the same tokens."""
    import numpy as np

    from dialogpt_edge.benchmarks.backends import genai, ours
    from dialogpt_edge.runtime import shipped_model_dir

    assert genai.available() is None  # the test extra installs it
    if model == "shipped":
        source = Path(shipped_model_dir())
    elif model == "tiny_int4_padded":  # 128-value blocks on a 64-wide model: the rows gathered in-graph lose their padding
        source = export_quietly(request.getfixturevalue("tiny_checkpoint"), tmp_path / "src", "int4", block_size=128,
                                verify_fidelity=False)
    else:
        source = request.getfixturevalue(model)
    # int8 weights stored as u8 (what the bench does where u8 x s8 kernels clamp) on every CPU: the
    # rewrite must leave the function as it was, whether ours runs exact VNNI or the option's u8 kernels
    genai.write_folder(source, tmp_path / "genai", exact_int8=True)
    import onnx

    onnx.load(str(source / "model.onnx"))  # the export itself untouched: onnx refuses a weights file with a second hard link
    theirs, mine = genai.Runner(tmp_path / "genai", threads=2), ours.Runner(source, threads=2)
    rng = np.random.default_rng(7)
    for n_prompt in (1, 9, 40):
        prompt = rng.integers(0, 1000, n_prompt).tolist()
        their_ids, stamps = theirs.generate(prompt, 24)
        assert their_ids == mine.generate(prompt, 24)[0] and len(stamps) == 24


def test_openvino_fp32_follows_pytorch_and_its_int8_and_int4_are_compressed(tiny_checkpoint, tmp_path):
    """The OpenVINO peer's conversion (optimum's ONNX export, batch 1, stateful cache, NNCF weights):
    fp32 decodes PyTorch's greedy ids with its cache carried between requests, and int8 / int4 store
    smaller weights and decode the requested number of tokens."""
    from dialogpt_edge.benchmarks.backends import backend_module, openvino_backend

    assert openvino_backend.available() is None  # the test extra installs it
    # OpenVINO runs in a child process, as each bench backend does: once its thread pool is up, a
    # fork that runs Python before exec (pexpect's, in the chat CLI tests) dies in the child
    child = (
        "import json, sys, numpy as np\n"
        "from pathlib import Path\n"
        "from dialogpt_edge.benchmarks.backends import openvino_backend as ov\n"
        "out = {}\n"
        "for precision in ('fp32', 'int8', 'int4'):\n"
        "    folder = ov.prepare(Path(sys.argv[1]), Path(sys.argv[2]), precision)\n"
        "    runner, rng = ov.Runner(folder, threads=2, precision=precision), np.random.default_rng(3)\n"
        "    runs = [runner.generate(rng.integers(0, 1000, n).tolist(), 20) for n in (1, 12)]\n"
        "    out[precision] = {'bytes': (folder / 'openvino_model.bin').stat().st_size,\n"
        "                      'ids': [ids for ids, _ in runs], 'stamps': [len(stamps) for _, stamps in runs]}\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(tiny_checkpoint), str(tmp_path)], capture_output=True,
                          text=True, env=run_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    import numpy as np

    torch_runner, rng = backend_module("pytorch").Runner(tiny_checkpoint, 2), np.random.default_rng(3)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (1, 12)]
    assert result["fp32"]["ids"] == [torch_runner.generate(prompt, 20)[0] for prompt in prompts]
    for precision in ("int8", "int4"):
        assert [len(ids) for ids in result[precision]["ids"]] == result[precision]["stamps"] == [20, 20]
    assert result["int4"]["bytes"] < result["int8"]["bytes"] < result["fp32"]["bytes"] / 2


@pytest.mark.parametrize("peer", ["genai", "openvino", "ctranslate2", "optimum", "llamacpp"])
def test_a_cached_peer_conversion_is_reused_until_its_converter_changes(peer, tmp_path, monkeypatch):
    """Converted peer artifacts are cached between bench runs, but one made by other conversion code
    (or, for genai, from another export of ours) is redone, as ours' exports are."""
    import ctranslate2
    import optimum.exporters.onnx
    import optimum.onnxruntime

    from dialogpt_edge.benchmarks.backends import (STAMP, ctranslate2_backend, genai, llamacpp, openvino_backend,
                                                   optimum_ort, ours)

    source = tmp_path / "export"
    source.mkdir()
    (source / "manifest.json").write_text("{}")
    made = []
    module = {"genai": genai, "openvino": openvino_backend, "ctranslate2": ctranslate2_backend, "optimum": optimum_ort,
              "llamacpp": llamacpp}[peer]
    precision, artifact = ("q8_0", f"{peer}-q8_0/model.gguf") if peer == "llamacpp" else ("int8", f"{peer}-int8")
    if peer == "genai":
        monkeypatch.setattr(ours, "prepare", lambda *a: source)
        monkeypatch.setattr(genai, "write_folder", lambda src, folder, **kw: made.append(folder))
    elif peer == "openvino":
        monkeypatch.setattr(optimum_ort, "prepare", lambda *a: source)
        monkeypatch.setattr(openvino_backend, "_convert", lambda onnx_model, xml, precision: made.append(xml))
    elif peer == "ctranslate2":
        class Converter:
            def __init__(self, checkpoint):
                pass

            def convert(self, folder, **kw):
                made.append(folder)

        monkeypatch.setattr(ctranslate2.converters, "TransformersConverter", Converter)
    elif peer == "optimum":
        class Quantizer:
            def quantize(self, save_dir, **kw):
                made.append(save_dir)

        monkeypatch.setattr(optimum.exporters.onnx, "main_export", lambda ckpt, output, **kw: made.append(output))
        monkeypatch.setattr(optimum.onnxruntime.ORTQuantizer, "from_pretrained", lambda fp32: Quantizer())
    else:
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
        monkeypatch.setattr(llamacpp, "write_f32_gguf", lambda ckpt, tokenizer, gguf: made.append(gguf))
        monkeypatch.setattr(llamacpp, "_quantize", lambda f32, gguf, ftype: made.append(gguf))
        monkeypatch.setattr(llamacpp, "_probe_extra_bufts", lambda gguf: None)
        for legacy in ("llamacpp-f32.gguf", "llamacpp-q8_0.gguf", "llamacpp-q8_0.gguf.extra-bufts"):
            (tmp_path / legacy).write_text("an unstamped file of an earlier version")
    out = module.prepare(tmp_path / "ckpt", tmp_path, precision)
    converts = 1 if peer in ("genai", "openvino", "ctranslate2") else 2  # optimum's and llama.cpp's from an fp32 step
    assert len(made) == converts and out == tmp_path / artifact
    assert module.prepare(tmp_path / "ckpt", tmp_path, precision) == out and len(made) == converts  # reused
    folder = out.parent if out.suffix == ".gguf" else out
    (folder / STAMP).write_text("made by an older converter")
    assert module.prepare(tmp_path / "ckpt", tmp_path, precision) == out and len(made) == converts + 1  # redone
    assert not list(tmp_path.glob("llamacpp-*.gguf*"))  # llama.cpp's old flat files are gone
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
