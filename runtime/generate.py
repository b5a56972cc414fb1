"""generate(): the decode loop. Prefill once, then one cached step per token; yields ids as they come."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .errors import is_int_in
from .kv_cache import KVCache
from .sampling import NgramBans, SamplingConfig, config_or, sample_in_place
from .session import Session


def generate(
    session: Session,
    prompt_ids: Sequence[int],
    config: SamplingConfig | None = None,
    *,
    rng: np.random.Generator | None = None,
    cache: KVCache | None = None,
    history: Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
) -> Iterator[int]:
    """Yield new token ids; the eos that ends a reply is not yielded.

    `config` defaults to greedy. `cache` (if given) already holds the positions before
    `prompt_ids` and is left holding everything fed; the last yielded token is not fed
    (no step is spent on logits nobody reads). `history` is what the repetition
    penalty and the no-repeat n-gram ban look back on before this reply (default:
    `prompt_ids`, as transformers does); the reply's own tokens are added as they come.
    `max_new_tokens` / `min_new_tokens` override the config's. The reply also ends where the
    model's positions (or the cache's capacity) run out: at most `reply_room()` tokens.
    """
    if isinstance(prompt_ids, (str, bytes)):
        raise TypeError("prompt_ids are token ids: encode text first (tokenizer.encode_turn(text))")
    config = config_or(config, SamplingConfig.greedy)
    max_new = config.max_new_tokens if max_new_tokens is None else max_new_tokens
    min_new = config.min_new_tokens if min_new_tokens is None else min_new_tokens
    if not (is_int_in(max_new, 0) and is_int_in(min_new, 0)):
        raise ValueError(f"max_new_tokens and min_new_tokens must be integers >= 0, got {max_new!r} and {min_new!r}")
    if max_new == 0:
        return
    if rng is None:
        rng = np.random.default_rng(config.seed)
    eos = session.spec.eos_token_id
    cache = cache if cache is not None else session.new_cache()
    plain_greedy = config.is_greedy and config.repetition_penalty == 1.0 and not config.no_repeat_ngram_size

    logits = session.prefill(prompt_ids, cache)  # a prompt that does not fit raises here
    max_new = min(max_new, reply_room(session, cache))
    # the ids the penalties look back on, grown in place: sample() reads them as an array every token
    earlier = prompt_ids if history is None else history
    seen = np.empty(len(earlier) + max_new, np.intp)
    seen[: len(earlier)] = earlier
    said = len(earlier)
    ngrams = NgramBans(config.no_repeat_ngram_size, seen[:said]) if config.no_repeat_ngram_size else None
    for n in range(max_new):
        ban = eos if n < min_new else None
        if plain_greedy:  # the fast path: an argmax, at most one token masked
            if ban is not None:
                logits[ban] = -np.inf  # logits is this step's own output buffer
            token = int(np.argmax(logits))
        else:
            # logits is this step's own buffer (or prefill's copy): sampled in place
            banned = ngrams.banned() if ngrams is not None else ()
            token = sample_in_place(logits, config, rng, penalty_ids=seen[:said], banned=banned, ban=ban)
        if token == eos:
            return
        yield token
        seen[said] = token
        said += 1
        if ngrams is not None:
            ngrams.add(token)
        if n + 1 < max_new:
            logits = session.decode_step(token, cache, copy=False)  # read before the next step


def reply_room(session: Session, cache: KVCache) -> int:
    """How many more tokens a reply can have after what `cache` holds.

    One more than the free positions: the last token of a reply is never fed.
    """
    return session.positions_left(cache) + 1
