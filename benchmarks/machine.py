"""What the numbers were measured on: CPU, cores, memory read bandwidth."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

from dialogpt_edge.runtime.cpus import CPUINFO, first_cpu_fields

# widest first: what decides which onnxruntime and llama.cpp kernels run
_ISA = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx_vnni", "AVX2 VNNI"),
        ("avx2", "AVX2"), ("asimddp", "NEON dot product"))


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The model name, with the CPU family and model and its widest vector ISA where /proc/cpuinfo has
    them: virtual machines often report only "AMD EPYC", which names a Zen 2 and a Zen 5 alike."""
    fields = first_cpu_fields(cpuinfo) or {}
    name = fields.get("model name") or platform.processor() or platform.machine()
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    flags = set(fields.get("flags", "").split())
    isa = next((label for flag, label in _ISA if flag in flags), None)
    return f"{name} ({', '.join(details + ([isa] if isa else []))})" if details or isa else name


def describe() -> dict:
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "memory_gb": mem_gb, "python": platform.python_version()}


def read_bandwidth_gbps(threads: int = 2, mb: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth over a buffer far larger than any cache, `threads` readers.

    Two readers, the faster counts: np.max (numpy's SIMD loop, one compare per element) and np.sum.
    np.sum alone was compute-bound on AVX-512 CPUs: on a 2-core AMD EPYC Zen 5 it read 41.7 GB/s
    where np.max read 67.7 and our fp32 decode streamed its weights at about 64 (so fp32 ran at
    0.63-0.81x a "floor" it cannot beat; benchmarks/results/experiments.md). np.sum stays for numpy
    builds without a SIMD max.
    """
    buf = np.ones(mb * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(buf, threads)
    best = 0.0
    for reader in (np.max, np.sum):  # both release the GIL
        for _ in range(repeats):
            workers = [threading.Thread(target=reader, args=(p,)) for p in parts]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best
