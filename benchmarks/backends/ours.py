"""This project's runtime, on a model folder it exported."""

from __future__ import annotations

import time
from pathlib import Path

# -kv16: the same weights with an fp16 KV cache (export --kv-cache fp16)
# -prepacked: the same folder run from this CPU's prepacked copy (runtime/prepacked.py), written
# here, untimed, so runs measure what every launch after the first costs
PRECISIONS = ("fp32", "int8", "int4", "fp32-kv16", "int8-kv16", "int4-kv16", "fp32-prepacked", "int8-prepacked", "int4-prepacked")
PREPACKED = "-prepacked"


def available() -> str | None:
    return None


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    from dialogpt_edge.export.pipeline import export_model
    from dialogpt_edge.runtime import ModelFolderError, load, open_model

    prepacked = precision.endswith(PREPACKED)
    precision = precision.removesuffix(PREPACKED)  # same folder; only how it is opened differs
    out = cache_dir / f"ours-{precision}"
    try:
        load(out, verify_checksums=False)
    except ModelFolderError:  # not there yet, or written by an older version of the exporter
        weights, _, kv = precision.partition("-kv")
        export_model(str(checkpoint), out, force=True, quantize="none" if weights == "fp32" else weights,
                     kv_cache="fp16" if kv == "16" else "fp32", fidelity_tokens=2048)
    if prepacked:
        open_model(out, prepack=True)
    return out


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
