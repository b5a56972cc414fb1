"""Display-only tidying of DialoGPT's tokenized-text habits ("it ." -> "it.", "don 't" -> "don't")."""

from __future__ import annotations

import re

# DialoGPT's Reddit training text was tokenized with spaces before punctuation and
# inside contractions; its replies copy that. Only spaces are ever removed.
_SPACE_BEFORE_PUNCT = re.compile(r"(?<=\S) +(?=[.,!?;:%)\]](?:\s|$|[.,!?]))")
_SPACE_IN_CONTRACTION = re.compile(r"(?<=\w) +(?=(?:n't|'t|'s|'re|'ve|'ll|'d|'m)\b)", re.IGNORECASE)
_SPACE_AFTER_OPEN = re.compile(r"(?<=[(\[]) +")
_SAFE_CUT = re.compile(r"(?<= )(?=[^\W_nN])")  # see TidyStream._forget_emitted_start


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
        self._forget_emitted_start()
        return out

    def _forget_emitted_start(self) -> None:
        """Drop raw text whose tidied form is emitted and final, so that each push re-tidies a few words,
        not the whole reply (re-tidying all of it took 0.3 ms a token by token 1,000).

        A cut just after a space and before a letter or digit other than n (which may begin "n't")
        is one no rule looks across: that space run is followed by neither punctuation nor a
        contraction, and every rule's look-behind after the cut stays after it. So tidy(raw) is
        tidy(head) + tidy(tail) there.
        """
        for cut in reversed([m.start() for m in _SAFE_CUT.finditer(self._raw)]):
            head = len(tidy(self._raw[:cut]))
            if head <= self._emitted:
                self._raw = self._raw[cut:]
                self._emitted -= head
                return

    def flush(self) -> str:
        if not self.enabled:
            return ""
        text = tidy(self._raw)
        out = text[self._emitted :]
        self._emitted = len(text)
        return out
