"""Display-only tidying of DialoGPT's tokenized-text habits ("it ." -> "it.", "don 't" -> "don't")."""

from __future__ import annotations

import re

# DialoGPT's Reddit training text was tokenized with spaces before punctuation and
# inside contractions; its replies copy that. Only spaces are ever removed.
_SPACE_BEFORE_PUNCT = re.compile(r"(?<=\S) +(?=[.,!?;:%)\]](?:\s|$|[.,!?]))")
_SPACE_IN_CONTRACTION = re.compile(r"(?<=\w) +(?=(?:n't|'t|'s|'re|'ve|'ll|'d|'m)\b)", re.IGNORECASE)
_SPACE_AFTER_OPEN = re.compile(r"(?<=[(\[]) +")


def tidy(text: str) -> str:
    text = _SPACE_IN_CONTRACTION.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub("", text)
    return _SPACE_AFTER_OPEN.sub("", text)


class TidyStream:
    """Applies tidy() to streamed text: trailing spaces wait until the next chunk shows
    whether punctuation follows them (tidy only ever removes spaces, so the rest is final)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._raw = ""
        self._emitted = 0

    def push(self, chunk: str) -> str:
        if not self.enabled:
            return chunk
        self._raw += chunk
        text = tidy(self._raw)
        # punctuation after a space can only be judged once the following character is known
        stable = len(text.rstrip(" .,!?;:%)]'"))
        stable = max(stable, self._emitted)
        out = text[self._emitted : stable]
        self._emitted = stable
        return out

    def flush(self) -> str:
        if not self.enabled:
            return ""
        text = tidy(self._raw)
        out = text[self._emitted :]
        self._emitted = len(text)
        return out
