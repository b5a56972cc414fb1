"""Chat: DialoGPT's turn format, the cross-turn cache, budget trimming, the repetition guard, tidying."""

from __future__ import annotations

import pytest
from transformers import GPT2LMHeadModel

from conftest import EOS, gpt2_tokenizer, torch_greedy
from dialogpt_edge.runtime import Chat, SamplingConfig, Session, Tokenizer, load
from dialogpt_edge.runtime import chat as chat_module
from dialogpt_edge.runtime.tidy import TidyStream, tidy

MESSAGES = ["Hi there!", "How was your weekend?", "I went hiking. Do you like hiking?", "Where do you live?", "Nice talking to you."]
GREEDY = SamplingConfig.greedy(max_new_tokens=12)


@pytest.fixture(scope="module")
def parts(tiny_model, tiny_checkpoint):
    spec = load(tiny_model)
    session = Session(spec, threads=1)
    tokenizer = Tokenizer(spec.tokenizer_path, spec.eos_token_id)
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    return session, tokenizer, model


def test_multi_turn_equals_fresh_generation_on_the_full_history(parts):
    session, tokenizer, model = parts
    chat = Chat(session, tokenizer, GREEDY)
    ref = gpt2_tokenizer()
    history: list[int] = []
    for message in MESSAGES:
        reply = list(chat.respond(message))
        history += ref.encode(message) + [EOS]
        assert reply == torch_greedy(model, history, 12)
        history += reply + [EOS]
        assert chat.context_ids() == history  # every turn, user's and bot's, ends with eos
    # the cache is kept: after the first turn only the new tokens are prefilled
    # (the last reply token, which was never fed, its eos, and the user's turn)
    expected = [len(ref.encode(MESSAGES[0])) + 1] + [2 + len(ref.encode(m)) + 1 for m in MESSAGES[1:]]
    assert chat.stats.prefill_tokens == expected
    assert chat.stats.rebuilds == 0


def test_budget_drops_whole_old_turns_and_rebuilds_the_cache(parts):
    session, tokenizer, model = parts
    chat = Chat(session, tokenizer, GREEDY, history_tokens=40)
    for message in MESSAGES:
        reply = list(chat.respond(message))
        context = chat.context_ids()[: -(len(reply) + 1)]  # what the reply was generated from
        assert len(context) <= 40
        assert context[-1] == EOS and chat.turns[0].speaker in ("user", "bot")
        assert reply == torch_greedy(model, context, 12)
    assert chat.stats.rebuilds >= 1
    assert sum(len(t.ids) for t in chat.turns[:-1]) <= 40


def test_an_over_budget_history_is_trimmed_to_three_quarters_so_later_turns_reuse_the_cache(parts):
    session, tokenizer, model = parts
    chat = Chat(session, tokenizer, GREEDY, history_tokens=80)
    rebuilt_turns, kept_turns = 0, 0
    for message in MESSAGES * 3:
        before = chat.stats.rebuilds
        reply = list(chat.respond(message))
        context = chat.context_ids()[: -(len(reply) + 1)]
        if chat.stats.rebuilds > before:  # this turn dropped old turns: down to 3/4 of the budget
            rebuilt_turns += 1
            assert len(context) <= int(80 * chat_module.TRIM_TO)
        elif rebuilt_turns:  # a turn after a trim that fit: only its own tokens were prefilled
            kept_turns += 1
            assert chat.stats.prefill_tokens[-1] < len(context)
        assert len(context) <= 80
        assert reply == torch_greedy(model, context, 12)
    assert rebuilt_turns >= 2 and kept_turns >= 1


@pytest.mark.parametrize("message, error, text", [
    ("", chat_module.UserError, "empty message"),
    ("  \t ", chat_module.UserError, "empty message"),  # whitespace says nothing either
    (None, TypeError, "a message is a str, not NoneType"),
])
def test_a_message_with_nothing_to_say_is_refused(parts, message, error, text):
    session, tokenizer, _ = parts
    chat = Chat(session, tokenizer, GREEDY)
    with pytest.raises(error, match=text):
        chat.reply(message)
    assert chat.turns == [] and chat.cache.length == 0


def test_chat_settings_of_the_wrong_type_are_named(parts):
    session, tokenizer, _ = parts
    with pytest.raises(TypeError, match="config must be a SamplingConfig"):
        Chat(session, tokenizer, {"temperature": 1.0})
    with pytest.raises(chat_module.SamplingConfigError, match="history_tokens must be an integer between 1 and 960.*got '100'"):
        Chat(session, tokenizer, GREEDY.replace(max_new_tokens=64), history_tokens="100")


def test_reset_forgets_the_conversation(parts):
    session, tokenizer, model = parts
    chat = Chat(session, tokenizer, GREEDY)
    list(chat.respond(MESSAGES[0]))
    chat.reset()
    reply = list(chat.respond(MESSAGES[1]))
    context = gpt2_tokenizer().encode(MESSAGES[1]) + [EOS]
    assert chat.stats.prefill_tokens[-1] == len(context)
    assert reply == torch_greedy(model, context, 12)


def test_a_stopped_reply_keeps_what_was_shown(parts):
    session, tokenizer, model = parts
    chat = Chat(session, tokenizer, GREEDY)
    stream = chat.respond(MESSAGES[0])
    shown = [next(stream), next(stream)]
    stream.close()  # what Ctrl-C does
    assert chat.turns[-1].ids == shown + [EOS]
    reply = list(chat.respond(MESSAGES[1]))
    assert reply == torch_greedy(model, chat.context_ids()[: -(len(reply) + 1)], 12)


def test_a_repeated_reply_is_regenerated_unseen(parts, monkeypatch):
    session, tokenizer, _ = parts
    scripts = [[100, 101, 102], [100, 101, 102], [200, 201]]
    configs = []

    def scripted_generate(session, feed, config, *, cache, **_):
        configs.append(config)
        session.prefill(feed, cache)
        script = scripts.pop(0)
        for i, token in enumerate(script):
            yield token
            if i + 1 < len(script):
                session.decode_step(token, cache)

    monkeypatch.setattr(chat_module, "generate", scripted_generate)
    chat = Chat(session, tokenizer, SamplingConfig(seed=0))
    assert list(chat.respond("Hi")) == [100, 101, 102]
    assert list(chat.respond("Hi")) == [200, 201]  # the copy of the first reply was never shown
    assert chat.stats.regenerations == 1
    assert configs[2].repetition_penalty > configs[1].repetition_penalty
    assert chat.turns[-1].ids == [200, 201, EOS]
    assert chat.context_ids() == [i for t in chat.turns for i in t.ids]


def test_history_budget_must_fit_the_positions(parts):
    session, tokenizer, _ = parts
    with pytest.raises(Exception, match="history_tokens must be an integer between 1 and 960"):
        Chat(session, tokenizer, SamplingConfig(max_new_tokens=64), history_tokens=1000)


def test_seeded_sampled_chats_are_reproducible(parts):
    session, tokenizer, _ = parts

    def conversation(seed):
        chat = Chat(session, tokenizer, SamplingConfig(seed=seed, max_new_tokens=10))
        return [chat.reply(m) for m in MESSAGES[:3]]

    assert conversation(5) == conversation(5)
    assert conversation(5) != conversation(6)


@pytest.mark.parametrize(
    "raw, tidied",
    [
        ("it . I don 't know , really !", "it. I don't know, really!"),
        ("i do n't think so ... maybe ?", "i don't think so... maybe?"),
        ("I 'm fine , you ?", "I'm fine, you?"),
        ("what's up :)", "what's up :)"),
        ("3.5 % of U.S. voters", "3.5% of U.S. voters"),
    ],
)
def test_tidy(raw, tidied):
    assert tidy(raw) == tidied
    stream = TidyStream()
    words = raw.split(" ")
    chunks = [stream.push(w if i == 0 else " " + w) for i, w in enumerate(words)] + [stream.flush()]
    assert "".join(chunks) == tidied


class RetidyingStream:
    """TidyStream as it was before it forgot emitted text: the whole reply re-tidied on every push."""

    def __init__(self):
        self.raw, self.emitted = "", 0

    def push(self, chunk: str) -> str:
        self.raw += chunk
        text = tidy(self.raw)
        stable = max(len(text.rstrip(" .,!?;:%)]'")), self.emitted)
        out, self.emitted = text[self.emitted : stable], stable
        return out

    def flush(self) -> str:
        text = tidy(self.raw)
        out, self.emitted = text[self.emitted :], len(text)
        return out


def test_tidy_stream_emits_what_retidying_the_whole_reply_emits():
    """Property: forgetting emitted text changes no chunk, however the text arrives (tokens of words,
    punctuation, contractions, brackets, runs of spaces, other scripts, split anywhere)."""
    import random

    rng = random.Random(0)
    pieces = ["I", "it", "don", "n't", "'t", "'s", "'re", "'ll", "'m", "not", "now", "No", ".", ",", "!", "?", "...",
              "%", ")", "(", "[", "]", ":)", "3.5", "U.S.", "ok", "Ça", "今日は", "🙂", "a", "b", "_x", "'", '"']
    for _ in range(400):
        text = "".join(rng.choice(["", " ", " ", "  "]) + rng.choice(pieces) for _ in range(rng.randint(0, 80)))
        stream, reference, i = TidyStream(), RetidyingStream(), 0
        while i < len(text):
            j = i + rng.randint(1, 4)
            assert stream.push(text[i:j]) == reference.push(text[i:j]), text
            i = j
        assert stream.flush() == reference.flush(), text
        assert len(stream._raw) <= len(text)


def test_without_cache_reuse_every_turn_prefills_the_whole_history(parts):
    session, tokenizer, _ = parts
    cached = Chat(session, tokenizer, GREEDY)
    uncached = Chat(session, tokenizer, GREEDY, reuse_cache=False)
    for message in MESSAGES[:3]:
        assert list(cached.respond(message)) == list(uncached.respond(message))
        assert uncached.stats.prefill_tokens[-1] == len(uncached.context_ids()) - len(uncached.turns[-1].ids)
    assert sum(cached.stats.prefill_tokens) < sum(uncached.stats.prefill_tokens)
