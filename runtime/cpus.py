"""The CPUs this process may run on, and how many physical cores they make: the thread defaults."""

from __future__ import annotations

import os
from pathlib import Path

_SYSFS = Path("/sys/devices/system/cpu")


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or a cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(sysfs: Path = _SYSFS) -> int:
    """One thread per physical core among the usable CPUs, as onnxruntime and llama.cpp default to.

    Decode is memory-bound: a hyper-thread sibling adds no bandwidth and contends for its core.
    Where the topology cannot be read (not Linux, a container without /sys), every usable CPU counts.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return usable_cpus()
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        for name in ("core_cpus_list", "thread_siblings_list"):  # the newer name, then the older
            try:
                cores.add((topology / name).read_text().strip())
                break
            except OSError:
                continue
        else:
            return max(1, len(cpus))
    return max(1, len(cores))
