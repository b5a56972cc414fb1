"""llama.cpp through llama-cpp-python: the checkpoint written as an f32 GGUF, then quantized to Q8_0 / Q4_0
by llama.cpp's own llama_model_quantize. Optional: llama-cpp-python compiles on install."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

# q4_k_m: the 4-bit format llama.cpp users pick most (k-quants; DialoGPT's widths are multiples of 256)
PRECISIONS = ("q8_0", "q4_0", "q4_k_m")
_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_0, _Q4_K_M


def available() -> str | None:
    from dialogpt_edge.benchmarks.backends import missing

    return missing("llama-cpp-python", "pip install 'dialogpt-edge[llamacpp]'", "llama_cpp", "gguf")


def _weights(checkpoint: Path) -> dict:
    """The checkpoint's tensors as numpy arrays: straight from model.safetensors when there is one,
    else through transformers (sharded files, or the pytorch_model.bin of older hub repos)."""
    single = checkpoint / "model.safetensors"
    if single.is_file():
        from safetensors.numpy import load_file

        return load_file(str(single))
    from transformers import GPT2LMHeadModel

    return {k: v.detach().numpy() for k, v in GPT2LMHeadModel.from_pretrained(checkpoint).float().state_dict().items()}


def write_f32_gguf(checkpoint: Path, tokenizer_json: Path, path: Path) -> None:
    """GPT-2 in llama.cpp's 'gpt2' architecture. HF's Conv1D weights are (in, out); GGUF wants (out, in)."""
    import gguf
    import numpy as np

    config = json.loads((checkpoint / "config.json").read_text())
    w = {k.removeprefix("transformer."): v.astype(np.float32) for k, v in _weights(checkpoint).items()}
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
    writer.add_file_type(0)  # all f32

    tok = json.loads(tokenizer_json.read_text())
    eos = config.get("eos_token_id", 50256)
    tokens, kinds = _token_table(tok, config["vocab_size"], eos)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([getattr(gguf.TokenType, kind) for kind in kinds])
    merges = tok["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)

    writer.add_tensor("token_embd.weight", w["wte.weight"])
    writer.add_tensor("position_embd.weight", w["wpe.weight"])
    writer.add_tensor("output_norm.weight", w["ln_f.weight"])
    writer.add_tensor("output_norm.bias", w["ln_f.bias"])
    # Tied in GPT-2, written here as its own tensor so that llama_model_quantize gives the output
    # layer its usual higher-precision type. The file then holds the matrix twice, and the bench's
    # memory floor (file bytes) overstates llama.cpp's bytes read per token by the embedding.
    writer.add_tensor("output.weight", w["wte.weight"])
    for i in range(config["n_layer"]):
        h = f"h.{i}."
        for ours, theirs in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            writer.add_tensor(f"blk.{i}.{theirs}.weight", w[h + ours + ".weight"])
            writer.add_tensor(f"blk.{i}.{theirs}.bias", w[h + ours + ".bias"])
        for ours, theirs in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
            writer.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(w[h + ours + ".weight"].T))
            writer.add_tensor(f"blk.{i}.{theirs}.bias", w[h + ours + ".bias"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _token_table(tok: dict, vocab_size: int, eos: int) -> tuple[list[str], list[str]]:
    """(token, gguf.TokenType name) per embedding row, as llama.cpp's convert_hf_to_gguf writes them: a
    fine-tuned checkpoint may add tokens beyond GPT-2's BPE vocabulary and pad its embedding past them
    (resize_token_embeddings' pad_to_multiple_of); llama.cpp refuses a token list shorter than the embedding."""
    bpe = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    tokens, kinds = [], []
    for i in range(vocab_size):
        if i in bpe:
            tokens.append(bpe[i])
            kinds.append("CONTROL" if i == eos else "NORMAL")
        elif i in added:
            tokens.append(added[i]["content"])
            kinds.append("CONTROL" if added[i].get("special") else "USER_DEFINED")
        else:
            tokens.append(f"[PAD{i}]")
            kinds.append("UNUSED")
    return tokens, kinds


GGUF = "model.gguf"


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    """The quantized GGUF, made from an f32 one; both cached, and redone when this module or llama-cpp-python change."""
    from dialogpt_edge.benchmarks.backends import cached_conversion, conversion_stamp

    def write_f32(folder: Path) -> None:
        tokenizer_json = checkpoint / "tokenizer.json"
        if not tokenizer_json.is_file():  # a checkpoint with only vocab.json + merges.txt (DialoGPT's hub repos)
            from transformers import AutoTokenizer

            tokenizer_json = folder / "tokenizer.json"
            AutoTokenizer.from_pretrained(checkpoint).backend_tokenizer.save(str(tokenizer_json))
        write_f32_gguf(checkpoint, tokenizer_json, folder / GGUF)

    for legacy in cache_dir.glob("llamacpp-*.gguf*"):  # the unstamped files of earlier versions: never read now
        legacy.unlink(missing_ok=True)
    stamp = conversion_stamp(__file__, version())
    f32 = cache_dir / "llamacpp-f32"
    cached_conversion(f32, stamp, write_f32)
    out = cache_dir / f"llamacpp-{precision}"
    cached_conversion(out, stamp, lambda folder: _quantize(f32 / GGUF, folder / GGUF, _FTYPES[precision]))
    _probe_extra_bufts(out / GGUF)
    return out / GGUF


def _quantize(f32: Path, out: Path, ftype: int) -> None:
    """llama.cpp's own quantizer, in a child process: it logs every tensor to the terminal's stderr (about
    55 lines for DialoGPT), which is kept to show only if it fails."""
    code = (
        "import sys, llama_cpp\n"
        "params = llama_cpp.llama_model_quantize_default_params()\n"
        "params.ftype = int(sys.argv[3]); params.nthread = 2\n"
        "sys.exit(1 if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params) else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(f32), str(out), str(ftype)], capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise RuntimeError(f"llama_model_quantize failed: {tail}")


def _mode_file(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".extra-bufts")


def _probe_extra_bufts(gguf: Path) -> None:
    """Whether this build decodes with llama.cpp's extra CPU buffer types (its default: Q4_0 weights
    repacked for AVX2 / AVX-512, AMX where present), tried in a child process because a failure is a
    segfault. An earlier llama-cpp-python 0.3.36 build here crashed at the first quantized decode
    with them; a rebuild of the same version ran, and repacked Q4_0 decoded about 17 % faster. The
    peer runs as its users get it when it can. Redone every bench run: a reinstall rebuilds the library."""
    code = (
        "import sys, llama_cpp\n"
        "m = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_batch=64, n_threads=2, n_threads_batch=2, verbose=False)\n"
        "m.eval(list(range(1000, 1008))); m.eval([1000]); m.eval([1001])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(gguf)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        verdict = "on"
    else:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        verdict = f"off: this build failed with them ({how})"
        print(f"llama.cpp {gguf.name}: extra CPU buffer types (weight repacking) {verdict}; running without",
              file=sys.stderr, flush=True)
    _mode_file(gguf).write_text(verdict)


def _extra_bufts(gguf: Path) -> tuple[bool, str]:
    """(use them, what to record); llama.cpp's default when no probe ran."""
    try:
        verdict = _mode_file(gguf).read_text().strip()
    except OSError:
        verdict = "on"
    return verdict == "on", verdict


def version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


class Runner:
    def __init__(self, artifact: Path, threads: int, precision: str = ""):
        import llama_cpp
        import llama_cpp.llama as llama_module

        use, self.extra_bufts = _extra_bufts(artifact)
        if not use:  # Llama() does not expose the switch, so set it in its default params
            defaults = llama_cpp.llama_model_default_params

            def without_extra_bufts():
                params = defaults()
                params.use_extra_bufts = False
                return params

            llama_module.llama_cpp.llama_model_default_params = without_extra_bufts
        self.llm = llama_cpp.Llama(str(artifact), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=1024, verbose=False)
        self.eos = self.llm.token_eos()
        self.vocab = self.llm.n_vocab()

    def version(self) -> str:
        return f"{version()}, extra CPU buffer types {self.extra_bufts}"

    def generate(self, prompt_ids: list[int], n_new: int):
        import llama_cpp
        import numpy as np

        self.llm.reset()
        stamps, ids = [], []
        tokens = list(prompt_ids)
        # greedy by hand, eos masked: llama-cpp-python's samplers would stop at eos
        self.llm.eval(tokens)
        for n in range(n_new):
            # the last position's logits, straight from the context (Llama.scores is not filled here)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(self.vocab,)).copy()
            logits[self.eos] = -np.inf
            token = int(np.argmax(logits))
            stamps.append(time.perf_counter())
            ids.append(token)
            if n + 1 < n_new:
                self.llm.eval([token])
        return ids, stamps
