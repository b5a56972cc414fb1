"""onnxruntime's new weight memory moved onto 2 MiB pages, and nothing else (runtime/hugepages.py)."""

from __future__ import annotations

import mmap
import platform
import sys
import threading

import numpy as np
import pytest

from dialogpt_edge.runtime import hugepages, load
from dialogpt_edge.runtime.session import Session

MiB = 1 << 20


def test_only_windows_that_no_earlier_region_touches_are_new():
    H = hugepages.HUGE
    before = [(0, 3 * H), (10 * H + 5, 11 * H)]
    after = [(0, 6 * H + 7), (10 * H, 13 * H)]  # the first region grew; the second was merged into a bigger one
    assert hugepages.new_windows(before, after) == [3 * H, 4 * H, 5 * H, 11 * H, 12 * H]
    assert hugepages.new_windows([], [(H + 1, 3 * H + 1)]) == [2 * H]  # aligned windows only


def _smaps(address: int) -> dict[str, int]:
    """Rss and AnonHugePages (kB) of the mapping that holds `address` (anonymous mappings side by side merge)."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.split(":")[0] in ("Rss", "AnonHugePages"):
                fields[line.split(":")[0]] = int(line.split()[1])
    return fields


def _collapse_supported() -> bool:
    """Linux 6.1+ with transparent huge pages not switched off."""
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
    version = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    return "[never]" not in mode and version >= (6, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")
def test_new_resident_memory_is_collapsed_and_untouched_memory_stays_unresident():
    before = hugepages.anonymous_regions()
    touched = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # as malloc maps big blocks
    sparse = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
                       prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)  # PROT_EXEC: not merged with `touched`
    np.frombuffer(touched, np.uint8)[:] = 7
    np.frombuffer(sparse, np.uint8)[:: 64 * 1024] = 1  # one page in sixteen
    start = lambda m: np.frombuffer(m, np.uint8).ctypes.data  # noqa: E731
    sparse_rss = _smaps(start(sparse))["Rss"]

    moved = hugepages.collapse_new(before)

    assert _smaps(start(sparse))["Rss"] == sparse_rss  # no page of it was made resident
    huge_kb = _smaps(start(touched)).get("AnonHugePages", 0)
    if _collapse_supported():
        assert huge_kb >= 2 * 1024 and moved >= huge_kb * 1024  # the aligned windows of `touched`, at least
    assert np.frombuffer(touched, np.uint8).min() == 7  # the data moved with the pages
    # (the tests' own process may have made other memory since `before`, which collapse_new may also move)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")
def test_no_window_is_collapsed_while_the_copying_is_held():
    before = hugepages.anonymous_regions()
    touched = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    np.frombuffer(touched, np.uint8)[:] = 7
    go, moved = threading.Event(), []
    copier = threading.Thread(target=lambda: moved.append(hugepages.collapse_new(before, go.wait)))
    copier.start()
    copier.join(0.3)
    start = np.frombuffer(touched, np.uint8).ctypes.data
    assert copier.is_alive() and _smaps(start).get("AnonHugePages", 0) == 0  # held before its first window
    go.set()
    copier.join()
    if _collapse_supported():
        assert _smaps(start).get("AnonHugePages", 0) >= 2 * 1024 and moved[0] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are asked for on Linux only")
def test_a_session_holds_the_copying_while_a_prompt_runs_and_not_while_it_decodes(tiny_int4, monkeypatch):
    monkeypatch.delenv(hugepages.ENV, raising=False)
    held = []
    paused = hugepages.Collapse.paused
    monkeypatch.setattr(hugepages.Collapse, "paused", lambda self: held.append(len(held)) or paused(self))
    session = Session(load(tiny_int4))
    cache = session.new_cache()
    token = int(session.prefill([464, 3290, 318], cache).argmax())
    assert held == [0]
    session.decode_step(token, cache)
    assert held == [0]  # decode steps run beside the copying: waiting would stall the reply
    session.prefill([257, 1332], cache)  # a chat's next turn
    assert held == [0, 1]


def test_a_session_with_huge_pages_computes_what_one_without_does(tiny_int4, monkeypatch):
    spec = load(tiny_int4)
    ids = [464, 3290, 318, 257, 1332]
    monkeypatch.setenv(hugepages.ENV, "0")
    plain = Session(spec)
    assert plain.huge_page_bytes == 0
    expected = plain.forward(ids, plain.new_cache())
    monkeypatch.delenv(hugepages.ENV)
    huge = Session(spec)
    np.testing.assert_array_equal(huge.forward(ids, huge.new_cache()), expected)
    assert huge.huge_page_bytes % hugepages.HUGE == 0


def test_nothing_is_moved_off_linux_or_when_turned_off(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not hugepages.wanted()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv(hugepages.ENV, "0")
    assert not hugepages.wanted()
    monkeypatch.delenv(hugepages.ENV)
    assert hugepages.wanted()
