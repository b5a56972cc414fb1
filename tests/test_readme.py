"""The README documents every flag that `--help` offers, and the commands CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from dialogpt_edge.runtime.cli import build_parser

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_flag_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in README, f"`dialogpt-edge {name} {flag}` is not in the README"


def test_ci_runs_the_readme_commands():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    install = re.search(r"^pip install -e \S+$", ci, re.M).group(0)
    test = re.search(r"^python -m pytest.*$", ci, re.M).group(0)
    assert install in README and test in README


def test_the_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python example, as written, on the shipped model, from a directory that is not the
    repository (it finds the model through shipped_model_dir())."""
    code = re.search(r"## From Python\n\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # the first reply
