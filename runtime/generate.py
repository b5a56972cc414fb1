"""generate(): the decode loop. Prefill once, then one cached step per token; yields ids as they come."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .kv_cache import KVCache
from .session import Session


def greedy_token(logits: np.ndarray, banned: int | None = None) -> int:
    """argmax, optionally with one token (eos, before min_new_tokens) excluded."""
    if banned is None:
        return int(np.argmax(logits))
    saved = logits[banned]
    logits[banned] = -np.inf
    token = int(np.argmax(logits))
    logits[banned] = saved
    return token


def generate(
    session: Session,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    cache: KVCache | None = None,
    stop_at_eos: bool = True,
) -> Iterator[int]:
    """Greedy decoding. Yields new token ids; the eos that ends a reply is not yielded.

    `cache` (if given) already holds the positions before `prompt_ids`, and is left
    holding everything fed to the model; the last yielded token is not fed (no
    step is wasted on a token whose logits nobody reads).
    """
    if max_new_tokens < 0 or min_new_tokens < 0:
        raise ValueError("max_new_tokens and min_new_tokens must be >= 0")
    if max_new_tokens == 0:
        return
    eos = session.spec.eos_token_id
    cache = cache if cache is not None else session.new_cache()
    logits = session.prefill(prompt_ids, cache)
    for n in range(max_new_tokens):
        token = greedy_token(logits, banned=eos if n < min_new_tokens else None)
        if stop_at_eos and token == eos:
            return
        yield token
        if n + 1 < max_new_tokens:
            logits = session.decode_step(token, cache)
