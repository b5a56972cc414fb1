"""transformers' own generate() loop, timed per token by a streamer (PyTorch and optimum both decode through it)."""

from __future__ import annotations

import time


class StampStreamer:
    def __init__(self):
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model, prompt_ids: list[int], n_new: int) -> tuple[list[int], list[float]]:
    """Greedy generate() of exactly n_new tokens (eos banned), with a time stamp per token."""
    import torch

    streamer = StampStreamer()
    x = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
            pad_token_id=model.config.eos_token_id, streamer=streamer,
        )
    return out[0, len(prompt_ids):].tolist(), streamer.stamps
