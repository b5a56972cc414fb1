"""One measurement in a fresh process: load a backend, warm up, time N greedy runs, report JSON on stdout.

    python -m dialogpt_edge.benchmarks.worker '{"backend": ..., "artifact": ..., ...}'

The parent passes its wall-clock time at spawn (spawn_t), so load and cold start
include interpreter start-up and imports, as a user would wait for them.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    """This process's own high-water RSS. (getrusage's ru_maxrss survives exec on Linux, so a worker
    forked from a big parent would report the parent's peak.)"""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    spec = json.loads(sys.argv[1])
    from dialogpt_edge.benchmarks.backends import backend_module

    module = backend_module(spec["backend"])
    runner = module.Runner(__import__("pathlib").Path(spec["artifact"]), spec["threads"], spec["precision"])
    ready_t = time.time()
    prompt, n_new = spec["prompt_ids"], spec["new_tokens"]

    runs = []
    for r in range(spec["warmup"] + spec["runs"]):
        start = time.perf_counter()
        start_wall = time.time()
        ids, stamps = runner.generate(prompt, n_new)
        if len(ids) != n_new or len(stamps) != n_new:
            raise SystemExit(f"{spec['backend']} produced {len(ids)} tokens, expected {n_new}")
        steps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
        run = {"ttft_ms": (stamps[0] - start) * 1e3, "decode_ms": steps, "ids": ids}
        if r == 0:  # the first generation of a fresh process: the user's cold start
            run["cold_start_s"] = start_wall - spec["spawn_t"] + (stamps[0] - start)
        runs.append(run)
    out = {
        "load_s": ready_t - spec["spawn_t"],
        "cold_start_s": runs[0]["cold_start_s"],
        "peak_rss_mb": peak_rss_mb(),
        "version": getattr(runner, "version", module.version)(),  # a runner may add how it ran
        "runs": runs[spec["warmup"]:],
    }
    print("BENCH_RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
