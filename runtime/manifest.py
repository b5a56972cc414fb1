"""manifest.json: the contract between export/ and runtime/ (read, validate, write, checksums)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFolderError, is_int_in

# 2: graph built by export/builder.py (GroupQueryAttention, in-place cache)
# 3: the token embedding is read by the runtime from the data file ("token_embedding"), not by the graph
FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"  # the weights, memory-mapped by onnxruntime
TOKENIZER_FILE = "tokenizer.json"

# a Hugging Face hub model id: owner/name (or a bare name, for the oldest repos such as gpt2)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "eos_token_id")


SHIPPED_MODEL = "chitchat-small"


def shipped_model_dir() -> str | None:
    """The model folder that ships with the package (models/chitchat-small), if this install has it."""
    from importlib import resources

    try:
        folder = resources.files("dialogpt_edge.models") / SHIPPED_MODEL
    except ModuleNotFoundError:
        return None
    return str(folder) if folder.joinpath(MANIFEST_NAME).is_file() else None


@dataclass(frozen=True)
class TokenTable:
    """Where the token embedding's rows are in the folder's data file (the manifest's "token_embedding").

    bits 32: float32 rows of n_embd values. bits 8 / 4: MatMulNBits' layout, the same bytes the
    lm_head reads: per row, ceil(n_embd / block_size) blocks of block_size unsigned values (4-bit ones
    two to a byte, low nibble first) with zero point 2**(bits - 1), and one float32 scale per block;
    the last block's padding is dropped.
    """

    file: str
    bits: int
    rows_offset: int
    block_size: int | None = None
    scales_offset: int | None = None

    def blocks(self, n_embd: int) -> int:
        return -(-n_embd // self.block_size) if self.block_size else 0

    def row_bytes(self, n_embd: int) -> int:
        return n_embd * 4 if self.bits == 32 else self.blocks(n_embd) * self.block_size * self.bits // 8


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know about a validated model folder."""

    path: Path
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    eos_token_id: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    precision: str
    token_table: TokenTable
    manifest: dict[str, Any] = field(repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in `folder` except the manifest itself."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST_NAME:
            files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return files


def installed_versions(*dists: str) -> dict[str, str]:
    """Python's and each installed distribution's version (missing ones left out)."""
    from importlib import metadata  # 19 ms of imports that only this needs, off every start-up

    out = {"python": sys.version.split()[0]}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json last, with the checksums of everything already in `folder`."""
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=describe_files(folder))
    path = folder / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load(folder: str | os.PathLike, *, verify_checksums: bool = True) -> ModelSpec:
    """Read and validate a model folder; any problem is one ModelFolderError naming it."""
    given = str(folder)
    folder = Path(folder).expanduser()
    hint = "export one with `dialogpt-edge export SRC --output DIR`"
    if folder.exists() and not folder.is_dir():
        raise ModelFolderError(f"{folder} is a file; a model is a folder ({hint})")
    if not folder.is_dir():
        if "/" in given and HUB_ID.fullmatch(given):  # the runtime never downloads: a hub checkpoint is exported first
            hint = f"if it is a Hugging Face model id, export it first: `dialogpt-edge export {given} --output DIR`"
        raise ModelFolderError(f"model folder {folder} does not exist ({hint})")
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        if (folder / "config.json").is_file():
            hint = f"it looks like a checkpoint: export it with `dialogpt-edge export {folder} --output DIR`"
        raise ModelFolderError(
            f"{folder} is not a dialogpt-edge model folder: {MANIFEST_NAME} is missing ({hint})"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{manifest_path} is not valid JSON ({e}; re-export the model)") from None
    if not isinstance(manifest, dict):
        raise ModelFolderError(f"{manifest_path} is not a JSON object (re-export the model)")

    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFolderError(
            f"{manifest_path} has format_version {version!r}, this runtime reads {FORMAT_VERSION} "
            "(re-export the model with this version of dialogpt-edge)"
        )
    arch = manifest.get("architecture")
    if not isinstance(arch, dict) or any(not isinstance(arch.get(k), int) for k in _ARCH_FIELDS):
        raise ModelFolderError(
            f"{manifest_path}: 'architecture' must give integer {', '.join(_ARCH_FIELDS)} (re-export the model)"
        )
    if arch["n_embd"] % arch["n_head"]:
        raise ModelFolderError(f"{manifest_path}: n_embd is not a multiple of n_head (re-export the model)")
    io = manifest.get("io") or {}
    if not io.get("inputs") or not io.get("outputs"):
        raise ModelFolderError(f"{manifest_path}: 'io' must list the graph's inputs and outputs (re-export the model)")

    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files or TOKENIZER_FILE not in files:
        raise ModelFolderError(
            f"{manifest_path}: 'files' must list {MODEL_FILE} and {TOKENIZER_FILE} (re-export the model)"
        )
    _check_files(folder, files, verify_checksums)
    try:
        table = token_table(manifest.get("token_embedding"), arch["vocab_size"], arch["n_embd"], files)
    except ValueError as e:
        raise ModelFolderError(f"{manifest_path}: 'token_embedding' {e} (re-export the model)") from None

    return ModelSpec(
        path=folder,
        n_layer=arch["n_layer"],
        n_head=arch["n_head"],
        n_embd=arch["n_embd"],
        n_positions=arch["n_positions"],
        vocab_size=arch["vocab_size"],
        eos_token_id=arch["eos_token_id"],
        input_names=tuple(io["inputs"]),
        output_names=tuple(io["outputs"]),
        precision=str((manifest.get("precision") or {}).get("weights", "unknown")),
        token_table=table,
        manifest=manifest,
    )


def token_table(section: Any, vocab_size: int, n_embd: int, files: dict[str, Any]) -> TokenTable:
    """The manifest's "token_embedding" checked against the model's shape and its files' sizes (ValueError if not)."""
    if not isinstance(section, dict):
        raise ValueError("is missing")
    bits, rows, scales = section.get("bits"), section.get("rows"), section.get("scales")
    if not is_int_in(bits, 4) or bits not in (32, 8, 4):  # not 8.0: it sizes arrays
        raise ValueError(f"has bits {bits!r}; this runtime reads 32, 8 or 4")

    def span(part: Any, what: str) -> int:
        if not isinstance(part, dict) or not all(is_int_in(part.get(k), 0) for k in ("offset", "bytes")):
            raise ValueError(f"needs an integer offset and bytes for its {what}")
        return part["offset"]

    rows_offset = span(rows, "rows")
    block_size = scales_offset = None
    if bits != 32:
        block_size = section.get("block_size")
        if not is_int_in(block_size, 1) or block_size * bits % 8:
            raise ValueError(f"has block_size {block_size!r}; a {bits}-bit table needs whole bytes per block")
        scales_offset = span(scales, "scales")
    table = TokenTable(str(section.get("file")), bits, rows_offset, block_size, scales_offset)
    expected = {"rows": vocab_size * table.row_bytes(n_embd)}
    if bits != 32:
        expected["scales"] = vocab_size * table.blocks(n_embd) * 4
    size = (files.get(table.file) or {}).get("bytes")
    if not isinstance(size, int):
        raise ValueError(f"names {table.file!r}, which is not one of the folder's files")
    for what, nbytes in expected.items():
        part = section[what]
        if part["bytes"] != nbytes or part["offset"] + nbytes > size:
            raise ValueError(f"{what} do not fit the model ({nbytes} bytes expected at offset {part['offset']} of {table.file}, "
                             f"which has {size}; the manifest says {part['bytes']})")
    return table


_FIX = "re-export the model, or restore the folder from where you got it"


def _check_files(folder: Path, files: dict[str, Any], verify_checksums: bool) -> None:
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise ModelFolderError(f"{path} is missing ({_FIX})")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise ModelFolderError(
                f"{path} has {size} bytes, the manifest says {entry.get('bytes')}: the file was altered ({_FIX})"
            )
    if verify_checksums:
        _check_checksums(folder, files)


def verify_checksums(spec: ModelSpec) -> None:
    """The sha256 pass of load(), for callers that run it alongside other work (see session.open_model)."""
    _check_checksums(spec.path, spec.manifest["files"])


def _check_checksums(folder: Path, files: dict[str, Any]) -> None:
    for name, entry in files.items():
        path = folder / name
        if sha256_file(path) != entry.get("sha256"):
            raise ModelFolderError(f"{path} does not match its sha256 in the manifest: the file was altered ({_FIX})")
