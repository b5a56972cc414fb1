"""Chat: DialoGPT's multi-turn format, a history budget in tokens, and the KV cache kept across turns."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError, is_int_in
from .generate import generate
from .sampling import SamplingConfig, SamplingConfigError, config_or
from .session import Session
from .tokenizer import Tokenizer

DEFAULT_HISTORY_TOKENS = 256
# When the history outgrows its budget, old turns go until it fills at most this share of it.
# Every trim costs a rebuild of the cache from position 0 (see respond()); trimming to the
# budget exactly made every later turn a rebuild, trimming to 3/4 leaves room for a few turns.
# Held-out chitchat conversations of 20 user turns, 32-token replies, budget 256: prompt tokens
# per turn 172 -> 77 and first token 113-132 -> 56-59 ms on the DialoGPT-small shape (int8),
# 127 -> 50 and 15.4 -> 6.9 ms on the shipped model (benchmarks/results/experiments.md).
TRIM_TO = 0.75


@dataclass
class Turn:
    speaker: str  # "user" or "bot"
    ids: list[int]  # the turn's tokens, ending with eos


@dataclass
class ChatStats:
    prefill_tokens: list[int] = field(default_factory=list)  # tokens prefilled per user turn
    rebuilds: int = 0  # times the cache was rebuilt from position 0 after dropping turns
    regenerations: int = 0  # replies regenerated because they repeated the previous one


class Chat:
    """One conversation. respond() streams the bot's reply ids; reply() joins them into text.

    DialoGPT's format: every turn, the user's and the bot's, is followed by the eos token,
    and the model continues the concatenation. The cache keeps everything already fed,
    so a new user turn prefills only its own tokens (plus the tail of the last reply).
    """

    def __init__(
        self,
        session: Session,
        tokenizer: Tokenizer,
        config: SamplingConfig | None = None,
        *,
        history_tokens: int | None = None,
        penalize_whole_history: bool = False,
        max_regenerations: int = 2,
        reuse_cache: bool = True,
    ):
        self.session = session
        self.tokenizer = tokenizer
        self.config = config_or(config, SamplingConfig)
        n_positions = session.spec.n_positions
        if self.config.max_new_tokens < 1:  # every reply would be empty
            raise SamplingConfigError(
                "max_new_tokens", f"max_new_tokens must be at least 1 in a chat, got {self.config.max_new_tokens}"
            )
        limit = n_positions - self.config.max_new_tokens
        if limit < 1:  # no room left for even one token of history
            raise SamplingConfigError(
                "max_new_tokens",
                f"max_new_tokens must be below the model's {n_positions} positions, got {self.config.max_new_tokens}"
            )
        if history_tokens is None:  # the default adapts to models with fewer positions
            history_tokens = max(1, min(DEFAULT_HISTORY_TOKENS, limit))
        if not is_int_in(history_tokens, 1, limit):
            raise SamplingConfigError(
                "history_tokens",
                f"history_tokens must be an integer between 1 and {limit} (the model's {n_positions} positions minus "
                f"max_new_tokens {self.config.max_new_tokens}), got {history_tokens!r}"
            )
        self.history_tokens = history_tokens
        self.penalize_whole_history = penalize_whole_history
        self.max_regenerations = max_regenerations
        self.reuse_cache = reuse_cache  # False re-prefills the whole history every turn (for comparison)
        self.eos = session.spec.eos_token_id
        self.rng = np.random.default_rng(self.config.seed)
        self.cache = session.new_cache()
        self.turns: list[Turn] = []
        self._fed: list[int] = []  # exactly the ids the cache holds, in order
        self.stats = ChatStats()

    def reset(self) -> None:
        """Forget the conversation (the sampler's random state goes on)."""
        self.turns.clear()
        self.cache.reset()
        self._fed = []

    def context_ids(self) -> list[int]:
        return [i for turn in self.turns for i in turn.ids]

    def reply(self, text: str) -> str:
        return self.tokenizer.decode(list(self.respond(text)))

    def respond(self, text: str) -> Iterator[int]:
        """Add a user turn and stream the reply's token ids (the closing eos is not yielded).

        Closing the iterator early (Ctrl-C) keeps what was yielded as the bot's turn.
        """
        if not isinstance(text, str):
            raise TypeError(f"a message is a str, not {type(text).__name__}")
        if not text.strip():
            raise UserError("empty message (type something to say)")
        user_ids = self.tokenizer.encode_turn(text)
        if len(user_ids) > self.history_tokens:  # one huge message: keep its end
            user_ids = user_ids[-self.history_tokens :]
        self.turns.append(Turn("user", user_ids))
        self._trim()
        context = self.context_ids()

        # Reuse the longest cached prefix of the new context. After turns were dropped that
        # prefix is empty: GPT-2's positions are absolute (learned per index), so keys cached
        # at the old positions are wrong for the shifted history and cannot be moved; the
        # cache is rebuilt from position 0.
        keep = min(_common_prefix(self._fed, context), len(context) - 1) if self.reuse_cache else 0
        if keep < len(self._fed):
            if keep == 0 and self.reuse_cache:
                self.stats.rebuilds += 1
            self.cache.truncate(keep)
            self._fed = self._fed[:keep]
        feed = context[keep:]
        self.stats.prefill_tokens.append(len(feed))

        previous = next((t.ids[:-1] for t in reversed(self.turns[:-1]) if t.speaker == "bot"), None)
        history = context if self.penalize_whole_history else [i for t in self.turns if t.speaker == "bot" for i in t.ids]
        reply: list[int] = []
        shown = 0
        try:
            for attempt in range(self.max_regenerations + 1):
                config = self.config
                if attempt:
                    # a reply that repeats the previous one word for word: rewind to the end of the
                    # context and try again with a stronger repetition penalty (and a fresh draw)
                    self.stats.regenerations += 1
                    config = config.replace(repetition_penalty=max(config.repetition_penalty, 1.0) * 1.5**attempt)
                    self.cache.truncate(len(context) - 1)
                    self._fed = context[:-1]
                    feed = context[-1:]
                reply = []
                for token in generate(
                    self.session, feed, config, rng=self.rng, cache=self.cache, history=history
                ):
                    reply.append(token)
                    # while the reply copies the previous one, hold it back: it may be thrown away
                    if shown == 0 and previous is not None and reply == previous[: len(reply)]:
                        continue
                    while shown < len(reply):
                        shown += 1
                        yield reply[shown - 1]
                if shown == 0 and reply and reply == previous and attempt < self.max_regenerations:
                    continue
                break
            while shown < len(reply):  # out of attempts: show the repeat after all
                shown += 1
                yield reply[shown - 1]
        finally:  # however the reply ended (done, regenerated, closed by Ctrl-C), the cache holds a prefix of this
            self._fed = (context + reply)[: self.cache.length]
            self.turns.append(Turn("bot", reply[:shown] + [self.eos]))

    def _trim(self) -> None:
        """If the history is over budget, drop whole turns, oldest first, down to TRIM_TO of it."""
        total = sum(len(t.ids) for t in self.turns)
        if total <= self.history_tokens:
            return
        target = int(self.history_tokens * TRIM_TO)
        while total > target and len(self.turns) > 1:
            total -= len(self.turns.pop(0).ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
