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
    "genai": "dialogpt_edge.benchmarks.backends.genai",
    "openvino": "dialogpt_edge.benchmarks.backends.openvino_backend",
}


def missing(package: str, install: str, *modules: str) -> str | None:
    """available()'s answer for a peer that needs `modules`: None when all of them import, else why
    not in one line (not installed, with the command that installs `package`, or installed but not loading)."""
    from dialogpt_edge.runtime.errors import first_line

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{package} not installed ({install})"
        except Exception as e:  # built against another library version, a missing system library
            return f"{package} does not load: {first_line(e)}"
    return None


STAMP = "conversion-stamp"


def conversion_stamp(module_file: str, *inputs: str) -> str:
    """What decides a converted peer artifact: the converting module's source and what it converted
    from (a cached conversion made by older code is redone, as ours' exports are)."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(Path(module_file).read_bytes())
    for part in inputs:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def cached_conversion(out, stamp: str, write) -> None:
    """Make the folder `out` with write(folder) unless it already holds `stamp`: written in a staging
    folder beside it and renamed into place, so a conversion cut short is never taken for a finished one."""
    import shutil
    import tempfile
    from pathlib import Path

    from dialogpt_edge.export.pipeline import install_folder

    if (out / STAMP).is_file() and (out / STAMP).read_text() == stamp:
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write(staging)
        (staging / STAMP).write_text(stamp)
        install_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what a failed write left


def backend_module(name: str):
    if name not in BACKENDS:
        from dialogpt_edge.runtime.errors import UserError

        raise UserError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name])


def check_selection(backends: list[str], precisions: list[str], *, backends_given: bool, precisions_given: bool) -> None:
    """Fail before any work on a selection that would silently measure less than was asked for.

    A precision no backend knows is a typo. What the user named must also meet: each backend
    they named runs at least one of the precisions, and each precision they named is run by at
    least one of the backends (defaults are lenient: a default backend runs what it supports).
    """
    from dialogpt_edge.runtime.errors import UserError

    supported = {name: backend_module(name).PRECISIONS for name in BACKENDS}
    known = list(dict.fromkeys(p for runs in supported.values() for p in runs))
    for precision in precisions:
        if precision not in known:
            raise UserError(f"unknown precision {precision!r} (choose from: {', '.join(known)})")
    if backends_given:
        for name in backends:
            # the PyTorch baseline always runs fp32: every ratio is taken against it
            if name != "pytorch" and not set(precisions) & set(supported[name]):
                raise UserError(f"{name} runs none of the precisions {','.join(precisions)} "
                                f"(add one of {', '.join(supported[name])} to --precisions)")
    if precisions_given:
        for precision in precisions:
            if not any(precision in supported[name] for name in backends):
                runners = [name for name in BACKENDS if precision in supported[name]]
                raise UserError(f"no backend of {','.join(backends)} runs precision {precision} "
                                f"(add {' or '.join(runners)} to --backends)")
