"""This project's runtime, on a model folder it exported."""

from __future__ import annotations

import time
from pathlib import Path

PRECISIONS = ("fp32", "int8", "int4")


def available() -> str | None:
    return None


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    from dialogpt_edge.export.pipeline import export_model
    from dialogpt_edge.runtime import ModelFolderError, load

    out = cache_dir / f"ours-{precision}"
    try:
        load(out, verify_checksums=False)
    except ModelFolderError:  # not there yet, or written by an older version of the exporter
        export_model(str(checkpoint), out, force=True, quantize="none" if precision == "fp32" else precision, fidelity_tokens=2048)
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
