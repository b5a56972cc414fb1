"""The chitchat-dataset corpus in DialoGPT's format, with a fixed split by whole conversations.

Used to train the shipped model (models/train_chitchat.py) and to measure quantized
fidelity on conversations that model never saw.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

# A conversation is held out when the first byte of sha256(conversation id) is below
# this (13/256 = 5.1%): independent of file order and of Python's hash seed.
HELD_OUT_BELOW = 13


def corpus_path() -> Path:
    try:
        import chitchat_dataset
    except ImportError:
        from dialogpt_edge.runtime.errors import UserError

        raise UserError("the dialog corpus needs the chitchat-dataset package (pip install chitchat-dataset)") from None
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


def is_held_out(conversation_id: str) -> bool:
    return hashlib.sha256(conversation_id.encode()).digest()[0] < HELD_OUT_BELOW


def conversations(split: str) -> Iterator[list[str]]:
    """Conversations of 'train' or 'held_out' as lists of turns, in a stable order.

    Consecutive messages of one speaker are one turn, joined by spaces.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', not {split!r}")
    data = json.loads(corpus_path().read_text())
    for conv_id in sorted(data):
        if is_held_out(conv_id) != (split == "held_out"):
            continue
        turns: list[str] = []
        last_sender = None
        for group in data[conv_id]["messages"]:
            for message in group:
                text = " ".join(message["text"].split())
                if not text:
                    continue
                if message["sender"] == last_sender:
                    turns[-1] += " " + text
                else:
                    turns.append(text)
                    last_sender = message["sender"]
        if len(turns) >= 2:
            yield turns


def encode_conversation(turns: list[str], encode, eos_token_id: int) -> list[int]:
    """DialoGPT's format: every turn followed by the eos token."""
    ids: list[int] = []
    for turn in turns:
        ids.extend(encode(turn))
        ids.append(eos_token_id)
    return ids


def sequences(split: str, encode, eos_token_id: int, max_tokens: int, n_positions: int) -> list[list[int]]:
    """Whole conversations of `split` in the DialoGPT format, each opened by an eos (as between
    turns) and cut to the model's positions, until `max_tokens` next-token predictions in all."""
    out, total = [], 0
    for turns in conversations(split):
        ids = [eos_token_id] + encode_conversation(turns, encode, eos_token_id)[: n_positions - 1]
        out.append(ids[: max(2, max_tokens - total + 1)])
        total += len(out[-1]) - 1
        if total >= max_tokens:
            break
    return out
