"""Thread defaults: one per physical core among the CPUs this process may use."""

import pytest

from dialogpt_edge.runtime import cpus


def fake_sysfs(root, siblings: dict[int, str]):
    for cpu, core in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(core + "\n")
    return root


@pytest.mark.parametrize("affinity, expected", [({0, 1, 2, 3}, 2), ({0, 2}, 1), ({0, 1}, 2), ({3}, 1)])
def test_hyper_thread_siblings_count_as_one_core(tmp_path, monkeypatch, affinity, expected):
    # two cores with two hyper-threads each, numbered as Linux does: cpu0 and cpu2 share a core
    sysfs = fake_sysfs(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: affinity)
    assert cpus.default_threads(sysfs) == expected


def test_newer_kernels_core_cpus_list_is_read_first(tmp_path, monkeypatch):
    sysfs = fake_sysfs(tmp_path, {0: "0-1", 1: "0-1"})
    (sysfs / "cpu0" / "topology" / "core_cpus_list").write_text("0\n")
    (sysfs / "cpu1" / "topology" / "core_cpus_list").write_text("1\n")
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpus.default_threads(sysfs) == 2


def test_without_a_readable_topology_every_usable_cpu_counts(tmp_path, monkeypatch):
    sysfs = fake_sysfs(tmp_path, {0: "0,1"})  # cpu1 has no topology folder
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpus.default_threads(sysfs) == 2
    assert cpus.usable_cpus() == 2


def test_this_machine_gets_at_least_one_thread_and_no_more_than_its_cpus():
    assert 1 <= cpus.default_threads() <= cpus.usable_cpus()
