"""`dialogpt-edge generate`, driven through the real entry point."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import EOS, gpt2_tokenizer, run_env
from dialogpt_edge.runtime.cli import main


def cli(*args: str, env=None) -> subprocess.CompletedProcess:
    exe = shutil.which("dialogpt-edge")
    cmd = [exe] if exe else [sys.executable, "-m", "dialogpt_edge.runtime"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env or run_env(), timeout=300)


def test_console_script_is_installed():
    assert shutil.which("dialogpt-edge"), "pip install should put dialogpt-edge on PATH"


def test_generate_json_reproduces_transformers(tiny_model, tiny_checkpoint):
    prompt = "Hello, how are you?"
    proc = cli("generate", "--model", str(tiny_model), "--prompt", prompt, "--max-new-tokens", "24", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)

    tok = gpt2_tokenizer()
    ids = tok.encode(prompt) + [EOS]
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, eos_token_id=EOS, pad_token_id=EOS,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = [t for t in out[0, len(ids):].tolist()]
    expected = expected[:-1] if expected[-1] == EOS else expected
    assert result["ids"] == expected
    assert result["text"] == tok.decode(expected)
    assert result["prompt_tokens"] == len(ids)
    assert result["ttft_ms"] > 0 and result["decode_ms_per_token"] > 0


def test_generate_with_penalties_reproduces_transformers(tiny_model, tiny_checkpoint):
    """Greedy, but through the sampler's path: the repetition penalty and the n-gram ban as transformers applies them."""
    prompt = "Hello hello hello, how are you?"
    proc = cli("generate", "-m", str(tiny_model), "--prompt", prompt, "--max-new-tokens", "24", "--json",
               "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2", "--min-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr

    ids = gpt2_tokenizer().encode(prompt) + [EOS]
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, eos_token_id=EOS, pad_token_id=EOS,
                             repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = out[0, len(ids):].tolist()
    expected = expected[:-1] if expected[-1] == EOS else expected
    assert json.loads(proc.stdout)["ids"] == expected


def test_generate_samples_reproducibly_with_a_seed(tiny_model):
    def ids(*flags):
        proc = cli("generate", "-m", str(tiny_model), "--prompt", "Hi", "--max-new-tokens", "16", "--min-new-tokens", "16",
                   "--json", "--temperature", "1.5", "--top-k", "none", *flags)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["ids"]

    greedy = json.loads(cli("generate", "-m", str(tiny_model), "--prompt", "Hi", "--max-new-tokens", "16",
                            "--min-new-tokens", "16", "--json").stdout)["ids"]
    first, again, other = ids("--seed", "1"), ids("--seed", "1"), ids("--seed", "2")
    assert first == again
    # without --seed a seed is drawn, and --json reports it: passing it back repeats the draw
    proc = cli("generate", "-m", str(tiny_model), "--prompt", "Hi", "--max-new-tokens", "16", "--min-new-tokens", "16",
               "--json", "--temperature", "1.5", "--top-k", "none")
    unseeded = json.loads(proc.stdout)
    assert isinstance(unseeded["seed"], int) and ids("--seed", str(unseeded["seed"])) == unseeded["ids"]
    # a hot draw over a random model's near-flat 50,257-way distribution: two seeds or greedy agreeing
    # on all 16 tokens would mean the draw ignores its seed or its temperature
    assert first != other and first != greedy


def test_generate_sampling_settings_are_checked(tiny_model):
    proc = cli("generate", "-m", str(tiny_model), "--prompt", "Hi", "--top-p", "1.5")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --top-p must be in (0, 1]") and len(proc.stderr.strip().splitlines()) == 1
    proc = cli("generate", "-m", str(tiny_model), "--prompt", "Hi", "--top-k", "many")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: argument --top-k: must be an integer >= 1 or 'none', got 'many'")
    proc = cli("generate", "-m", str(tiny_model), "--prompt", "Hi", "--temperature", "1", "--seed", "-5")
    assert proc.returncode == 1  # numpy's generators refuse negative seeds, deep inside the first draw
    assert proc.stderr == "error: --seed must be an integer >= 0, got -5\n"


def test_generate_prints_the_continuation(tiny_model):
    as_json = json.loads(cli("generate", "-m", str(tiny_model), "--prompt", "Hi", "--max-new-tokens", "8", "--json").stdout)
    proc = cli("generate", "-m", str(tiny_model), "--prompt", "Hi", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == as_json["text"] + "\n"


def test_model_from_environment(tiny_model):
    proc = cli("generate", "--prompt", "Hi", "--max-new-tokens", "2", "--json", env=dict(run_env(), DIALOGPT_EDGE_MODEL=str(tiny_model)))
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["ids"]) == 2
    stale = cli("generate", "--prompt", "Hi", env=dict(run_env(), DIALOGPT_EDGE_MODEL="/no/such/model"))
    assert stale.returncode == 1
    assert stale.stderr.startswith("error: $DIALOGPT_EDGE_MODEL names /no/such/model, which does not exist")


def test_generate_stops_where_the_positions_run_out(tiny_model, capsys):
    # the tiny model has 1024 positions; 1015 words + eos leave room for 9 tokens (the last one is never fed)
    prompt = " ".join(["word"] * 1015)
    assert main(["generate", "-m", str(tiny_model), "--prompt", prompt, "--max-new-tokens", "64", "--min-new-tokens", "64", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["prompt_tokens"] == 1016
    assert (len(result["ids"]), result["stopped_by"]) == (9, "positions")
    assert err.startswith("note: the reply stopped at 9 tokens") and "1024 positions" in err
    assert main(["generate", "-m", str(tiny_model), "--prompt", prompt, "--max-new-tokens", "5", "--json"]) == 0
    out, err = capsys.readouterr()
    assert (len(json.loads(out)["ids"]), json.loads(out)["stopped_by"], err) == (5, "max_new_tokens", "")


def test_zero_new_tokens(tiny_model, capsys):
    assert main(["generate", "-m", str(tiny_model), "--prompt", "Hi", "--max-new-tokens", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", "--model", "/nonexistent/model", "--prompt", "Hi"], "does not exist"),
    ],
)
def test_errors_are_one_line(args, fragment):
    proc = cli(*args)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_context_overflow_is_a_clear_error(tiny_model, capsys):
    long_prompt = "word " * 1100
    assert main(["generate", "-m", str(tiny_model), "--prompt", long_prompt, "--max-new-tokens", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "1024 positions" in err


def test_version_names_the_runtime_libraries():
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stderr == ""
    from importlib import metadata

    line = proc.stdout.strip()
    assert line.startswith(f"dialogpt-edge {metadata.version('dialogpt-edge')} (python ")
    for dist in ("onnxruntime", "numpy", "tokenizers"):
        assert f"{dist} {metadata.version(dist)}" in line


def test_usage_errors_exit_2():
    assert cli("generate", "--prompt", "Hi", "--max-new-tokens", "-3").returncode == 2
    assert cli("frobnicate").returncode == 2


@pytest.mark.parametrize("threads, fragment", [("0", "must be >= 1, got 0"), ("two", "must be an integer >= 1"),
                                                ("99999", "must be between 1 and")])
def test_thread_counts_are_checked_before_loading(threads, fragment):
    # 99999 used to be handed to onnxruntime, which started that many threads
    proc = cli("generate", "--prompt", "Hi", "--threads", threads)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: argument --threads: ") and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_export_without_the_extra_names_the_fix(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "dialogpt_edge.export.pipeline", None)  # as if optimum & co. were missing
    assert main(["export", "some/model", "--output", "x"]) == 1
    assert "pip install 'dialogpt-edge[export]'" in capsys.readouterr().err


def test_help_shows_only_defaults_that_say_something():
    """--help never prints '(default: None)', nor a second default after one the help text gives."""
    from dialogpt_edge.runtime.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            shown = formatter._get_help_string(action) or ""
            assert "(default: None)" not in shown and "(default: False)" not in shown, (name, action.dest)
            assert shown.count("(default:") <= 1, (name, action.dest, shown)
    chat = " ".join(subparsers.choices["chat"].format_help().split())
    assert "(default: 0.8)" in chat
    generate = " ".join(subparsers.choices["generate"].format_help().split())
    assert "--temperature TEMPERATURE 0 = greedy (default: 0.0)" in generate  # 0 == False, yet it is shown
