"""Where a decode step's time goes: onnxruntime's own per-op profile over N greedy steps.

    python -m dialogpt_edge.benchmarks.profile MODEL_DIR [--steps 64] [--prompt-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import onnxruntime as ort

from dialogpt_edge.runtime import SamplingConfig, generate, open_model
from dialogpt_edge.runtime.session import session_options


def profile(model: Path, steps: int, prompt_tokens: int, threads: int) -> str:
    session = open_model(model, threads=threads)  # the graph open_model() runs (prepacked if DIALOGPT_EDGE_PREPACK=1)
    spec = session.spec
    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = "/tmp/dialogpt-edge-profile"
    session._session = ort.InferenceSession(str(session.graph), opts, providers=["CPUExecutionProvider"])
    prompt = [(1000 + 7 * i) % spec.vocab_size for i in range(prompt_tokens)]
    greedy = SamplingConfig.greedy()
    list(generate(session, prompt, greedy, max_new_tokens=4, min_new_tokens=4))  # warm-up
    start = time.perf_counter()
    list(generate(session, prompt, greedy, max_new_tokens=steps + 1, min_new_tokens=steps + 1))
    wall_ms = (time.perf_counter() - start) * 1e3
    events = json.loads(Path(session._session.end_profiling()).read_text())
    by_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    total = sum(by_op.values())
    nodes_per_run = sum(count.values()) / (steps + 2 + 4 + 1)
    lines = [f"{model}: {steps} decode steps after a {prompt_tokens}-token prompt, {threads} threads; "
             f"wall {wall_ms:.0f} ms for prefill + steps; kernels {total / 1e3:.0f} ms; ~{nodes_per_run:.0f} nodes per run",
             "| op | share of kernel time | ms | calls |", "|---|---|---|---|"]
    for op, us in by_op.most_common(12):
        lines.append(f"| {op} | {us / total:.1%} | {us / 1e3:.1f} | {count[op]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(profile(args.model, args.steps, args.prompt_tokens, args.threads))


if __name__ == "__main__":
    main()
