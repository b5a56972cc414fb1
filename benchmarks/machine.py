"""What the numbers were measured on: CPU, cores, memory read bandwidth."""

from __future__ import annotations

import os
import platform
import threading
import time

import numpy as np


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "memory_gb": mem_gb, "python": platform.python_version()}


def read_bandwidth_gbps(threads: int = 2, mb: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth over a buffer far larger than any cache, `threads` readers."""
    buf = np.ones(mb * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(buf, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]  # np.sum releases the GIL
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best
