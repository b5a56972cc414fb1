"""onnxruntime's repacked weights moved onto 2 MiB pages (Linux), right after it has made them.

onnxruntime copies every quantized weight matrix into its kernels' layout when a session is
created, into ordinary heap memory: 4 KiB pages, so streaming the weights once per token walks
tens of thousands of pages and misses the TLB on most of them. Where transparent huge pages are
only given on request (`madvise`, the usual setting) nothing asks for them. `MADV_COLLAPSE`
(Linux 6.1+) asks after the fact: the kernel copies each 2 MiB window of the new memory onto one
huge page. On a 2-core AMD EPYC that made decode 8-14 % faster for small int8 and int4 and 4-12 %
for medium (benchmarks/results/experiments.md); the copying, about 1 ms per MiB there, runs
on a thread of its own that holds still while a prompt is read in (Collapse).

Only windows that came into being while the session was created and are wholly resident are
collapsed: a window that was never touched would become resident (peak RSS), and memory that was
there before (the interpreter's heap, a tokenizer's) is not ours to move.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger("dialogpt_edge")

HUGE = 2 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_COLLAPSE = 25
ENV = "DIALOGPT_EDGE_HUGEPAGES"  # "0" turns this off

Regions = list[tuple[int, int]]


def wanted() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(ENV, "1") != "0"


def anonymous_regions() -> Regions:
    """This process's private, writable, anonymous mappings as (start, end); [] where there is no /proc."""
    regions = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) == 5 and fields[1].startswith("rw") and fields[1].endswith("p"):  # no path: anonymous
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    regions.append((start, end))
    except OSError:
        return []
    return regions


def new_windows(before: Regions, after: Regions) -> list[int]:
    """Start addresses of the 2 MiB-aligned windows inside `after`'s regions that no region of `before` overlaps."""
    windows = []
    for start, end in after:
        first = (start + HUGE - 1) & ~(HUGE - 1)
        for window in range(first, end - HUGE + 1, HUGE):
            if not any(s < window + HUGE and window < e for s, e in before):
                windows.append(window)
    return windows


def collapse_new(before: Regions, wait: Callable[[], object] = lambda: None) -> int:
    """Collapse the wholly resident windows made since `before` was taken; the bytes moved onto huge pages.

    `wait()` is called before each window (Collapse holds the copying there while a prompt runs).
    Any failure (an older kernel, another OS, a sandbox that forbids it) leaves the memory as it was.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise, mincore = libc.madvise, libc.mincore
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    resident = (ctypes.c_ubyte * (HUGE // _PAGE))()
    moved = 0
    for window in new_windows(before, anonymous_regions()):
        wait()  # before the residency check, which must still hold when the window is copied
        if mincore(window, HUGE, resident) != 0 or not all(b & 1 for b in resident):
            continue
        if madvise(window, HUGE, _MADV_COLLAPSE) == 0:
            moved += HUGE
            continue
        error = ctypes.get_errno()
        if error in (errno.EINVAL, errno.EPERM, errno.ENOSYS):  # no MADV_COLLAPSE, THP off, forbidden: give up
            log.debug("no huge pages for the weights: madvise(MADV_COLLAPSE) failed: %s", os.strerror(error))
            break
        # other errors (EAGAIN, ENOMEM: no free huge page now) leave this window as it is and go on
    return moved


class Collapse:
    """collapse_new(before) on a thread of its own, so that loading does not wait for the copying (about
    1 ms per MiB here, 0.3-0.4 s for a medium int8 model): the session runs meanwhile, on 4 KiB pages
    until each window has moved (the kernel moves a window under its own locks, as khugepaged does
    for any running process, so the other threads read the same bytes throughout). `bytes()` waits
    for it and says how much moved.

    The copying takes a core, and with two cores a prompt read in beside it came out up to 2.9x
    slower (DialoGPT-large shape, int8: first token 270 -> 620-780 ms, cold start 1.03 -> 1.38-1.68 s;
    benchmarks/results/experiments.md). So it holds between windows while a prompt runs (`paused()`),
    and catches up during the typing before one or the decoding after it.
    """

    def __init__(self, before: Regions):
        self._moved = 0
        self._go = threading.Event()
        self._go.set()
        self._thread = threading.Thread(target=self._run, args=(before,), name="dialogpt-edge-hugepages", daemon=True)
        self._thread.start()

    def _run(self, before: Regions) -> None:
        self._moved = collapse_new(before, self._go.wait)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new window is started inside this block (the one being copied, about 2 ms, finishes)."""
        self._go.clear()
        try:
            yield
        finally:
            self._go.set()

    def bytes(self) -> int:
        self._thread.join()
        return self._moved
