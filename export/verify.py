"""PyTorch vs the exported graph, side by side: greedy ids and logits at every position."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dialogpt_edge.runtime.errors import UserError
from dialogpt_edge.runtime.generate import generate
from dialogpt_edge.runtime.session import Session

# Dialog-shaped prompts: one turn, a multi-turn eos-joined history, non-ASCII text.
VERIFY_TURNS: tuple[tuple[str, ...], ...] = (
    ("Hello, how are you?",),
    ("Does money buy happiness?",),
    ("Hi there!", "Hey, what's up?", "Not much, just got back from the beach."),
    ("Café au lait or a flat white? ☕ Je préfère le thé.",),
)
# The bound on |onnx - torch| logits is 1e-4, widened in proportion to the logits'
# scale: fp32 reassociation error grows with the magnitudes summed. Measured on a
# DialoGPT-small-shaped model with logits up to 14: torch against itself at 1 vs 2
# threads differs by 2.6e-5, onnxruntime against torch by 7e-5 to 1.2e-4.
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 2e-5


def logit_bound(reference_absmax: float) -> float:
    return max(LOGIT_ATOL, LOGIT_RTOL * reference_absmax)


class ParityError(UserError):
    """The exported graph does not reproduce PyTorch."""


@dataclass(frozen=True)
class Parity:
    prompts: int
    new_tokens: int
    greedy_ids_equal: bool
    max_abs_logit_diff: float
    max_abs_logit: float
    tolerance: float

    def to_dict(self) -> dict:
        return asdict(self)


def torch_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """transformers' own greedy generate; new ids, with the eos that ended it removed."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
    new = out[0, len(prompt_ids) :].tolist()
    return new[:-1] if new and new[-1] == eos_token_id else new


def torch_logits(model, ids: list[int]) -> np.ndarray:
    """Logits at every position from one full, uncached forward pass: (len(ids), vocab)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def cached_logits(session: Session, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
    """Logits from the runtime: the prompt in one prefill, then one cached step per token."""
    cache = session.new_cache()
    rows = [session.forward(prompt_ids, cache)]
    for token in continuation:
        rows.append(session.forward([token], cache))
    return np.concatenate(rows, axis=0)


def check_parity(
    session: Session,
    model,
    prompts: list[list[int]],
    *,
    new_tokens: int = 32,
    progress=None,
) -> Parity:
    """Greedy ids must be equal, and logits within logit_bound() at every prompt and decode position."""
    eos = session.spec.eos_token_id
    positions = session.spec.n_positions
    max_diff = 0.0
    max_logit = 0.0
    for done, prompt in enumerate(prompts, 1):
        # a model with few positions gets the end of each prompt and a continuation that fits after it
        prompt = prompt[-max(1, positions // 2):]
        n_new = min(new_tokens, positions - len(prompt))
        expected = torch_greedy(model, prompt, n_new, eos)
        got = list(generate(session, prompt, max_new_tokens=n_new))
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise ParityError(
                f"greedy ids differ from PyTorch at new token {first} of a {len(prompt)}-token prompt "
                f"(onnx {got[first:first + 3]}, torch {expected[first:first + 3]}; re-run with --debug and report it)"
            )
        reference = torch_logits(model, prompt + expected)
        ours = cached_logits(session, prompt, expected)
        diff = float(np.max(np.abs(ours - reference)))
        max_diff = max(max_diff, diff)
        max_logit = max(max_logit, float(np.max(np.abs(reference))))
        if progress:
            progress(done / len(prompts))
    tolerance = logit_bound(max_logit)
    if max_diff > tolerance:
        raise ParityError(
            f"exported logits differ from PyTorch by {max_diff:.2e}, more than {tolerance:.1e} "
            "(re-run with --debug and report it)"
        )
    return Parity(
        prompts=len(prompts),
        new_tokens=new_tokens,
        greedy_ids_equal=True,
        max_abs_logit_diff=max_diff,
        max_abs_logit=max_logit,
        tolerance=tolerance,
    )
