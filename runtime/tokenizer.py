"""Tokenizer: DialoGPT's text <-> ids (GPT-2 byte-level BPE), and TextStream for UTF-8-safe streaming."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelFolderError


class Tokenizer:
    def __init__(self, path: str | Path, eos_token_id: int):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises untyped errors
            raise ModelFolderError(f"cannot read tokenizer {path}: {e} (re-export the model)") from None
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_turn(self, text: str) -> list[int]:
        """One DialoGPT turn: the text followed by the eos token."""
        return self.encode(text) + [self.eos_token_id]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Turns a stream of ids into text chunks, never emitting half a UTF-8 character.

    Byte-level BPE can split one character (an emoji, say) over several tokens; the
    partial decode ends in U+FFFD until the last piece arrives, so hold text back
    while it does.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        chunk = text[self._emitted :]
        self._emitted = len(text)
        return chunk

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids)
        chunk = text[self._emitted :]
        self._emitted = len(text)
        return chunk
