"""What this process's CPUs are: how many it may use, the physical cores and cgroup CPU limit they
make (the thread defaults), and whether their int8 kernels can be trusted to add without clamping."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

_SYSFS = Path("/sys/devices/system/cpu")
_CGROUPS = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")
CPUINFO = Path("/proc/cpuinfo")

_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
# /proc/cpuinfo flags of the instructions that sum u8 x s8 products in 32 bits
_EXACT_INT8_DOT = {"avx512_vnni", "avx_vnni", "amx_int8"}


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or a cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(sysfs: Path = _SYSFS) -> int:
    """One thread per physical core among the usable CPUs, as onnxruntime and llama.cpp default to,
    and no more than the cgroup's CPU limit allows (rounded up).

    Decode is memory-bound: a hyper-thread sibling adds no bandwidth and contends for its core.
    Where the topology cannot be read (not Linux, a container without /sys), every usable CPU counts.
    A CPU limit (`docker --cpus`, a Kubernetes limit) leaves every core visible but throttles the
    process once its threads together use the quota: under a one-CPU quota on this two-core machine,
    two threads decoded 256 int4 tokens at 10.1-12.4 ms/token, one thread at 8.4-9.6
    (benchmarks/results/experiments.md).
    """
    quota = cpu_quota()
    cores = _physical_cores(sysfs)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def _physical_cores(sysfs: Path) -> int:
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


def cpu_quota(proc_cgroup: Path = _PROC_CGROUP, root: Path = _CGROUPS) -> float | None:
    """CPUs' worth of time per period that this process's cgroups allow, the tightest of them and
    their ancestors (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`); None where unlimited or unreadable."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:  # cgroup v2
            limits += [_v2_limit(folder) for folder in _up_from(root, path)]
        elif "cpu" in controllers.split(","):  # cgroup v1, mounted as "cpu,cpuacct" or "cpu"
            base = root / controllers if (root / controllers).is_dir() else root / "cpu"
            limits += [_v1_limit(folder) for folder in _up_from(base, path)]
    limits = [limit for limit in limits if limit]
    return min(limits) if limits else None


def _up_from(base: Path, path: str) -> list[Path]:
    """The cgroup folder of `path` under `base`, then each ancestor up to `base` itself."""
    folder = base / path.strip("/")
    chain = [folder]
    while folder != base and base in folder.parents:
        folder = folder.parent
        chain.append(folder)
    return chain


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def int8_products_saturate(cpuinfo: Path = CPUINFO, machine: str | None = None) -> bool:
    """Whether onnxruntime's u8 x s8 matrix kernels clamp on this CPU: x86 without VNNI or AMX.

    There they multiply with `vpmaddubsw`, which adds each pair of neighbouring products into a
    saturating 16-bit sum: two 255 x 127 products make 64,770, clamped to 32,767. VNNI and AMX sum
    in 32 bits, and other architectures have no such kernel. An int8 export's weights use the full
    +-127, so on such CPUs (many AMD EPYC and Ryzen before Zen 4, Intel before Ice Lake) a random-weight
    model's top-1 agreement with fp32 fell from 90 % to 72 % (benchmarks/results/experiments.md).
    Where the flags cannot be read, an x86 CPU counts as clamping: the exact kernel is the safe side.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return False
    flags = _cpu_flags(cpuinfo)
    return flags is None or not (flags & _EXACT_INT8_DOT)


def first_cpu_fields(cpuinfo: Path = CPUINFO) -> dict[str, str] | None:
    """The first CPU's "key: value" fields in /proc/cpuinfo ("model name", "flags", ...), keys and values
    stripped of the file's tab padding; None where it cannot be read (not Linux).

    Read only up to that CPU's end: the kernel writes the file CPU by CPU, slowly on big machines.
    """
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields[key.strip()] = value.strip()
    except OSError:
        return None
    return fields


def _cpu_flags(cpuinfo: Path) -> set[str] | None:
    """The first CPU's feature flags: Linux's /proc/cpuinfo, else numpy's own CPU dispatch table."""
    fields = first_cpu_fields(cpuinfo)
    if fields and "flags" in fields:
        return set(fields["flags"].split())
    try:  # not Linux: numpy probes CPUID itself (it names AVX-512 VNNI, not the VEX-encoded AVX-VNNI)
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        return None
    return {"avx512_vnni"} if __cpu_features__.get("AVX512VNNI") else set()
