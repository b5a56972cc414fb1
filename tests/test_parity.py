"""The runtime against transformers: greedy ids, logits at every position, cache on == cache off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import EOS, gpt2_tokenizer, torch_greedy
from dialogpt_edge.runtime import Session, generate, load

NEW_TOKENS = 32

PROMPTS = {
    "greeting": ["Hello, how are you?"],
    "question": ["Does money buy happiness?"],
    "multi_turn": ["Hi!", "Hey, how was your weekend?", "Great, I went hiking with my dog.", "Where did you go?"],
    "non_ascii": ["Ça va? 今日は良い天気ですね 🙂 ¿Qué tal?"],
    "whitespace": ["  spaced   out\ttext \n with newlines  "],
    "long_500": [" ".join(f"turn {i} of a long story about the sea." for i in range(60))],
}


def encode(turns: list[str]) -> list[int]:
    tok = gpt2_tokenizer()
    return [i for t in turns for i in tok.encode(t) + [EOS]]


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].numpy()


def check(checkpoint, model_dir, atol_for):
    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    session = Session(load(model_dir))
    assert len(encode(PROMPTS["long_500"])) >= 500
    distinct = []
    for name, turns in PROMPTS.items():
        prompt = encode(turns)
        expected = torch_greedy(model, prompt, NEW_TOKENS)
        got = list(generate(session, prompt, max_new_tokens=NEW_TOKENS))
        assert got == expected, name
        distinct.append(len(set(got)))

        reference = torch_logits(model, prompt + got)
        cache = session.new_cache()
        prefill = session.forward(prompt, cache)
        steps = np.stack([session.decode_step(t, cache) for t in got])
        atol = atol_for(reference)
        np.testing.assert_allclose(prefill, reference[: len(prompt)], rtol=0, atol=atol, err_msg=name)
        np.testing.assert_allclose(steps, reference[len(prompt) :], rtol=0, atol=atol, err_msg=name)

        # the cached steps equal one uncached pass over the whole sequence
        full = session.forward(prompt + got, session.new_cache())
        np.testing.assert_allclose(np.concatenate([prefill, steps]), full, rtol=0, atol=atol, err_msg=name)
    # random weights that repeat one token would make greedy parity trivially true
    assert min(distinct) >= 10, distinct


def test_tiny_matches_transformers(tiny_checkpoint, tiny_model):
    check(tiny_checkpoint, tiny_model, lambda ref: 1e-4)


@pytest.mark.slow
def test_dialogpt_small_shape_matches_transformers(small_checkpoint, small_model):
    from dialogpt_edge.export.verify import logit_bound

    # 12 layers of fp32 reassociation: the bound scales with the logits (export/verify.py)
    check(small_checkpoint, small_model, lambda ref: logit_bound(float(np.abs(ref).max())))


def test_min_new_tokens_bans_eos_like_transformers(tmp_path):
    """A model that prefers eos ends at once; with min_new_tokens it must go on exactly as transformers does."""
    from conftest import TINY, export_quietly, make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=1, **TINY)
    model = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    with torch.no_grad():  # push every final hidden state towards eos's (tied) embedding
        direction = model.transformer.wte.weight[EOS] / model.transformer.wte.weight[EOS].norm()
        model.transformer.ln_f.bias += 10.0 * direction
    model.save_pretrained(ckpt)
    session = Session(load(export_quietly(ckpt, tmp_path / "model")))
    prompt = encode(PROMPTS["greeting"])

    assert list(generate(session, prompt, max_new_tokens=16)) == torch_greedy(model, prompt, 16) == []
    got = list(generate(session, prompt, max_new_tokens=16, min_new_tokens=5))
    assert len(got) >= 5
    assert got == torch_greedy(model, prompt, 16, min_new_tokens=5)


def test_same_greedy_ids_as_optimums_export(tiny_checkpoint, tiny_model, tmp_path):
    """optimum's export, run by its ORTModelForCausalLM, is the reference graph export/builder.py replaced."""
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM

    from dialogpt_edge.export.convert import quiet_libraries

    with quiet_libraries():
        main_export(str(tiny_checkpoint), output=tmp_path / "optimum", task="text-generation-with-past", do_validation=False)
        reference = ORTModelForCausalLM.from_pretrained(tmp_path / "optimum")
    session = Session(load(tiny_model))
    for name, turns in PROMPTS.items():
        prompt = encode(turns)
        assert list(generate(session, prompt, max_new_tokens=NEW_TOKENS)) == torch_greedy(reference, prompt, NEW_TOKENS), name
