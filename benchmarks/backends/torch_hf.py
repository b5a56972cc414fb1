"""The baseline: PyTorch transformers generate() with its KV cache, fp32 (eager CPU)."""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("fp32",)  # torch's dynamic int8 targets nn.Linear; GPT-2's Conv1D layers are not Linear


def available() -> str | None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return "torch/transformers not installed (pip install 'dialogpt-edge[export]')"
    return None


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    return checkpoint


def version() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__} / transformers {transformers.__version__}"


class Runner:
    def __init__(self, artifact: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()

    def generate(self, prompt_ids: list[int], n_new: int):
        from .streamer import StampStreamer

        streamer = StampStreamer()
        x = self.torch.tensor([prompt_ids])
        with self.torch.inference_mode():
            out = self.model.generate(
                x, attention_mask=self.torch.ones_like(x), do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                pad_token_id=self.model.config.eos_token_id, streamer=streamer,
            )
        return out[0, len(prompt_ids):].tolist(), streamer.stamps
