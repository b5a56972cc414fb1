"""llama.cpp through llama-cpp-python (Q8_0 / Q4_0 GGUF). Optional: it compiles on install."""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("q8_0", "q4_0")


def available() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python not installed (pip install 'dialogpt-edge[llamacpp]')"
    return "the GGUF conversion of GPT-2 checkpoints is not wired up yet"


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    raise NotImplementedError("llama.cpp backend: GGUF conversion not implemented")


def version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


class Runner:  # pragma: no cover - unavailable() keeps the harness from reaching it
    def __init__(self, artifact: Path, threads: int):
        raise NotImplementedError
