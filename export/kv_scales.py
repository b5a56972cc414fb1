"""Fixed per-channel scales for an int8 KV cache, measured on training-split dialogs.

onnxruntime's GroupQueryAttention quantizes each new key and value on write with scales
given in the graph (one per head channel: int8 * scale is the value read back). Here
the fp32 graph runs over dialogs from the corpus's training split (never the held-out
split the fidelity figures come from), and each channel's scale is the largest
magnitude it took there over 127. Values beyond that range saturate when the cache is
written.
"""

from __future__ import annotations

import numpy as np

from dialogpt_edge.runtime.session import Session

from . import dialogs

DEFAULT_TOKENS = 8192


def calibrate(session: Session, sequences: list[list[int]], *, progress=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the (n_embd,) key and value scales; `session` must keep a float cache.

    `progress`, if given, is called with the fraction of sequences done after each one."""
    spec = session.spec
    k_max = np.zeros((spec.n_layer, spec.n_head, spec.head_dim), np.float32)
    v_max = np.zeros_like(k_max)
    for done, ids in enumerate(sequences, 1):
        cache = session.new_cache(len(ids))
        session.forward(ids, cache, all_logits=False)
        for i in range(spec.n_layer):
            # (1, heads, positions, head_dim) -> the largest magnitude of each head channel
            np.maximum(k_max[i], np.abs(cache.keys[i][0, :, : cache.length]).max(axis=1), out=k_max[i])
            np.maximum(v_max[i], np.abs(cache.values[i][0, :, : cache.length]).max(axis=1), out=v_max[i])
        if progress:
            progress(done / len(sequences))
    return [(_scale(k_max[i]), _scale(v_max[i])) for i in range(spec.n_layer)]


def _scale(absmax: np.ndarray) -> np.ndarray:
    # a channel that never moved still needs a usable, positive scale
    return (np.where(absmax > 0, absmax, 1.0) / 127.0).astype(np.float32).reshape(-1)


def training_sequences(encode, eos_token_id: int, max_tokens: int, n_positions: int) -> list[list[int]]:
    return dialogs.sequences("train", encode, eos_token_id, max_tokens, n_positions)
