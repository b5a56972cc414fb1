"""The samplers: properties, equality with transformers' logits processors, seeded draws, a chi-square test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dialogpt_edge.runtime.sampling import (
    NgramBans,
    SamplingConfig,
    SamplingConfigError,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    banned_ngram_tokens,
    filtered_logits,
    sample,
    sample_in_place,
)

VOCAB = 200
seeds = st.integers(0, 2**32 - 1)


def random_logits(seed: int, scale: float = 3.0) -> np.ndarray:
    # continuous draws: no ties, whose order transformers leaves unspecified
    return (np.random.default_rng(seed).standard_normal(VOCAB) * scale).astype(np.float32)


def hf(processor, logits: np.ndarray, ids=()) -> np.ndarray:
    input_ids = torch.tensor([list(ids) or [0]], dtype=torch.long)
    return processor(input_ids, torch.from_numpy(logits.copy())[None])[0].numpy()


def kept(x: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(x)).tolist())


@settings(max_examples=60, deadline=None)
@given(seed=seeds, k=st.integers(1, VOCAB + 5))
def test_top_k_equals_transformers(seed, k):
    logits = random_logits(seed)
    ours = apply_top_k(logits, k)
    assert kept(ours) == kept(hf(TopKLogitsWarper(k), logits))
    assert len(kept(ours)) == min(k, VOCAB)
    assert np.all(ours[list(kept(ours))] >= np.max(ours[~np.isfinite(ours)], initial=-np.inf))


@settings(max_examples=80, deadline=None)
@given(seed=seeds, k=st.sampled_from([1, 2, 50, 700, 3141, 5000]), size=st.sampled_from([200, 5000, 50257]),
       layout=st.sampled_from(["random", "ascending", "descending", "sampled-low", "sampled-high"]),
       decimals=st.sampled_from([None, 1]))
def test_top_k_keeps_what_a_full_sort_keeps(seed, k, size, layout, decimals):
    """apply_top_k bounds the k-th largest from a strided subset first; whatever that subset holds, the kept
    set is every value >= the k-th largest of all, ties included."""
    logits = (np.random.default_rng(seed).standard_normal(size) * 3).astype(np.float32)
    if decimals is not None:  # many exact ties, some of them at the k-th value
        logits = np.round(logits, decimals).astype(np.float32)
    if layout in ("ascending", "descending"):
        logits = np.sort(logits)[:: 1 if layout == "ascending" else -1].copy()
    elif layout == "sampled-low":  # the subset's bound far below the answer: a large pool
        logits[::16] = logits.min() - 1
    elif layout == "sampled-high":  # the subset holds the largest values
        logits[::16] = np.sort(logits)[::-1][: logits[::16].size]
    logits[np.random.default_rng(seed + 1).integers(0, size, size // 10)] = -np.inf  # banned earlier
    k = min(k, size)
    expected = set(np.flatnonzero(logits >= np.sort(logits)[size - k]).tolist()) & kept(logits)
    assert kept(apply_top_k(logits, k)) == expected


@settings(max_examples=60, deadline=None)
@given(seed=seeds, p=st.floats(0.01, 1.0), scale=st.floats(0.1, 10))
def test_top_p_equals_transformers(seed, p, scale):
    logits = random_logits(seed, scale)
    ours = apply_top_p(logits, p)
    assert kept(ours) == kept(hf(TopPLogitsWarper(p), logits))
    # the kept set is the smallest most-likely set with mass >= p
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    keep = sorted(kept(ours), key=lambda i: -probs[i])
    assert probs[keep].sum() >= p - 1e-6 or len(keep) == VOCAB
    assert probs[keep[:-1]].sum() < p + 1e-6


@settings(max_examples=40, deadline=None)
@given(seed=seeds, t=st.floats(0.05, 5.0))
def test_temperature_equals_transformers(seed, t):
    logits = random_logits(seed)
    np.testing.assert_allclose(apply_temperature(logits, t), hf(TemperatureLogitsWarper(t), logits), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, penalty=st.floats(0.5, 3.0), ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30))
def test_repetition_penalty_equals_transformers(seed, penalty, ids):
    logits = random_logits(seed)
    expected = hf(RepetitionPenaltyLogitsProcessor(penalty), logits, ids)
    np.testing.assert_allclose(apply_repetition_penalty(logits, ids, penalty), expected, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, n=st.integers(1, 4), ids=st.lists(st.integers(0, 5), min_size=0, max_size=40))
def test_no_repeat_ngram_equals_transformers(seed, n, ids):
    logits = random_logits(seed)
    ours = apply_no_repeat_ngram(logits, ids, n)
    if ids:
        assert kept(ours) == kept(hf(NoRepeatNGramLogitsProcessor(n), logits, ids))
    else:
        assert kept(ours) == set(range(VOCAB))


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_greedy_is_argmax(seed):
    logits = random_logits(seed)
    assert sample(logits, SamplingConfig.greedy(), np.random.default_rng(0)) == int(np.argmax(logits))


def test_eos_ban_and_filters_compose():
    logits = random_logits(7)
    top = int(np.argmax(logits))
    config = SamplingConfig(temperature=1.0, top_k=1, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    # top-1 after banning the argmax is the runner-up, whatever the draw
    runner_up = int(np.argsort(logits)[-2])
    assert {sample(logits, config, np.random.default_rng(s), ban=top) for s in range(20)} == {runner_up}


def test_a_seed_reproduces_draws():
    logits = random_logits(3, scale=1.0)
    config = SamplingConfig(top_k=None, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, temperature=1.0)
    draw = lambda seed: [sample(logits, config, rng) for rng in [np.random.default_rng(seed)] for _ in range(50)]
    assert draw(11) == draw(11)
    assert draw(11) != draw(12)


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0),
        SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.0, no_repeat_ngram_size=0),
        SamplingConfig(temperature=1.3, top_k=None, top_p=0.8, repetition_penalty=1.3, no_repeat_ngram_size=0),
    ],
)
def test_sampled_frequencies_follow_the_filtered_softmax(config):
    logits = random_logits(5, scale=1.5)
    history = [1, 2, 3]
    filtered = filtered_logits(logits, config, penalty_ids=history)
    support = np.flatnonzero(np.isfinite(filtered))
    values = filtered[support].astype(np.float64)
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    rng = np.random.default_rng(2024)
    n = 40_000
    draws = [sample(logits, config, rng, penalty_ids=history) for _ in range(n)]
    assert set(draws) <= set(support.tolist())
    observed = np.array([np.sum(np.asarray(draws) == t) for t in support])
    # pool rare tokens so every expected count is >= 5, as the chi-square test requires
    order = np.argsort(-probs)
    exp_sorted, obs_sorted = probs[order] * n, observed[order]
    cut = np.searchsorted(-exp_sorted, -5.0)
    expected = np.append(exp_sorted[:cut], exp_sorted[cut:].sum()).astype(np.float64)
    seen = np.append(obs_sorted[:cut], obs_sorted[cut:].sum())
    if expected[-1] == 0:
        expected, seen = expected[:-1], seen[:-1]
    expected = expected * (seen.sum() / expected.sum())  # float rounding only
    assert stats.chisquare(seen, expected).pvalue > 1e-3


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("temperature", float("nan")), ("top_k", 0), ("top_p", 1.5), ("top_p", 0.0),
     ("repetition_penalty", 0.0), ("no_repeat_ngram_size", -1), ("min_new_tokens", -2), ("max_new_tokens", -1),
     ("seed", -5), ("seed", 1.5)],
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(SamplingConfigError) as info:
        SamplingConfig(**{field: value})
    assert str(info.value).startswith(field + " must be")
    assert info.value.field == field


def reference_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper written out: a stable ascending sort of every finite logit."""
    out = logits.copy()
    candidates = np.flatnonzero(np.isfinite(out))
    values = out[candidates].astype(np.float64)
    order = np.argsort(values, kind="stable")
    z = np.exp(values[order] - values.max())
    remove = np.cumsum(z / z.sum()) <= 1 - p
    remove[-1] = False
    out[candidates[order[remove]]] = -np.inf
    return out


@settings(max_examples=80, deadline=None)
@given(seed=seeds, p=st.floats(0.01, 0.999), size=st.sampled_from([7, 200, 5000, 50257]),
       scale=st.floats(0.1, 10), decimals=st.sampled_from([None, 1]))
def test_top_p_keeps_what_a_full_sort_keeps(seed, p, size, scale, decimals):
    """The nucleus found from the top (sorting only the few hundred largest) is the full sort's, ties included."""
    logits = (np.random.default_rng(seed).standard_normal(size) * scale).astype(np.float32)
    if decimals is not None:  # many exact ties
        logits = np.round(logits, decimals).astype(np.float32)
    logits[np.random.default_rng(seed + 1).integers(0, size, size // 10)] = -np.inf  # banned earlier
    assert kept(apply_top_p(logits, p)) == kept(reference_top_p(logits, p))


@settings(max_examples=40, deadline=None)
@given(seed=seeds, top_k=st.sampled_from([None, 1, 50, 5000]), top_p=st.sampled_from([1.0, 0.9, 0.5]),
       temperature=st.sampled_from([0.5, 0.8, 1.3]))
def test_sample_draws_what_the_filtered_softmax_gives(seed, top_k, top_p, temperature):
    """sample() skips writing out the filtered vector; its draws equal a draw from filtered_logits()."""
    logits = (np.random.default_rng(seed).standard_normal(50257) * 4).astype(np.float32)
    history = list(np.random.default_rng(seed + 2).integers(0, 50257, 300))
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ids = dict(penalty_ids=history, ngram_ids=history, ban=50256)
    rng = np.random.default_rng(seed)
    assert [sample(logits, config, rng, **ids) for _ in range(20)] == draws_from_filtered(logits, config, seed, 20, **ids)


def draws_from_filtered(logits, config, seed, n, **ids):
    """n draws, the way sample() is specified: from the softmax of filtered_logits()."""
    filtered = filtered_logits(logits, config, **ids)
    support = np.flatnonzero(np.isfinite(filtered))
    z = np.exp(filtered[support].astype(np.float64) - filtered[support].max())
    cumulative = np.cumsum(z / z.sum())
    rng = np.random.default_rng(seed)
    return [int(support[min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), support.size - 1)])
            for _ in range(n)]


@settings(max_examples=40, deadline=None)
@given(seed=seeds, k=st.sampled_from([1, 50, 700]), temperature=st.sampled_from([0.3, 0.7, 0.8, 1.3, 3.0]),
       spread=st.sampled_from([2, 8, 64]))
def test_top_k_after_temperature_keeps_the_ties_rounding_makes(seed, k, temperature, spread):
    """sample() divides only the values near the top by the temperature. Values a few ulps apart can
    round to one value when divided, and then top-k keeps them all (as transformers does on the scaled
    logits): the draws are still filtered_logits()'s."""
    rng = np.random.default_rng(seed)
    base = np.float32(rng.standard_normal() * 5)
    logits = (base + rng.integers(-spread, spread + 1, 50257) * np.spacing(base)).astype(np.float32)
    config = SamplingConfig(temperature=temperature, top_k=k, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    rng = np.random.default_rng(seed)
    assert [sample(logits, config, rng) for _ in range(10)] == draws_from_filtered(logits, config, seed, 10)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 4), ids=st.lists(st.integers(0, 5), min_size=0, max_size=40), start=st.integers(0, 40))
def test_ngram_bans_kept_token_by_token_equal_a_rescan(n, ids, start):
    bans = NgramBans(n, ids[:start])
    assert set(bans.banned()) == banned_ngram_tokens(ids[:start], n)
    for i in range(start, len(ids)):
        bans.add(ids[i])
        assert set(bans.banned()) == banned_ngram_tokens(ids[: i + 1], n)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, top_k=st.sampled_from([None, 1, 50]), top_p=st.sampled_from([1.0, 0.9]),
       temperature=st.sampled_from([0.0, 0.8, 1.3]), ngram=st.sampled_from([0, 2, 3]), ban=st.sampled_from([None, 50256]))
def test_sampling_in_place_picks_what_sample_picks(seed, top_k, top_p, temperature, ngram, ban):
    """generate() samples its step buffer in place with n-gram bans kept as it goes: the same tokens as sample()."""
    logits = (np.random.default_rng(seed).standard_normal(50257) * 4).astype(np.float32)
    history = np.random.default_rng(seed + 2).integers(0, 60, 300)  # few distinct ids: repeated n-grams
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, no_repeat_ngram_size=ngram)
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    bans = NgramBans(ngram, history)
    for _ in range(10):
        expected = sample(logits, config, a, penalty_ids=history, ngram_ids=history, ban=ban)
        assert sample_in_place(logits.copy(), config, b, penalty_ids=history, banned=bans.banned(), ban=ban) == expected


def test_every_token_banned_falls_back_to_the_unfiltered_argmax():
    logits = np.full(50257, -np.inf, np.float32)
    logits[[3, 7, 9]] = [1.0, 5.0, 2.0]
    config = SamplingConfig(no_repeat_ngram_size=2, seed=0)
    history = [1, 7, 1, 3, 1, 9]  # after 1: 7, 3 and 9 are banned, and all three are penalized
    x = logits.copy()
    assert sample_in_place(x, config, np.random.default_rng(0), penalty_ids=history, banned=NgramBans(2, history).banned()) == 7
    assert sample(logits, config, np.random.default_rng(0), penalty_ids=history, ngram_ids=history) == 7


def test_nan_logits_give_a_token_not_a_traceback():
    """A broken model's NaN logits: no candidate is finite, so the draw falls back to an argmax."""
    logits = np.full(50257, np.nan, np.float32)
    for config in (SamplingConfig(seed=0), SamplingConfig(top_k=None, seed=0)):
        assert 0 <= sample(logits, config, np.random.default_rng(0)) < 50257
