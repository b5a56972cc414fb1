"""The runtime path never imports torch, transformers or optimum."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import run_env

PROBE = """
import json, sys
from dialogpt_edge.runtime.cli import main
main(["generate", "--model", sys.argv[1], "--prompt", "Hello", "--max-new-tokens", "4", "--json"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum", "onnx"))
print(json.dumps(heavy))
"""


def test_generate_imports_nothing_heavy(tiny_model):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tiny_model)], capture_output=True, text=True, env=run_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(json.loads(lines[0])["ids"]) == 4
    assert json.loads(lines[-1]) == []
