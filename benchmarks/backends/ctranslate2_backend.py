"""CTranslate2's Generator (int8), converted from the same checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

PRECISIONS = ("int8", "fp32")


def available() -> str | None:
    from dialogpt_edge.benchmarks.backends import missing

    return missing("ctranslate2", "pip install ctranslate2", "ctranslate2")


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    from dialogpt_edge.benchmarks.backends import cached_conversion, conversion_stamp

    out = cache_dir / f"ctranslate2-{precision}"

    def convert(folder: Path) -> None:
        import ctranslate2

        quant = "int8" if precision == "int8" else "float32"
        ctranslate2.converters.TransformersConverter(str(checkpoint)).convert(str(folder), quantization=quant, force=True)

    # redone when this conversion or CTranslate2 changes
    cached_conversion(out, conversion_stamp(__file__, version()), convert)
    return out


def version() -> str:
    import ctranslate2

    return f"ctranslate2 {ctranslate2.__version__}"


class Runner:
    def __init__(self, artifact: Path, threads: int, precision: str = ""):
        import ctranslate2

        compute = "int8" if artifact.name.endswith("int8") else "float32"
        self.generator = ctranslate2.Generator(str(artifact), device="cpu", compute_type=compute, intra_threads=threads, inter_threads=1)
        vocab = (artifact / "vocabulary.json")
        import json

        self.tokens = json.loads(vocab.read_text()) if vocab.is_file() else None

    def generate(self, prompt_ids: list[int], n_new: int):
        prompt = [self.tokens[i] for i in prompt_ids]
        stamps, ids = [], []
        for step in self.generator.generate_tokens(prompt, max_length=n_new, min_length=n_new, sampling_topk=1):
            stamps.append(time.perf_counter())
            ids.append(step.token_id)
        return ids, stamps
