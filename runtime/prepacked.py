"""Prepacked copies of model folders for this CPU: the weights in the GEMM kernels' own layout, mapped, not repacked.

Optional (DIALOGPT_EDGE_PREPACK=1, or open_model(prepack=True)). onnxruntime repacks every weight
matrix for its CPU GEMM kernels when a session is created, into anonymous heap memory. It can
instead write the packed weights to the external-data file once and map them on every later
load. What that buys, measured on the DialoGPT shapes (benchmarks/results/experiments.md):
faster session creation (fp32 most: 0.86 -> 0.47 s on the small shape), logits bit-identical,
packed weights in page cache (shared between processes, reclaimable) instead of the heap; decode
speed only where the kernel maps the file with huge pages, which depends on how the file entered
the page cache (no consistent gain in a same-run bench). What it costs: onnxruntime 1.32 still
reads the original weights while loading the packed ones, so the load's peak RSS is higher
(int8 237 -> 261 MiB), and the copy takes twice the folder's disk space. Hence not the default.

The packed layout depends on the CPU (which MLAS kernels it dispatches) and on the onnxruntime
version, so the copy is a cache keyed by both and by the folder's checksums, never part of a
model folder. It holds the graph and its data file (the original weights plus their packed
forms: two to two and a half times the folder's size); tokenizer and manifest stay in the folder.

The same cache holds a second kind of copy, not packed (packed=False): the graph as onnxruntime
rewrites it for this CPU, weights as plain initializers. open_model() uses it by default for int8
folders on CPUs whose u8 x s8 kernels clamp (cpus.int8_products_saturate): onnxruntime's exact
kernel there needs the int8 weights stored as u8, a conversion it otherwise redoes at every load
(small int8 shape: 0.68 s to open and 240 MiB peak, against 0.26 s and 195 MiB from the copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path

import onnxruntime as ort

from .cpus import CPUINFO, first_cpu_fields
from .manifest import DATA_FILE, MODEL_FILE, ModelSpec

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2  # bump when what is written here changes (2: int8 weights as u8 where the CPU clamps u8 x s8)
STAMP_FILE = "prepacked.json"
# the copy holds the original weights, their packed forms and any matrix onnxruntime folds (fp32's
# transposed lm_head): 2.0x the folder for int8 and int4, 2.3x for fp32 on the DialoGPT-small shape
SPACE_FACTOR = 3
PLAIN_SPACE_FACTOR = 1.5  # a copy that is not packed: the weights once, as rewritten


def cache_root() -> Path:
    """$DIALOGPT_EDGE_CACHE_DIR, else $XDG_CACHE_HOME/dialogpt-edge, else ~/.cache/dialogpt-edge."""
    explicit = os.environ.get("DIALOGPT_EDGE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dialogpt-edge"


def entries_dir() -> Path:
    """Where the copies live, one folder per cache_key()."""
    return cache_root() / "prepacked"


def enabled() -> bool:
    """DIALOGPT_EDGE_PREPACK=1 turns the cache on for open_model() callers that do not choose."""
    return os.environ.get("DIALOGPT_EDGE_PREPACK", "").strip().lower() in ("1", "true", "yes", "on")


def cpu_fingerprint(cpuinfo: Path = CPUINFO) -> str:
    """What decides the packed layout: the CPU's identity and instruction-set flags."""
    fields = first_cpu_fields(cpuinfo)
    if not fields:  # not Linux
        return f"{platform.machine()}|{platform.processor()}|{platform.system()}"
    keep = ("vendor_id", "cpu family", "model", "model name", "flags", "Features", "CPU implementer", "CPU part")
    return "|".join(f"{k}={fields[k]}" for k in keep if k in fields)


def cache_key(spec: ModelSpec, packed: bool = True) -> str:
    files = spec.manifest.get("files", {})
    identity = {
        "layout": LAYOUT_VERSION,
        "packed": packed,
        "onnxruntime": ort.__version__,
        "cpu": cpu_fingerprint(),
        "graph": {name: files.get(name, {}).get("sha256") for name in (MODEL_FILE, DATA_FILE)},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def cached_graph(spec: ModelSpec, packed: bool = True) -> Path | None:
    """This CPU's copy of the folder's graph (prepacked, or not), if a complete one is cached."""
    entry = entries_dir() / cache_key(spec, packed)
    try:
        stamp = json.loads((entry / STAMP_FILE).read_text())
        if all((entry / name).stat().st_size == size for name, size in stamp["files"].items()):
            return entry / MODEL_FILE
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def discard(graph: Path) -> None:
    """Drop a cached copy that onnxruntime refused (it is rebuilt on the next open)."""
    shutil.rmtree(graph.parent, ignore_errors=True)


def build(spec: ModelSpec, options: ort.SessionOptions, verified: Future | None = None, packed: bool = True) -> Path:
    """Write this CPU's copy (with the packed weights, or without) and return its graph path.

    `options` create the writing session (graph optimisation as the loading sessions have it; the
    thread count does not shape the copy). When `verified` is given (the
    folder's checksum pass), the copy is published only once it has succeeded, so a corrupted
    folder never leaves a cached copy keyed by the checksums it should have had.
    """
    root = entries_dir()
    root.mkdir(parents=True, exist_ok=True)
    need = (SPACE_FACTOR if packed else PLAIN_SPACE_FACTOR) * sum(p.stat().st_size for p in (spec.model_path, spec.path / DATA_FILE) if p.exists())
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(f"{root} has {free >> 20} MiB free, the copy needs about {int(need) >> 20} MiB")
    key = cache_key(spec, packed)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        options.optimized_model_filepath = str(staging / MODEL_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if packed:
            options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(spec.model_path), sess_options=options, providers=["CPUExecutionProvider"])
        if verified is not None:
            verified.result()
        files = {p.name: p.stat().st_size for p in staging.iterdir()}
        if set(files) != {MODEL_FILE, DATA_FILE}:
            raise OSError(f"onnxruntime wrote {sorted(files)}, expected {MODEL_FILE} and {DATA_FILE}")
        stamp = {"files": files, "source": str(spec.path), "onnxruntime": ort.__version__, "layout": LAYOUT_VERSION,
                 "cpu": cpu_fingerprint(), "packed": packed}
        (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=1))
        entry = root / key
        try:
            staging.rename(entry)
        except OSError:
            if cached_graph(spec, packed) is not None:  # another process published the same copy first: keep theirs
                shutil.rmtree(staging, ignore_errors=True)
            else:  # a damaged copy is in the way: set it aside (a process may still map it), then publish
                stale = Path(tempfile.mkdtemp(prefix=f".{key}-stale-", dir=root))
                entry.rename(stale / key)
                staging.rename(entry)
                shutil.rmtree(stale, ignore_errors=True)
        _drop_superseded(root, key, stamp)
        return entry / MODEL_FILE
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _drop_superseded(root: Path, key: str, stamp: dict) -> None:
    """Delete the copies of an earlier state of the same folder, for the same onnxruntime and CPU.

    A re-exported folder gets a new key (its checksums changed), and the old copy, twice the folder's
    size, could never be used again. Copies for other onnxruntime versions or CPUs stay: another
    environment, or another machine sharing this cache, may still run them. A process mapping a
    deleted copy keeps its pages (the files are only unlinked).
    """
    for other in root.iterdir():
        if other.name == key or other.name.startswith("."):
            continue
        try:
            theirs = json.loads((other / STAMP_FILE).read_text())
        except (OSError, ValueError):
            continue
        same = ("source", "onnxruntime", "layout", "cpu", "packed")
        if isinstance(theirs, dict) and all(theirs.get(k) == stamp[k] for k in same):
            log.info("removing %s, this CPU's copy of an earlier export of %s", other, stamp["source"])
            shutil.rmtree(other, ignore_errors=True)
