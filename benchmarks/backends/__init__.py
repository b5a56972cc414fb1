"""One module per system under test. Each defines PRECISIONS, available(), prepare() and Runner.

prepare(checkpoint, cache_dir, precision) builds what the backend loads (in the parent,
untimed); Runner(artifact, threads, precision) loads it (timed, in the worker process) and
Runner.generate(prompt_ids, n_new) decodes exactly n_new tokens greedily (eos ignored),
returning the ids and a perf_counter stamp per token.
"""

from __future__ import annotations

import importlib

BACKENDS = {
    "ours": "dialogpt_edge.benchmarks.backends.ours",
    "pytorch": "dialogpt_edge.benchmarks.backends.torch_hf",
    "optimum": "dialogpt_edge.benchmarks.backends.optimum_ort",
    "ctranslate2": "dialogpt_edge.benchmarks.backends.ctranslate2_backend",
    "llamacpp": "dialogpt_edge.benchmarks.backends.llamacpp",
}


def backend_module(name: str):
    if name not in BACKENDS:
        from dialogpt_edge.runtime.errors import UserError

        raise UserError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name])


def check_precisions(precisions: list[str]) -> None:
    """A precision no backend knows is a typo: fail before any work, not after a run that skipped it."""
    known = list(dict.fromkeys(p for name in BACKENDS for p in backend_module(name).PRECISIONS))
    for precision in precisions:
        if precision not in known:
            from dialogpt_edge.runtime.errors import UserError

            raise UserError(f"unknown precision {precision!r} (choose from: {', '.join(known)})")
