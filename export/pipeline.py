"""export_model(): checkpoint -> verified model folder, built in a temporary folder and renamed into place."""

from __future__ import annotations

import datetime as _dt
import errno
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from dialogpt_edge.runtime.errors import UserError
from dialogpt_edge.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, MODEL_FILE, TOKENIZER_FILE, ModelSpec, write_manifest
from dialogpt_edge.runtime.session import Session

from . import convert, verify


class Progress:
    """Numbered step lines on stderr, each closed with its duration."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.n, self.t0 = total, stream, 0, None

    def step(self, text: str) -> None:
        self.done()
        self.n += 1
        self.t0 = time.perf_counter()
        print(f"[{self.n}/{self.total}] {text} ...", end="", file=self.stream, flush=True)

    def done(self) -> None:
        if self.t0 is not None:
            print(f" {time.perf_counter() - self.t0:.1f}s", file=self.stream, flush=True)
            self.t0 = None


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("dialogpt-edge", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


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


def _install(staging: Path, output: Path) -> None:
    """Swap the finished folder into place; an old model is removed only once the new one is there."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{int(time.time())}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(source: str, output: str | Path, *, force: bool = False) -> Path:
    """Export, verify and write a model folder; on any failure nothing is left at `output`."""
    started = time.perf_counter()
    output = Path(output).expanduser().resolve()
    check_output(output, force)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {output.parent}: {e.strerror} (choose another --output)") from None

    progress = Progress(total=5)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is not
    try:
        with convert.quiet_libraries():
            progress.step(f"reading {source}")
            src = convert.resolve_source(source)
            tokenizer = convert.load_hf_tokenizer(src)
            model = convert.load_torch_model(src)

            progress.step("exporting to ONNX with a KV cache (optimum, task text-generation-with-past)")
            work = staging / "_work"
            work.mkdir()
            convert.move_into(convert.export_onnx(src, work), staging)
            tokenizer.backend_tokenizer.save(str(staging / TOKENIZER_FILE))
            shutil.rmtree(work)

            progress.step("verifying against PyTorch (greedy ids, logits at every position)")
            spec = _spec_for(staging, src.config, tokenizer)
            session = Session(spec)
            prompts = [
                [i for turn in turns for i in tokenizer.encode(turn) + [spec.eos_token_id]]
                for turns in verify.VERIFY_TURNS
            ]
            parity = verify.check_parity(session, model, prompts)
            del session

        progress.step("writing manifest.json")
        write_manifest(staging, _manifest(spec, src, parity, time.perf_counter() - started))
        progress.step(f"moving into {output}")
        _install(staging, output)
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
    print(
        f"exported {source} -> {output} (max |logit diff| vs PyTorch {parity.max_abs_logit_diff:.1e}, "
        f"{time.perf_counter() - started:.0f}s)",
        file=sys.stderr,
    )
    return output


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
        manifest={},
    )


def _manifest(spec: ModelSpec, src: convert.Source, parity: verify.Parity, seconds: float) -> dict:
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
        "precision": {"weights": "fp32", "activations": "fp32", "kv_cache": "fp32", "quantization": None},
        "fidelity": {"reference": "pytorch fp32 (transformers, eager attention)", **parity.to_dict()},
        "export": {"task": convert.TASK, "seconds": round(seconds, 1)},
        "versions": _versions(),
    }
