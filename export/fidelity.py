"""Quantized against fp32, teacher-forced on held-out dialogs: top-1 agreement, KL divergence, perplexities."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dialogpt_edge.runtime.session import Session
from dialogpt_edge.runtime.tokenizer import Tokenizer

from . import dialogs

DEFAULT_TOKENS = 8192
MIN_TOKENS = 256  # fewer and the perplexity ratio is noise, yet would be recorded as a measurement


@dataclass(frozen=True)
class Fidelity:
    data: str
    conversations: int
    tokens: int  # next-token predictions compared
    top1_agreement: float
    mean_kl: float  # KL(fp32 || quantized), nats per token
    perplexity_fp32: float
    perplexity_quantized: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_quantized / self.perplexity_fp32

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio}

    def table(self, scheme: str) -> str:
        rows = [
            ("held-out tokens", f"{self.tokens} ({self.conversations} conversations)"),
            ("next-token top-1 agreement", f"{self.top1_agreement:.2%}"),
            ("mean KL(fp32 || quantized)", f"{self.mean_kl:.4f} nats"),
            ("perplexity fp32", f"{self.perplexity_fp32:.2f}"),
            (f"perplexity {scheme}", f"{self.perplexity_quantized:.2f} ({self.perplexity_ratio - 1:+.2%})"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def held_out_sequences(tokenizer: Tokenizer, max_tokens: int, n_positions: int) -> list[list[int]]:
    """Whole held-out conversations in the DialoGPT format, up to `max_tokens` in all."""
    return dialogs.sequences("held_out", tokenizer.encode, tokenizer.eos_token_id, max_tokens, n_positions)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def measure(reference: Session, quantized: Session, sequences: list[list[int]], *, progress=None) -> Fidelity:
    """Teacher-forced comparison; `progress`, if given, is called with the fraction of sequences done."""
    agree = kl = nll_ref = nll_q = 0.0
    count = 0
    for done, ids in enumerate(sequences, 1):
        lr = reference.forward(ids, reference.new_cache())[:-1]
        lq = quantized.forward(ids, quantized.new_cache())[:-1]
        targets = np.asarray(ids[1:])
        for start in range(0, len(targets), 128):  # float64 (rows, vocab) in slices
            a, b = _log_softmax(lr[start : start + 128]), _log_softmax(lq[start : start + 128])
            t = targets[start : start + 128]
            rows = np.arange(len(t))
            agree += float(np.sum(a.argmax(-1) == b.argmax(-1)))
            kl += float(np.sum(np.exp(a) * (a - b)))
            nll_ref -= float(np.sum(a[rows, t]))
            nll_q -= float(np.sum(b[rows, t]))
            count += len(t)
        if progress:
            progress(done / len(sequences))
    return Fidelity(
        data=f"chitchat-dataset held-out split ({dialogs.HELD_OUT_BELOW}/256 of conversations by sha256 of their id)",
        conversations=len(sequences),
        tokens=count,
        top1_agreement=agree / count,
        mean_kl=kl / count,
        perplexity_fp32=float(np.exp(nll_ref / count)),
        perplexity_quantized=float(np.exp(nll_q / count)),
    )
