"""Benchmark records: one JSON object per measurement, the markdown table made from them, and the files."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import numpy as np

from dialogpt_edge.runtime.manifest import installed_versions

from . import machine

SCHEMA_VERSION = 1


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def kv_value_bytes(backend: str, precision: str) -> int:
    """Bytes per cached key/value element: llama.cpp keeps an f16 cache; ours (and genai, which runs ours'
    exports) as its precision says."""
    if backend in ("ours", "genai"):
        from dialogpt_edge.benchmarks.backends.ours import cache_dtype

        return {"int8": 1, "fp16": 2, "fp32": 4}[cache_dtype(precision)]
    return 2 if backend == "llamacpp" else 4


def make_record(*, plan, backend, precision, threads, n_prompt, passes, reference_ids, weights_bytes, config, bandwidth_gbps) -> dict:
    decode = np.concatenate([np.asarray(r["decode_ms"]) for p in passes for r in p["runs"]])
    pass_medians = [float(np.median(np.concatenate([r["decode_ms"] for r in p["runs"]]))) for p in passes]
    ttft = [r["ttft_ms"] for p in passes for r in p["runs"]]
    ids = passes[0]["runs"][0]["ids"]
    match = None
    if reference_ids is not None:
        same = next((i for i, (a, b) in enumerate(zip(ids, reference_ids)) if a != b), len(ids))
        match = same / len(ids)
    # decoding reads every weight once, plus the cache at the mean context of the timed steps
    context = n_prompt + plan.new_tokens / 2
    kv_bytes = 2 * config["n_layer"] * config["n_embd"] * kv_value_bytes(backend, precision) * context
    floor_ms = (weights_bytes + kv_bytes) / (bandwidth_gbps * 1e9) * 1e3
    median = float(np.median(decode))
    return {
        "schema_version": SCHEMA_VERSION,
        "model": plan.label,
        "backend": backend,
        "backend_version": passes[0]["version"],
        "precision": precision,
        "threads": threads,
        "prompt_tokens": n_prompt,
        "new_tokens": plan.new_tokens,
        "warmup": plan.warmup,
        "runs": plan.runs,
        "passes": plan.passes,
        "load_s": float(np.median([p["load_s"] for p in passes])),
        "cold_start_s": float(np.median([p["cold_start_s"] for p in passes])),
        "ttft_ms": float(np.median(ttft)),
        "decode_ms_median": median,
        "decode_ms_p90": float(np.percentile(decode, 90)),
        "decode_ms_pass_spread": [min(pass_medians), max(pass_medians)],
        "tokens_per_s": 1e3 / median,
        "peak_rss_mb": float(np.median([p["peak_rss_mb"] for p in passes])),
        "model_size_mb": weights_bytes / 2**20,
        "memory_bandwidth_gbps": bandwidth_gbps,
        "floor_ms": floor_ms,
        "x_floor": median / floor_ms,
        "greedy_match_vs_torch": match,
        "machine": machine.describe() | {"platform": platform.platform()},
        "packages": installed_versions(
            "dialogpt-edge", "onnxruntime", "numpy", "torch", "transformers", "optimum-onnx", "ctranslate2", "llama-cpp-python"
        ),
        "git_sha": _git_sha(),
        "command": plan.command,
        "per_run": [{k: v for k, v in r.items() if k != "ids"} | {"pass": i} for i, p in enumerate(passes) for r in p["runs"]],
    }


def to_markdown(records: list[dict], chat: dict | None = None) -> str:
    lines = []
    groups = {}
    for r in records:
        groups.setdefault((r["model"], r["threads"], r["prompt_tokens"]), []).append(r)
    for (model, threads, n_prompt), rows in groups.items():
        base = next((r for r in rows if r["backend"] == "pytorch" and r["precision"] == "fp32"), None)
        lines += [f"**{model}**, {threads} threads, prompt {n_prompt} tokens, {rows[0]['new_tokens']} new tokens", "",
                  "| backend | precision | decode ms/token (p90) | vs PyTorch | x memory floor | first token ms | cold start s | peak RSS MiB | size MiB | greedy = torch |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["decode_ms_median"]):
            ratio = f"{r['decode_ms_median'] / base['decode_ms_median']:.2f}x" if base else "n/a"
            match = "n/a" if r["greedy_match_vs_torch"] is None else f"{r['greedy_match_vs_torch']:.0%}"
            lines.append(
                f"| {r['backend']} | {r['precision']} | {r['decode_ms_median']:.2f} ({r['decode_ms_p90']:.2f}) | {ratio} | "
                f"{r['x_floor']:.2f} | {r['ttft_ms']:.1f} | {r['cold_start_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['model_size_mb']:.1f} | {match} |"
            )
        m = rows[0]["machine"]
        lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores; memory read bandwidth {rows[0]['memory_bandwidth_gbps']:.1f} GB/s"
                  + (f" (best of probes {', '.join(f'{b:.1f}' for b in rows[0]['bandwidth_probes_gbps'])})" if rows[0].get("bandwidth_probes_gbps") else "") + ". "
                  f"Medians over {_count(rows[0]['passes'], 'rotated pass', 'rotated passes')} x {_count(rows[0]['runs'], 'run', 'runs')}. "
                  f"Command: `{rows[0]['command']}`.", ""]
        versions = sorted({(r["backend"], r["backend_version"]) for r in rows})  # a peer's build and mode decide its row
        lines += ["Versions: " + "; ".join(f"{name}: {v}" for name, v in versions) + ".", ""]
    if chat:
        lines += [f"**Chat, time to first token per turn** ({chat['precision']}, {chat['threads']} threads, greedy 24-token replies)", "",
                  "| turn | prefilled tokens (cache kept) | first token ms (cache kept) | prefilled tokens (no cache) | first token ms (no cache) |",
                  "|---|---|---|---|---|"]
        c, u = chat["cached"], chat["uncached"]
        for i in range(len(c["ttft_ms"])):
            lines.append(f"| {i + 1} | {c['prefill_tokens'][i]} | {c['ttft_ms'][i]:.1f} | {u['prefill_tokens'][i]} | {u['ttft_ms'][i]:.1f} |")
        lines.append("")
    notes = sorted({n for r in records for n in r.get("notes", [])})
    if notes:
        lines += ["Not measured: " + "; ".join(notes) + ".", ""]
    return "\n".join(lines)


def write_outputs(plan, records: list[dict], chat: dict | None) -> list[Path]:
    out = plan.output
    out.mkdir(parents=True, exist_ok=True)
    stem = plan.label.split(" ")[0].lower().replace("/", "_")
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps({"records": records, "chat": chat}, indent=1) + "\n")
    md_path = out / f"{stem}.md"
    md_path.write_text(to_markdown(records, chat) + "\n")
    paths = [json_path, md_path]
    try:
        from .plot import plot_records

        paths += plot_records(records, out / stem)
    except ImportError:
        pass  # matplotlib is in the bench extra; the JSON and table are the record
    return paths


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
