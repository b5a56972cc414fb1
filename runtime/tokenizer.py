"""Tokenizer: DialoGPT's text <-> ids (GPT-2 byte-level BPE), and TextStream for UTF-8-safe streaming."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelFolderError, first_line


class Tokenizer:
    def __init__(self, path: str | Path, eos_token_id: int):
        # imported here: a process that decodes token ids (a benchmark worker, a server's batcher)
        # does not need the library's 4-5 MiB
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises untyped errors
            raise ModelFolderError(
                f"cannot read tokenizer {path} with tokenizers {tokenizers.__version__}: {first_line(e)} "
                f"({_fix_for(tokenizers.__version__)})"
            ) from None
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(_valid_unicode(text), add_special_tokens=False).ids

    def encode_turn(self, text: str) -> list[int]:
        """One DialoGPT turn: the text followed by the eos token."""
        return self.encode(text) + [self.eos_token_id]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


# tokenizer.json as transformers and tokenizers write it today stores BPE merges as pairs; tokenizers
# 0.19 and older read only "a b" strings and reject the file (checked: 0.15.2 and 0.19.1 fail, 0.20.0
# reads it). The exporter writes strings (export/pipeline.py: write_tokenizer), which 0.13.3 reads;
# folders exported before it did keep pairs, and need this version.
MIN_TOKENIZERS = (0, 20)


def _fix_for(version: str) -> str:
    """What to do about a tokenizer.json that this tokenizers version cannot read."""
    needed = ".".join(map(str, MIN_TOKENIZERS))
    try:
        too_old = tuple(int(part) for part in version.split(".")[:2]) < MIN_TOKENIZERS
    except ValueError:  # a development build: say both
        return f"pip install -U 'tokenizers>={needed}', or re-export the model"
    if too_old:
        return f"this file needs tokenizers >= {needed}: pip install -U 'tokenizers>={needed}', or re-export the model"
    return "re-export the model"


def _valid_unicode(text: str) -> str:
    """`text` with its lone surrogates replaced by U+FFFD, which tokenizers accepts.

    Bytes that are not UTF-8 on a command line or a terminal reach Python as lone
    surrogates (its surrogateescape handler); the tokenizers library refuses those
    strings outright. The bytes are restored and decoded leniently, so the valid text
    around them survives.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (from JSON, say)
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


class TextStream:
    """Turns a stream of ids into text chunks, never emitting half a UTF-8 character.

    Byte-level BPE can split one character (an emoji, say) over several tokens; the
    partial decode ends in U+FFFD until the last piece arrives, so hold text back
    while it does. Each push decodes only the ids since the last chunk and the one
    chunk's worth before them (for decoders that look at a token's neighbour), not the
    whole reply: decoding all of it per token grew to 0.17 ms a token by token 1,000.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the ids decoded as context for the next chunk
        self._read = 0  # end of the ids whose text has been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._next_chunk(final=False)

    def flush(self) -> str:
        return self._next_chunk(final=True)

    def _next_chunk(self, final: bool) -> str:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read])
        text = decode(self._ids[self._prefix :])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]
