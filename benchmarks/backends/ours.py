"""This project's runtime, on a model folder it exported."""

from __future__ import annotations

import time
from pathlib import Path

# A plain precision is what `export --quantize` writes by default (int8 KV cache for int8 / int4,
# fp32 for fp32); -kv8 / -kv16 / -kv32 pick the cache; -prepacked runs the same folder from this CPU's
# prepacked copy (runtime/prepacked.py), written by prepare(), untimed, so runs measure later launches.
_WEIGHTS = ("fp32", "int8", "int4")
_CACHES = {"8": "int8", "16": "fp16", "32": "fp32"}
PRECISIONS = (*_WEIGHTS, *(f"{w}-kv{b}" for w in _WEIGHTS for b in _CACHES), *(f"{w}-prepacked" for w in _WEIGHTS))
PREPACKED = "-prepacked"


def _parse(precision: str) -> tuple[str, str]:
    """A bench precision -> (export's --quantize, the KV cache dtype it runs with: "int8", "fp16" or "fp32")."""
    from dialogpt_edge.export.builder import default_cache_dtype

    weights, _, kv = precision.removesuffix(PREPACKED).partition("-kv")
    quantize = "none" if weights == "fp32" else weights
    return quantize, _CACHES.get(kv) or default_cache_dtype(quantize)


def cache_dtype(precision: str) -> str:
    return _parse(precision)[1]


def available() -> str | None:
    return None


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    from dialogpt_edge.export.pipeline import export_model
    from dialogpt_edge.runtime import ModelFolderError, load, open_model
    from dialogpt_edge.runtime.session import runs_cached_copy

    quantize, kv = _parse(precision)
    weights = "fp32" if quantize == "none" else quantize
    suffix = next(bits for bits, dtype in _CACHES.items() if dtype == kv)
    out = cache_dir / f"ours-{weights}-kv{suffix}"  # named by what it holds: "int8" and "int8-kv8" share it
    stamp, current = out.with_name(out.name + ".exporter"), exporter_stamp()
    try:
        load(out, verify_checksums=False)
        fresh = stamp.read_text() == current
    except (ModelFolderError, OSError):  # not there yet, or from a runtime that cannot read it
        fresh = False
    if not fresh:  # also when another exporter wrote it: its graph may differ from what this one writes
        export_model(str(checkpoint), out, force=True, quantize=quantize, kv_cache=kv, fidelity_tokens=2048)
        stamp.write_text(current)
    # this CPU's copy of the graph, if its runs will use one (the prepacked copy, or an int8 folder's u8
    # copy where u8 x s8 kernels clamp: runtime/prepacked.py), written here, untimed, as a later launch finds it
    prepack = precision.endswith(PREPACKED)
    if runs_cached_copy(load(out, verify_checksums=False), prepack):
        open_model(out, prepack=prepack)
    return out


def exporter_stamp() -> str:
    """What decides a cached export's graph: this package's version and its exporter's source."""
    import hashlib

    from dialogpt_edge import export

    digest = hashlib.sha256(version().encode())
    for source in sorted(Path(export.__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def version() -> str:
    from importlib import metadata

    return f"dialogpt-edge {metadata.version('dialogpt-edge')} / onnxruntime {metadata.version('onnxruntime')}"


class Runner:
    def __init__(self, artifact: Path, threads: int, precision: str = ""):
        from dialogpt_edge.runtime import open_model

        self.session = open_model(artifact, threads=threads, prepack=precision.endswith(PREPACKED))

    def generate(self, prompt_ids: list[int], n_new: int):
        from dialogpt_edge.runtime import SamplingConfig, generate

        stamps, ids = [], []
        for token in generate(self.session, prompt_ids, SamplingConfig.greedy(), max_new_tokens=n_new, min_new_tokens=n_new):
            stamps.append(time.perf_counter())
            ids.append(token)
        return ids, stamps
