"""Reading a checkpoint: resolve SRC (local folder or hub id), its config, tokenizer and PyTorch weights."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dialogpt_edge.runtime.errors import UserError, first_line
from dialogpt_edge.runtime.manifest import HUB_ID, MANIFEST_NAME, load


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: where it is, what it is."""

    ref: str  # the local folder path or the hub id, as given to from_pretrained
    is_local: bool
    config: object  # transformers.GPT2Config
    revision: str | None  # the hub commit, when known


@contextmanager
def quiet_libraries():
    """Silence transformers', the hub's and optimum's chatter while loading; our progress lines stay."""
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "optimum")]  # optimum: the bench's export peer
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(previous)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def locate(src: str) -> tuple[str, bool]:
    """(the folder path or the hub id, whether it is local) for SRC, or a one-line error saying what it is not."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{src} is a file; SRC must be a checkpoint folder or a hub id such as microsoft/DialoGPT-small")
        if not (path / "config.json").is_file():
            if (path / MANIFEST_NAME).is_file():
                raise UserError(f"{src} is a dialogpt-edge model folder, already exported; "
                                f"give the checkpoint it came from instead{_exported_from(path)}")
            raise UserError(f"{src} has no config.json, so it is not a Hugging Face checkpoint folder (point SRC at the folder save_pretrained wrote)")
        return str(path), True
    if HUB_ID.fullmatch(src):  # anything else that is not a local folder is a typo
        return src, False
    raise UserError(f"no such folder: {src} (give a local checkpoint folder or a hub id such as microsoft/DialoGPT-small)")


def _exported_from(folder: Path) -> str:
    """' (its manifest names <source>)', or '' when the manifest does not say."""
    try:
        source = load(folder, verify_checksums=False).manifest["source"]["ref"]
    except (UserError, KeyError, TypeError):
        return ""
    return f" (its manifest names {source})" if isinstance(source, str) and source else ""


def resolve_source(src: str) -> Source:
    """Find SRC (a local folder first, else a hub id) and check it is a GPT-2 causal LM."""
    from transformers import AutoConfig

    ref, is_local = locate(src)

    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as e:
        if is_local:
            raise UserError(f"cannot read the config of {src}: {first_line(e)} (check config.json)") from None
        raise UserError(
            f"cannot load {src} from the Hugging Face hub: {first_line(e)} "
            "(check the id and your connection, or pass a local checkpoint folder)"
        ) from None

    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or []
    if model_type != "gpt2" or (architectures and not any(a in ("GPT2LMHeadModel",) for a in architectures)):
        found = f"model_type {model_type!r}" + (f", architectures {architectures}" if architectures else "")
        raise UserError(
            f"{src} is not a GPT-2-architecture causal LM (DialoGPT): found {found} "
            "(expected model_type 'gpt2' with GPT2LMHeadModel)"
        )
    return Source(ref=ref, is_local=is_local, config=config, revision=getattr(config, "_commit_hash", None))


def load_torch_model(source: Source):
    """The PyTorch reference, fp32, eval mode; eager attention so the reference is the plain math."""
    from transformers import AutoModelForCausalLM

    try:
        # .float() rather than a dtype argument: transformers < 4.56 calls it torch_dtype and
        # stores an unknown `dtype` in the config (whose repr then fails); newer ones warn on torch_dtype
        model = AutoModelForCausalLM.from_pretrained(source.ref, attn_implementation="eager").float()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the weights of {source.ref}: {first_line(e)} (check the checkpoint folder)") from None
    return model.eval()


def load_hf_tokenizer(source: Source):
    from transformers import AutoTokenizer

    folder = Path(source.ref)
    if source.is_local and not (folder / "tokenizer.json").is_file() and not (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
        raise UserError(
            f"{source.ref} has no tokenizer files (DialoGPT uses GPT-2's tokenizer: copy tokenizer.json, "
            "or vocab.json and merges.txt, from the checkpoint it was trained from into the folder)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(source.ref, use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"{source.ref} has no usable tokenizer: {first_line(e)} "
            "(DialoGPT uses GPT-2's tokenizer: add vocab.json + merges.txt or tokenizer.json to the folder)"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{source.ref}: could not build a fast tokenizer (add tokenizer.json to the folder)")
    return tok
