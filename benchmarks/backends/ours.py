"""This project's runtime, on a model folder it exported."""

from __future__ import annotations

import time
from pathlib import Path

# -kv16: the same weights with an fp16 KV cache (export --kv-cache fp16)
PRECISIONS = ("fp32", "int8", "int4", "fp32-kv16", "int8-kv16", "int4-kv16")


def available() -> str | None:
    return None


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    from dialogpt_edge.export.pipeline import export_model
    from dialogpt_edge.runtime import ModelFolderError, load, open_model

    out = cache_dir / f"ours-{precision}"
    try:
        load(out, verify_checksums=False)
    except ModelFolderError:  # not there yet, or written by an older version of the exporter
        weights, _, kv = precision.partition("-kv")
        export_model(str(checkpoint), out, force=True, quantize="none" if weights == "fp32" else weights,
                     kv_cache="fp16" if kv == "16" else "fp32", fidelity_tokens=2048)
    # the first open on a machine writes this CPU's prepacked copy (runtime/prepacked.py); runs then
    # measure what every later launch costs, as a user's second chat does
    open_model(out)
    return out


def version() -> str:
    from importlib import metadata

    return f"dialogpt-edge {metadata.version('dialogpt-edge')} / onnxruntime {metadata.version('onnxruntime')}"


class Runner:
    def __init__(self, artifact: Path, threads: int):
        from dialogpt_edge.runtime import open_model

        self.session = open_model(artifact, threads=threads)

    def generate(self, prompt_ids: list[int], n_new: int):
        from dialogpt_edge.runtime import SamplingConfig, generate

        stamps, ids = [], []
        for token in generate(self.session, prompt_ids, SamplingConfig.greedy(), max_new_tokens=n_new, min_new_tokens=n_new):
            stamps.append(time.perf_counter())
            ids.append(token)
        return ids, stamps
