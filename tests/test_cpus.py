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


def fake_cgroups(tmp_path, proc_lines: str, files: dict[str, str]):
    (tmp_path / "proc_cgroup").write_text(proc_lines)
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return tmp_path / "proc_cgroup", root


@pytest.mark.parametrize("proc_lines, files, expected", [
    # cgroup v2, as inside a container (its own cgroup is the root): docker --cpus 1.5
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    # v2 nested: the parent's limit is the tighter one
    ("0::/kubepods/pod1\n", {"kubepods/cpu.max": "100000 100000\n", "kubepods/pod1/cpu.max": "400000 100000\n"}, 1.0),
    # cgroup v1, controllers mounted together; -1 is no limit
    ("4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
                                     "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 2.0),
    ("1:cpu:/x\n0::/\n", {"cpu/x/cpu.cfs_quota_us": "-1\n", "cpu/x/cpu.cfs_period_us": "100000\n"}, None),
    ("1:cpu:/x\n", {"cpu/x/cpu.cfs_quota_us": "garbage\n", "cpu/x/cpu.cfs_period_us": "100000\n"}, None),
    ("", {}, None),
])
def test_the_cgroup_cpu_limit_is_read_from_v1_and_v2(tmp_path, proc_lines, files, expected):
    proc, root = fake_cgroups(tmp_path, proc_lines, files)
    assert cpus.cpu_quota(proc, root) == expected


@pytest.mark.parametrize("quota, expected", [(None, 2), (1.0, 1), (1.5, 2), (0.2, 1), (8.0, 2)])
def test_the_default_thread_count_stays_within_the_cpu_limit(tmp_path, monkeypatch, quota, expected):
    """A quota throttles the process once its threads together use it; under a one-CPU quota on two
    cores two threads decoded slower than one (benchmarks/results/experiments.md)."""
    sysfs = fake_sysfs(tmp_path, {0: "0", 1: "1"})
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpus, "cpu_quota", lambda: quota)
    assert cpus.default_threads(sysfs) == expected


def test_a_missing_proc_file_means_no_limit(tmp_path):
    assert cpus.cpu_quota(tmp_path / "absent", tmp_path) is None


@pytest.mark.parametrize("machine, flags, clamps", [
    ("x86_64", "fpu sse2 avx avx2 fma", True),  # AVX2 without VNNI: vpmaddubsw's 16-bit pair sums
    ("x86_64", "fpu avx2 avx512f avx512bw", True),  # AVX-512 without VNNI clamps the same way
    ("x86_64", "fpu avx2 avx512f avx512_vnni", False),
    ("x86_64", "fpu avx2 avx_vnni", False),  # the VEX-encoded VNNI of client CPUs without AVX-512
    ("AMD64", "avx2", True),
    ("aarch64", "fp asimd asimddp", False),  # no such kernel off x86
])
def test_int8_products_saturate_where_x86_lacks_vnni(tmp_path, machine, flags, clamps):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpus.int8_products_saturate(cpuinfo, machine) is clamps


def test_unreadable_cpu_flags_fall_back_to_numpy_then_to_the_exact_kernel(tmp_path, monkeypatch):
    from numpy._core import _multiarray_umath

    missing = tmp_path / "no-cpuinfo"
    monkeypatch.setattr(_multiarray_umath, "__cpu_features__", {"AVX2": True, "AVX512VNNI": True})
    assert cpus.int8_products_saturate(missing, "x86_64") is False
    monkeypatch.setattr(_multiarray_umath, "__cpu_features__", {"AVX2": True, "AVX512VNNI": False})
    assert cpus.int8_products_saturate(missing, "x86_64") is True
