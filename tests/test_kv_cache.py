"""KVCache invariants, and the Session's use of it: written in place, one prefill, then one position per step."""

from __future__ import annotations

import numpy as np
import pytest

from dialogpt_edge.runtime import ContextLengthError, KVCache, SamplingConfig, Session, generate, load


def test_cache_bookkeeping():
    cache = KVCache(n_layer=3, n_head=4, head_dim=8, capacity=16)
    assert cache.length == 0 and cache.nbytes == 0
    assert all(k.shape == (1, 4, 16, 8) and k.dtype == np.float32 for k in cache.keys + cache.values)
    cache.advance(5)
    assert cache.nbytes == 5 * 2 * 3 * 4 * 8 * 4
    cache.truncate(3)
    assert cache.length == 3
    with pytest.raises(ValueError):
        cache.truncate(4)
    with pytest.raises(ValueError):
        cache.advance(14)
    cache.reset()
    assert cache.length == 0


def test_steps_write_into_the_same_buffers(tiny_model):
    session = Session(load(tiny_model), threads=1)
    cache = session.new_cache()
    buffers = [k.ctypes.data for k in cache.keys + cache.values]
    session.prefill([15496, 11, 995], cache)
    before = [k[:, :, :3].copy() for k in cache.keys]
    session.decode_step(50256, cache)
    assert [k.ctypes.data for k in cache.keys + cache.values] == buffers
    assert cache.length == 4
    for k, old in zip(cache.keys, before):
        np.testing.assert_array_equal(k[:, :, :3], old)  # earlier positions untouched
        assert np.abs(k[:, :, 3]).sum() > 0  # the new position was written in place


def test_truncated_cache_gives_what_a_fresh_one_gives(tiny_model):
    session = Session(load(tiny_model), threads=1)
    cache = session.new_cache()
    session.prefill([15496, 11, 995, 50256, 40, 716], cache)
    cache.truncate(4)
    got = session.forward([314, 1101, 922], cache)
    fresh = session.forward([15496, 11, 995, 50256, 314, 1101, 922], session.new_cache())
    np.testing.assert_allclose(got, fresh[4:], rtol=0, atol=1e-5)


def test_caches_on_one_session_are_independent(tiny_model):
    session = Session(load(tiny_model), threads=1)
    a, b = session.new_cache(), session.new_cache()
    la = session.prefill([15496, 11], a)
    session.prefill([40, 716, 257, 3797], b)
    after_b = session.decode_step(995, a)  # b's prefill must not have touched a
    np.testing.assert_allclose(after_b, session.forward([15496, 11, 995], session.new_cache())[-1], rtol=0, atol=1e-5)
    assert (a.length, b.length) == (3, 4)
    assert la.shape == (session.spec.vocab_size,)


def test_full_cache_is_a_clear_error(tiny_model):
    session = Session(load(tiny_model), threads=1)
    cache = session.new_cache(capacity=4)
    session.prefill([1, 2, 3], cache)
    session.decode_step(4, cache)
    with pytest.raises(ContextLengthError, match="exceed"):
        session.decode_step(5, cache)
    assert cache.length == 4


@pytest.mark.parametrize("ids", [[50257], [-1], [15496, 10**8], [1.0], "Hi"])
def test_ids_outside_the_vocabulary_are_refused_before_the_graph_runs(tiny_model, ids):
    # onnxruntime's Gather does not check indices; an unchecked id would read past the embedding
    session = Session(load(tiny_model), threads=1)
    cache = session.new_cache()
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 50257\)"):
        session.forward(ids, cache)
    with pytest.raises((ValueError, TypeError)):
        session.decode_step(ids[-1], cache)
    assert cache.length == 0


@pytest.mark.parametrize("threads", [0, -1, "2", 1.5, True])
def test_a_thread_count_that_is_not_a_positive_int_is_refused(tiny_model, threads):
    from dialogpt_edge.runtime import open_model

    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        Session(load(tiny_model), threads=threads)
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        open_model(tiny_model, threads=threads)


@pytest.mark.parametrize("capacity", [0, 1025, 10**9, 10.5, "8"])
def test_a_cache_capacity_beyond_the_positions_is_refused(tiny_model, capacity):
    # 10**9 positions used to reach mmap as an ENOMEM OSError; past 1024 no position could use them
    session = Session(load(tiny_model), threads=1)
    with pytest.raises(ValueError, match="capacity must be an integer from 1 to the model's 1024 positions"):
        session.new_cache(capacity)


@pytest.mark.parametrize("call, error, text", [
    (lambda s: generate(s, "Hi"), TypeError, r"encode text first \(tokenizer.encode_turn"),
    (lambda s: generate(s, [15496], {"temperature": 1.0}), TypeError, "config must be a SamplingConfig"),
    (lambda s: generate(s, [15496], max_new_tokens=3.0), ValueError, "must be integers >= 0"),
    (lambda s: generate(s, [15496], min_new_tokens=-1), ValueError, "must be integers >= 0"),
])
def test_generate_names_what_is_wrong_with_its_arguments(tiny_model, call, error, text):
    session = Session(load(tiny_model), threads=1)
    with pytest.raises(error, match=text):
        list(call(session))


def test_generate_ends_where_the_cache_is_full(tiny_model):
    session = Session(load(tiny_model), threads=1)
    config = SamplingConfig.greedy().replace(max_new_tokens=50, min_new_tokens=50)
    full = list(generate(session, [15496, 11, 995], config))
    small = session.new_cache(capacity=6)
    ids = list(generate(session, [15496, 11, 995], config, cache=small))
    # 3 prompt positions + 3 fed reply tokens fill the cache; the 4th reply token needs no position
    assert ids == full[:4]
    assert small.length == 6


def test_a_step_without_a_copy_returns_the_buffer_the_next_step_overwrites(tiny_model):
    session = Session(load(tiny_model), threads=1)
    a, b = session.new_cache(), session.new_cache()
    session.prefill([15496, 11], a)
    session.prefill([15496, 11], b)
    copied = session.decode_step(995, a)
    view = session.decode_step(995, b, copy=False)
    np.testing.assert_array_equal(view, copied)
    before = view.copy()
    following = session.decode_step(30, b, copy=False)
    assert np.shares_memory(view, following) and not np.array_equal(view, before)
    assert not np.shares_memory(session.decode_step(30, a), following)


def test_each_step_feeds_one_token(tiny_model, monkeypatch):
    session = Session(load(tiny_model), threads=1)
    fed = []
    forward = session._forward  # what prefill and decode_step both run, after their checks
    monkeypatch.setattr(session, "_forward", lambda ids, cache, *a, **kw: (fed.append((ids.shape[1], cache.length)), forward(ids, cache, *a, **kw))[1])
    cache = session.new_cache()
    out = list(generate(session, [15496, 50256], max_new_tokens=6, cache=cache))
    assert len(out) == 6
    # the prompt once, then one token per step at the next position; the last token is not fed
    assert fed == [(2, 0)] + [(1, 2 + i) for i in range(5)]
    assert cache.length == 2 + 5


def _chunked(session: Session, ids: list[int], chunk: int, monkeypatch) -> tuple[np.ndarray, KVCache, list[int]]:
    """forward() over `ids` with prefill_chunk = chunk: (logits, cache, tokens fed per graph run)."""
    runs = []
    run = session._run
    monkeypatch.setattr(session, "_run", lambda binding, part, *a: (runs.append(part.shape[1]), run(binding, part, *a))[1])
    monkeypatch.setattr(session, "prefill_chunk", chunk)
    cache = session.new_cache()
    return session.forward(ids, cache), cache, runs


LONG_IDS = [(97 * i + 13) % 50000 for i in range(40)]


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_int4"])
def test_long_runs_go_through_in_chunks_with_the_same_result(fixture, request, monkeypatch):
    """A run longer than prefill_chunk is fed a chunk at a time; logits and cache equal one pass's."""
    session = Session(load(request.getfixturevalue(fixture)), threads=1)
    whole_cache = session.new_cache()
    whole = session.forward(LONG_IDS, whole_cache)  # 40 tokens: below the default chunk, one pass
    chunked, cache, runs = _chunked(session, LONG_IDS, 16, monkeypatch)
    assert runs == [16, 16, 8] and cache.length == 40
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(session.prefill(LONG_IDS, session.new_cache()), whole[-1], rtol=0, atol=1e-5)
    for mine, theirs in zip(cache.keys + cache.values, whole_cache.keys + whole_cache.values):
        np.testing.assert_allclose(mine[:, :, :40], theirs[:, :, :40], rtol=0, atol=1e-5)


def test_int8_chunks_stay_as_close_to_fp32_as_one_pass(tiny_model, tiny_int8, monkeypatch):
    """DynamicQuantizeMatMul picks one activation scale per run, so chunks round differently from one
    pass (finer scales, if anything); they must not move the logits away from the fp32 model's."""
    fp32 = Session(load(tiny_model), threads=1)
    expected = fp32.forward(LONG_IDS, fp32.new_cache())
    session = Session(load(tiny_int8), threads=1)
    whole = session.forward(LONG_IDS, session.new_cache())
    chunked, cache, runs = _chunked(session, LONG_IDS, 16, monkeypatch)
    assert runs == [16, 16, 8] and cache.length == 40
    error = lambda logits: np.abs(logits - expected).mean()
    assert error(chunked) <= 1.1 * error(whole)
    assert (chunked.argmax(-1) == expected.argmax(-1)).mean() >= (whole.argmax(-1) == expected.argmax(-1)).mean() - 0.05
