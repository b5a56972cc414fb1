"""export_model(): checkpoint -> verified model folder, built in a temporary folder and renamed into place."""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dialogpt_edge.runtime.errors import UserError
from dialogpt_edge.runtime.manifest import (
    FORMAT_VERSION, MANIFEST_NAME, MODEL_FILE, TOKENIZER_FILE, ModelSpec, installed_versions, token_table, write_manifest,
)
from dialogpt_edge.runtime.session import Session
from dialogpt_edge.runtime.tokenizer import Tokenizer

from . import builder, convert, fidelity, kv_scales, verify
from . import quantize as quantize_mod
from .builder import save_model


class Progress:
    """Numbered step lines on stderr, each closed with its duration."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.n, self.t0, self.shown = total, stream, 0, None, 0

    def step(self, text: str) -> None:
        self.done()
        self.n += 1
        self.t0 = time.perf_counter()
        self.shown = 0
        print(f"[{self.n}/{self.total}] {text} ...", end="", file=self.stream, flush=True)

    def fraction(self, done: float) -> None:
        """How far the current step is (0..1), shown in quarters: the long steps take minutes on large models."""
        quarter = min(int(done * 4), 3)
        if quarter > self.shown:
            print(f" {25 * quarter}%", end="", file=self.stream, flush=True)
            self.shown = quarter

    def done(self) -> None:
        if self.t0 is not None:
            print(f" {time.perf_counter() - self.t0:.1f}s", file=self.stream, flush=True)
            self.t0 = None


def check_output(output: Path, force: bool) -> None:
    """Refuse to touch an existing folder without --force, and anything but a model folder even with it."""
    if not output.exists():
        return
    if not output.is_dir():
        raise UserError(f"{output} exists and is not a folder (choose another --output)")
    if not force:
        raise UserError(f"{output} already exists (pass --force to replace it, or choose another --output)")
    if any(output.iterdir()) and not (output / MANIFEST_NAME).is_file():
        raise UserError(
            f"refusing to replace {output}: it is not empty and not a dialogpt-edge model folder (choose another --output)"
        )


def install_folder(staging: Path, output: Path) -> None:
    """Swap the finished folder into place; an old model is removed only once the new one is there."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{int(time.time())}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(
    source: str,
    output: str | Path,
    *,
    force: bool = False,
    quantize: str = "int8",
    block_size: int | None = None,
    accuracy_level: int = 4,
    verify_fidelity: bool = True,
    fidelity_tokens: int = fidelity.DEFAULT_TOKENS,
    kv_cache: str | None = None,
) -> Path:
    """Export, optimise, verify, quantize and write a model folder; on any failure nothing is left at `output`."""
    started = time.perf_counter()
    if quantize not in quantize_mod.SCHEMES:
        raise UserError(f"unknown --quantize {quantize!r} (choose one of: {', '.join(quantize_mod.SCHEMES)})")
    if block_size is not None and block_size not in quantize_mod.BLOCK_SIZES:
        raise UserError(f"unknown --block-size {block_size!r} (choose one of: {', '.join(map(str, quantize_mod.BLOCK_SIZES))})")
    if verify_fidelity and fidelity_tokens < fidelity.MIN_TOKENS:
        raise UserError(f"--fidelity-tokens {fidelity_tokens} is too few to measure anything "
                        f"(use at least {fidelity.MIN_TOKENS}, or --no-verify to skip the measurement)")
    kv_cache = kv_cache or builder.default_cache_dtype(quantize)
    if kv_cache not in builder.CACHE_DTYPES:
        raise UserError(f"unknown --kv-cache {kv_cache!r} (choose one of: {', '.join(builder.CACHE_DTYPES)})")
    output = Path(output).expanduser().resolve()
    check_output(output, force)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {output.parent}: {e.strerror} (choose another --output)") from None

    quantized = quantize != "none"
    # the fp32-cache fp32 graph is what PyTorch verifies; anything else ships a second graph, measured against it
    derived = quantized or kv_cache != "fp32"
    label = (quantize if quantized else "fp32") + (f" with an {kv_cache} KV cache" if kv_cache != "fp32" else "")
    progress = Progress(total=5 + quantized + (kv_cache == "int8") + (derived and verify_fidelity))
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    except OSError as e:  # a read-only folder, or one that takes no new folders (/proc, a full disk)
        raise UserError(f"cannot write in {output.parent}: {e.strerror} (choose another --output)") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is not
    fid = None
    try:
        with convert.quiet_libraries():
            progress.step(f"reading {source}")
            src = convert.resolve_source(source)
            tokenizer = convert.load_hf_tokenizer(src)
            model = convert.load_torch_model(src)

            progress.step("building the ONNX graph (fused attention, in-place KV cache)")
            weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
            graph = builder.build_gpt2(weights, src.config, cache_dtype="fp32")
            builder.split_tied_lm_head(graph)
            fused = builder.fused_ops(graph)
            write_tokenizer(tokenizer.backend_tokenizer, staging / TOKENIZER_FILE)
            work = staging / "_work"
            fp32_dir = work / "fp32"
            fp32_dir.mkdir(parents=True)
            save_model(graph, fp32_dir / MODEL_FILE)
            # Only the saved file is read from here on. Holding the graph as well would keep a second
            # copy of the fp32 weights through verification: DialoGPT-large's export peaked at 21 GB.
            del graph

            progress.step("verifying fp32 against PyTorch (greedy ids, logits at every position)")
            spec = _spec_for(fp32_dir, src.config, tokenizer)
            reference = Session(spec)
            prompts = [
                [i for turn in turns for i in tokenizer.encode(turn) + [spec.eos_token_id]]
                for turns in verify.VERIFY_TURNS
            ]
            parity = verify.check_parity(reference, model, prompts, progress=progress.fraction)
            del model

        report = None
        scales = calibration = None
        runtime_tok = Tokenizer(staging / TOKENIZER_FILE, spec.eos_token_id)  # the ids the runtime will see
        if kv_cache == "int8":
            progress.step("measuring the int8 KV cache's scales on training dialogs")
            sequences = kv_scales.training_sequences(runtime_tok.encode, spec.eos_token_id, kv_scales.DEFAULT_TOKENS, spec.n_positions)
            scales = kv_scales.calibrate(reference, sequences, progress=progress.fraction)
            calibration = {"data": "chitchat-dataset training split", "tokens": sum(len(q) for q in sequences),
                           "scales": "per head channel: largest magnitude seen / 127"}
        if derived:
            # The reference session's packed weights are not needed while the shipped graph is built
            # and quantized; it is opened again from the saved file for the fidelity measurement.
            del reference
            graph = builder.build_gpt2(weights, src.config, cache_dtype=kv_cache, kv_scales=scales)
            if not quantized:
                builder.split_tied_lm_head(graph)
        del weights
        if quantized:
            progress.step(f"quantizing weights to {quantize}")
            report = quantize_mod.quantize(
                graph, quantize, n_layer=spec.n_layer, accuracy_level=accuracy_level,
                block_size=block_size or quantize_mod.default_block_size(spec.n_embd),
            )
        if derived:
            save_model(graph, staging / MODEL_FILE)
            del graph
            if verify_fidelity:
                progress.step(f"measuring {label} fidelity on held-out dialogs")
                shipped = Session(_spec_for(staging, src.config, tokenizer))
                sequences = fidelity.held_out_sequences(runtime_tok, fidelity_tokens, spec.n_positions)
                fid = fidelity.measure(Session(spec), shipped, sequences, progress=progress.fraction)
                del shipped
        else:
            del reference
            for p in fp32_dir.iterdir():
                p.rename(staging / p.name)
        shutil.rmtree(work)

        progress.step("writing manifest.json")
        table = builder.token_table_section(staging / MODEL_FILE)
        write_manifest(staging, _manifest(spec, table, src, parity, fused, report, fid, verify_fidelity, kv_cache, calibration,
                                          time.perf_counter() - started))
        progress.step(f"moving into {output}")
        install_folder(staging, output)
        progress.done()
    except OSError as e:
        progress.done()
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"the disk filled up while writing {output} (free some space and re-run; nothing was written)") from None
        raise UserError(f"export failed: {e} (nothing was written to {output})") from None
    except BaseException:
        progress.done()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size_mb = sum(p.stat().st_size for p in output.iterdir() if p.name.startswith(MODEL_FILE)) / 2**20
    print(
        f"exported {source} -> {output}: {quantize if quantized else 'fp32'}, {size_mb:.1f} MiB, "
        f"fused {fused or 'nothing'}, fp32 max |logit diff| vs PyTorch {parity.max_abs_logit_diff:.1e}, "
        f"{time.perf_counter() - started:.0f}s",
        file=sys.stderr,
    )
    if fid is not None:
        print(f"{label} fidelity against fp32, teacher-forced on held-out dialogs:\n{fid.table(label)}", file=sys.stderr)
    return output


def write_tokenizer(tokenizer, path: Path) -> None:
    """tokenizer.json, with BPE merges as "a b" strings where no token has a space (GPT-2's never do).

    tokenizers writes merges as pairs, which it parses slower: 121 -> 89 ms of every chat's start-up
    for GPT-2's 50,000 merges (best of 9, `Tokenizer.from_file`), and versions before 0.20 cannot read
    pairs at all. Both forms give the same merges; a vocabulary with spaces keeps the pairs. Written
    without indentation, which tokenizers parses no slower.
    """
    data = json.loads(tokenizer.to_str())
    merges = data.get("model", {}).get("merges")
    if merges and all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")  # 3.6 -> 1.4 MB


def _spec_for(folder: Path, config, tokenizer) -> ModelSpec:
    import onnx

    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    return ModelSpec(
        path=folder,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        n_positions=config.n_positions,
        vocab_size=config.vocab_size,
        eos_token_id=int(eos),
        input_names=tuple(i.name for i in graph.input),
        output_names=tuple(o.name for o in graph.output),
        precision="fp32",
        token_table=token_table(builder.token_table_section(folder / MODEL_FILE), config.vocab_size, config.n_embd,
                                _file_sizes(folder)),
        manifest={},
    )


def _file_sizes(folder: Path) -> dict:
    """What token_table() checks offsets against, for a folder that has no manifest yet."""
    return {p.name: {"bytes": p.stat().st_size} for p in folder.iterdir() if p.is_file()}


def _manifest(spec, token_embedding: dict, src, parity, fused, report, fid, verify_fidelity: bool, kv_cache: str, kv_calibration: dict | None,
              seconds: float) -> dict:
    derived = report is not None or kv_cache != "fp32"
    weights = report.scheme if report else "fp32"
    return {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"ref": src.ref if not src.is_local else Path(src.ref).name, "kind": "local" if src.is_local else "hub", "revision": src.revision},
        "architecture": {
            "model_type": "gpt2",
            "n_layer": spec.n_layer,
            "n_head": spec.n_head,
            "n_embd": spec.n_embd,
            "head_dim": spec.head_dim,
            "n_positions": spec.n_positions,
            "vocab_size": spec.vocab_size,
            "eos_token_id": spec.eos_token_id,
        },
        "io": {"inputs": list(spec.input_names), "outputs": list(spec.output_names)},
        "token_embedding": token_embedding,
        "precision": {
            "weights": weights,
            "activations": "fp32" if not report else ("int8 dynamic (one scale per run)" if weights == "int8" else "int8 (accuracy_level 4)" if report.accuracy_level == 4 else "fp32"),
            "kv_cache": kv_cache,
            **({"kv_cache_calibration": kv_calibration} if kv_calibration else {}),
            "quantization": report.to_dict() if report else None,
        },
        "graph": {"builder": "dialogpt-edge", "layout": builder.GRAPH_LAYOUT, "fused": fused},
        "fidelity": {
            "fp32_vs_pytorch": {"reference": "pytorch fp32 (transformers, eager attention)", **parity.to_dict()},
            "quantized_vs_fp32": fid.to_dict() if fid else ("skipped (--no-verify)" if derived and not verify_fidelity else None),
        },
        "export": {"seconds": round(seconds, 1)},
        "versions": installed_versions(
            "dialogpt-edge", "torch", "transformers", "onnx", "onnxruntime", "tokenizers"
        ),
    }
