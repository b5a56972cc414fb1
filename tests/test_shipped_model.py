"""The model shipped in models/: valid, faithful to its checkpoint, good enough to chat, usable without torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import EOS, export_quietly, gpt2_tokenizer, run_env, torch_greedy
from dialogpt_edge.export import dialogs, fidelity
from dialogpt_edge.runtime import Session, Tokenizer, generate, load
from dialogpt_edge.runtime import shipped_model_dir

MODELS = Path(__file__).parents[1] / "models"
SHIPPED = MODELS / "chitchat-small"
CHECKPOINT = MODELS / "chitchat-small-checkpoint"
PROMPTS = [
    ["Hello, how are you?"],
    ["What do you do for fun?"],
    ["Do you have any pets?"],
    ["I just got back from a trip to Japan."],
    ["Hi!", "Hey, how's it going?", "Pretty good. What are your plans for the weekend?"],
    ["What's your favorite movie?"],
]
NEW_TOKENS = 20


def encode(turns):
    tok = gpt2_tokenizer()
    return [i for t in turns for i in tok.encode(t) + [EOS]]


@pytest.fixture(scope="module")
def torch_model():
    return GPT2LMHeadModel.from_pretrained(CHECKPOINT).float().eval()


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    return export_quietly(CHECKPOINT, tmp_path_factory.mktemp("shipped") / "fp32", "none")


def test_shipped_folder_validates_and_is_the_default():
    spec = load(SHIPPED)  # manifest and every checksum
    assert spec.precision == "int8"
    assert Path(shipped_model_dir()).resolve() == SHIPPED.resolve()
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total < 80 * 2**20, f"models/ holds {total / 2**20:.1f} MiB"


def test_shipped_int8_follows_pytorch(torch_model):
    """int8 weights move logits slightly, so a near-tie can flip one greedy choice and the rest of the
    continuation with it: exact ids are required of the fp32 export (below); the shipped int8 model
    must pick PyTorch's token at >= 95% of the positions of PyTorch's own greedy continuations."""
    session = Session(load(SHIPPED))
    agree = total = identical = 0
    for turns in PROMPTS:
        ids = encode(turns)
        expected = torch_greedy(torch_model, ids, NEW_TOKENS)
        identical += list(generate(session, ids, max_new_tokens=NEW_TOKENS)) == expected
        with torch.no_grad():
            ref = torch_model(torch.tensor([ids + expected])).logits[0, len(ids) - 1 :].numpy()
        ours = session.forward(ids + expected, session.new_cache())[len(ids) - 1 :]
        agree += int(np.sum(ref.argmax(-1) == ours.argmax(-1)))
        total += len(ref)
    assert agree / total >= 0.95, (agree, total)
    assert identical >= len(PROMPTS) // 2, identical


def test_fp32_export_of_the_checkpoint_equals_pytorch(torch_model, fp32_export):
    session = Session(load(fp32_export))
    for turns in PROMPTS:
        ids = encode(turns)
        got = list(generate(session, ids, max_new_tokens=NEW_TOKENS))
        assert got == torch_greedy(torch_model, ids, NEW_TOKENS)
        with torch.no_grad():
            ref = torch_model(torch.tensor([ids + got])).logits[0].numpy()
        np.testing.assert_allclose(session.forward(ids + got, session.new_cache()), ref, rtol=0, atol=1e-4)


def test_quality_and_quantized_fidelity(fp32_export, tmp_path):
    spec = load(SHIPPED)
    tok = Tokenizer(spec.tokenizer_path, spec.eos_token_id)
    sequences = fidelity.held_out_sequences(tok, 8192, spec.n_positions)
    int8 = fidelity.measure(Session(load(fp32_export)), Session(spec), sequences)
    assert int8.top1_agreement >= 0.95, int8
    assert abs(int8.perplexity_ratio - 1) <= 0.02, int8

    # a unigram model of the training split, on the same held-out tokens
    counts = np.ones(spec.vocab_size)
    for turns in dialogs.conversations("train"):
        np.add.at(counts, dialogs.encode_conversation(turns, tok.encode, EOS), 1)
    targets = np.concatenate([s[1:] for s in sequences])
    unigram_ppl = math.exp(-np.mean(np.log(counts[targets] / counts.sum())))
    assert int8.perplexity_fp32 * 5 <= unigram_ppl, (int8.perplexity_fp32, unigram_ppl)

    int4_dir = export_quietly(CHECKPOINT, tmp_path / "int4", "int4", fidelity_tokens=8192)
    int4 = json.loads((int4_dir / "manifest.json").read_text())["fidelity"]["quantized_vs_fp32"]
    assert abs(int4["perplexity_ratio"] - 1) <= 0.10, int4


BLOCK_HEAVY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "optimum"):
            raise ImportError(f"{name} is blocked: this run plays a machine without torch")
sys.meta_path.insert(0, Block())
from dialogpt_edge.runtime.cli import main
sys.exit(main(["chat", "--seed", "0"]))
"""


def test_chat_with_no_model_flag_and_no_torch():
    proc = subprocess.run([sys.executable, "-c", BLOCK_HEAVY], input="Hello, how are you?\n", capture_output=True,
                          text=True, env=run_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0].split()) >= 2, proc.stdout


def test_generate_defaults_to_the_shipped_model():
    proc = subprocess.run([sys.executable, "-m", "dialogpt_edge.runtime", "generate", "--prompt", "Hi!", "--max-new-tokens", "3", "--json"],
                          capture_output=True, text=True, env=run_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["ids"]) >= 1
