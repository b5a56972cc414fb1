"""open_model(prepack=True) runs this CPU's prepacked copy of the graph: same logits, built once, never trusted blindly."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from dialogpt_edge.runtime import ModelFolderError, Session, load, open_model
from dialogpt_edge.runtime import prepacked

PROMPT = [15496, 11, 703, 389, 345, 30, 314, 1101]


def run(session: Session, steps: int = 12) -> np.ndarray:
    """Prompt logits, then greedy decode-step logits, stacked."""
    cache = session.new_cache()
    rows = [session.forward(PROMPT, cache)]
    token = int(rows[0][-1].argmax())
    for _ in range(steps):
        row = session.decode_step(token, cache)
        rows.append(row[None])
        token = int(row.argmax())
    return np.concatenate(rows)


@pytest.fixture(autouse=True)
def exact_int8_kernels(monkeypatch):
    """These tests are about the packed copy: the unpacked one for clamping CPUs is kept out of them
    (and tested on its own below), so that they run alike on every CPU."""
    from dialogpt_edge.runtime import session

    monkeypatch.setattr(session, "int8_products_saturate", lambda: False)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache, and prepacking on (DIALOGPT_EDGE_PREPACK=1) for open_model() calls that do not choose."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DIALOGPT_EDGE_CACHE_DIR", str(root))
    monkeypatch.setenv("DIALOGPT_EDGE_PREPACK", "1")
    return root


def entries(cache_dir):
    folder = cache_dir / "prepacked"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_int8", "tiny_int4"])
def test_prepacked_copy_gives_the_same_logits_bit_for_bit(fixture, request, cache_dir):
    folder = request.getfixturevalue(fixture)
    reference = run(Session(load(folder)))
    first = open_model(folder)  # builds the copy
    assert first.graph.parent.parent == cache_dir / "prepacked"
    stamp = json.loads((first.graph.parent / prepacked.STAMP_FILE).read_text())
    # the packed weights are in the copy's data file, next to the originals
    assert stamp["files"][prepacked.DATA_FILE] > (folder / prepacked.DATA_FILE).stat().st_size
    np.testing.assert_array_equal(run(first), reference)
    np.testing.assert_array_equal(run(open_model(folder)), reference)


def test_second_open_maps_the_cached_copy_without_rebuilding(tiny_int8, cache_dir, caplog):
    with caplog.at_level(logging.INFO, logger="dialogpt_edge"):
        graph = open_model(tiny_int8).graph
    assert any("packing the weights" in r.getMessage() for r in caplog.records)
    written = graph.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dialogpt_edge"):
        assert open_model(tiny_int8).graph == graph
    assert graph.stat().st_mtime_ns == written
    assert caplog.records == []
    assert entries(cache_dir) == [graph.parent.name]  # no staging folders left behind


def test_the_copy_is_keyed_by_cpu_and_onnxruntime(tiny_int8, cache_dir, monkeypatch):
    graph = open_model(tiny_int8).graph
    spec = load(tiny_int8)
    assert prepacked.cached_graph(spec) == graph
    monkeypatch.setattr(prepacked, "cpu_fingerprint", lambda: "another CPU")
    assert prepacked.cached_graph(spec) is None
    monkeypatch.undo()
    monkeypatch.setenv("DIALOGPT_EDGE_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(prepacked.ort, "__version__", "0.0.1")
    assert prepacked.cached_graph(spec) is None


def test_the_cpu_fingerprint_reads_the_first_cpus_identity_and_flags(tmp_path):
    """/proc/cpuinfo pads its keys with tabs ("model name\t: ..."): the fingerprint must still find
    them, or every CPU would share one key and a copy packed for one would be mapped on another."""
    cpuinfo = tmp_path / "cpuinfo"
    cpu = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\n"
    cpuinfo.write_text(cpu.format(n=0, flags="fpu avx2") + cpu.format(n=1, flags="fpu avx2"))
    zen2 = prepacked.cpu_fingerprint(cpuinfo)
    assert zen2 == "vendor_id=AuthenticAMD|cpu family=23|model=49|model name=AMD EPYC|flags=fpu avx2"
    cpuinfo.write_text(cpu.format(n=0, flags="fpu avx2 avx512f avx512_vnni"))
    assert prepacked.cpu_fingerprint(cpuinfo) != zen2


def test_a_reexported_folder_replaces_its_old_copy_and_leaves_other_versions(tiny_int8, tmp_path, cache_dir, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny_int8, folder)
    first = open_model(folder).graph.parent
    monkeypatch.setattr(prepacked.ort, "__version__", "0.0.1")  # another environment's copy of the same folder
    other = open_model(folder).graph.parent
    monkeypatch.undo()
    monkeypatch.setenv("DIALOGPT_EDGE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("DIALOGPT_EDGE_PREPACK", "1")
    # re-exported in place: same path, a data file with other bytes (trailing ones, so the graph still
    # loads) and a manifest that says so, hence a new key
    from dialogpt_edge.runtime.manifest import describe_files

    with open(folder / prepacked.DATA_FILE, "ab") as f:
        f.write(bytes(4096))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = describe_files(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    second = open_model(folder).graph.parent
    assert second != first and not first.exists()
    assert other.exists() and entries(cache_dir) == sorted([second.name, other.name])


def test_a_truncated_copy_is_rebuilt(tiny_int8, cache_dir):
    reference = run(Session(load(tiny_int8)))
    graph = open_model(tiny_int8).graph
    data = graph.parent / prepacked.DATA_FILE
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    session = open_model(tiny_int8)
    assert session.graph == graph and data.stat().st_size == json.loads(
        (graph.parent / prepacked.STAMP_FILE).read_text())["files"][prepacked.DATA_FILE]
    np.testing.assert_array_equal(run(session), reference)


def test_a_copy_onnxruntime_refuses_is_dropped_and_the_folder_runs(tiny_int8, cache_dir, caplog):
    reference = run(Session(load(tiny_int8)))
    graph = open_model(tiny_int8).graph
    graph.write_bytes(b"\0" * graph.stat().st_size)  # same size, not a graph
    with caplog.at_level(logging.WARNING, logger="dialogpt_edge"):
        session = open_model(tiny_int8)
    assert session.graph == load(tiny_int8).model_path
    assert any("without its cached copy" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(run(session), reference)
    assert entries(cache_dir) == []
    assert open_model(tiny_int8).graph.parent.parent == cache_dir / "prepacked"  # and rebuilt next time


def test_an_unwritable_cache_falls_back_with_one_warning(tiny_int8, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("DIALOGPT_EDGE_CACHE_DIR", str(blocker))
    monkeypatch.setenv("DIALOGPT_EDGE_PREPACK", "1")
    with caplog.at_level(logging.WARNING, logger="dialogpt_edge"):
        session = open_model(tiny_int8)
    assert session.graph == load(tiny_int8).model_path
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "without its cached copy" in warnings[0]
    np.testing.assert_array_equal(run(session), run(Session(load(tiny_int8))))


def test_an_altered_folder_is_refused_and_leaves_no_copy(tiny_int8, tmp_path, cache_dir):
    folder = tmp_path / "altered"
    shutil.copytree(tiny_int8, folder)
    data = folder / prepacked.DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ModelFolderError, match="sha256"):
        open_model(folder)
    assert entries(cache_dir) == []


def test_prepack_is_off_unless_asked_for(tiny_int8, cache_dir, monkeypatch):
    assert open_model(tiny_int8, prepack=False).graph == load(tiny_int8).model_path  # the argument wins over the env
    monkeypatch.delenv("DIALOGPT_EDGE_PREPACK")
    assert open_model(tiny_int8).graph == load(tiny_int8).model_path
    monkeypatch.setenv("DIALOGPT_EDGE_PREPACK", "0")
    assert open_model(tiny_int8).graph == load(tiny_int8).model_path
    assert not cache_dir.exists()
    assert open_model(tiny_int8, prepack=True).graph.parent.parent == cache_dir / "prepacked"


def test_no_copy_is_started_without_room_for_it(tiny_int8, cache_dir, monkeypatch, caplog):
    monkeypatch.setattr(prepacked.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with caplog.at_level(logging.WARNING, logger="dialogpt_edge"):
        session = open_model(tiny_int8)
    assert session.graph == load(tiny_int8).model_path
    assert any("MiB free" in r.getMessage() for r in caplog.records)
    assert entries(cache_dir) == []


def test_cli_announces_the_one_time_packing_and_decodes_the_same(tiny_int8, cache_dir):
    import subprocess
    import sys

    from conftest import run_env

    def generate(**env):
        cmd = [sys.executable, "-m", "dialogpt_edge.runtime", "generate", "--model", str(tiny_int8),
               "--prompt", "Hello there", "--max-new-tokens", "8", "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(run_env(), **env), timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["ids"], proc.stderr

    plain_ids, plain_err = generate(DIALOGPT_EDGE_PREPACK="0")
    first_ids, first_err = generate()
    again_ids, again_err = generate()
    assert "packing the weights" not in plain_err
    assert f"packing the weights of {tiny_int8.name} for this CPU, once" in first_err
    assert "packing" not in again_err
    assert plain_ids == first_ids == again_ids


def test_on_a_clamping_cpu_an_int8_folder_runs_a_cached_u8_copy(tiny_int8, tiny_int4, cache_dir, monkeypatch, caplog):
    """Where u8 x s8 kernels clamp, onnxruntime's exact kernel wants the int8 weights as u8: open_model()
    stores that rewrite once, unpacked, and maps it afterwards; other precisions and prepack=True are
    untouched by it."""
    from dialogpt_edge.runtime import session as session_module

    monkeypatch.setattr(session_module, "int8_products_saturate", lambda: True)
    monkeypatch.delenv("DIALOGPT_EDGE_PREPACK")
    reference = run(Session(load(tiny_int8)))  # the folder's own graph, converted at load
    with caplog.at_level(logging.INFO, logger="dialogpt_edge"):
        first = open_model(tiny_int8)
    assert any("for this CPU's exact kernels, once" in r.getMessage() for r in caplog.records)
    stamp = json.loads((first.graph.parent / prepacked.STAMP_FILE).read_text())
    assert stamp["packed"] is False
    # the weights once, not beside packed forms (the packed copy's data file is larger than the folder's)
    assert stamp["files"][prepacked.DATA_FILE] <= 1.1 * (tiny_int8 / prepacked.DATA_FILE).stat().st_size
    np.testing.assert_array_equal(run(first), reference)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dialogpt_edge"):
        again = open_model(tiny_int8)
    assert again.graph == first.graph and not caplog.records
    assert open_model(tiny_int4).graph == load(tiny_int4).model_path
    packed = open_model(tiny_int8, prepack=True).graph
    assert packed != first.graph and json.loads((packed.parent / prepacked.STAMP_FILE).read_text())["packed"] is True


def test_on_a_clamping_cpu_an_unwritable_cache_still_runs_exactly(tiny_int8, tmp_path, monkeypatch, caplog):
    from dialogpt_edge.runtime import session as session_module

    monkeypatch.setattr(session_module, "int8_products_saturate", lambda: True)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("DIALOGPT_EDGE_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="dialogpt_edge"):
        session = open_model(tiny_int8)
    assert session.graph == load(tiny_int8).model_path
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "converting its int8 weights for this CPU at every load" in warnings[0]
