"""The baseline: PyTorch transformers generate() with its KV cache, fp32 (eager CPU)."""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("fp32",)  # torch's dynamic int8 targets nn.Linear; GPT-2's Conv1D layers are not Linear


def available() -> str | None:
    from dialogpt_edge.benchmarks.backends import missing

    return missing("torch/transformers", "pip install 'dialogpt-edge[export]'", "torch", "transformers")


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    return checkpoint


def version() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__} / transformers {transformers.__version__}"


class Runner:
    def __init__(self, artifact: Path, threads: int, precision: str = ""):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(artifact).float().eval()  # fp32 in every transformers version

    def generate(self, prompt_ids: list[int], n_new: int):
        from .streamer import timed_generate

        return timed_generate(self.model, prompt_ids, n_new)
