"""KVCache invariants, and the Session's use of it: one prefill, then one position per step."""

from __future__ import annotations

import numpy as np
import pytest

from dialogpt_edge.runtime import KVCache, Session, generate, load


def test_empty_cache_shapes():
    cache = KVCache(n_layer=3, n_head=4, head_dim=8)
    assert cache.length == 0
    assert all(k.shape == (1, 4, 0, 8) and k.dtype == np.float32 for k in cache.keys + cache.values)


def test_truncate_keeps_the_prefix():
    cache = KVCache(n_layer=2, n_head=2, head_dim=4)
    keys = [np.random.rand(1, 2, 5, 4).astype(np.float32) for _ in range(2)]
    values = [np.random.rand(1, 2, 5, 4).astype(np.float32) for _ in range(2)]
    cache.update(keys, values)
    cache.truncate(3)
    assert cache.length == 3
    np.testing.assert_array_equal(cache.keys[1], keys[1][:, :, :3])
    with pytest.raises(ValueError):
        cache.truncate(4)
    cache.reset()
    assert cache.length == 0


def test_each_step_feeds_one_token(tiny_model, monkeypatch):
    session = Session(load(tiny_model), threads=1)
    fed = []
    forward = session.forward
    monkeypatch.setattr(session, "forward", lambda ids, cache: (fed.append((len(ids), cache.length)), forward(ids, cache))[1])
    cache = session.new_cache()
    out = list(generate(session, [15496, 50256], max_new_tokens=6, cache=cache))
    assert len(out) == 6
    # the prompt once, then one token per step at the next position; the last token is not fed
    assert fed == [(2, 0)] + [(1, 2 + i) for i in range(5)]
    assert cache.length == 2 + 5
