"""dialogpt-edge runtime: DialoGPT decoding on onnxruntime + numpy + tokenizers, nothing heavier."""

from .chat import Chat
from .errors import ContextLengthError, ModelFolderError, UserError
from .generate import generate
from .kv_cache import KVCache
from .manifest import ModelSpec, load, shipped_model_dir
from .sampling import SamplingConfig, SamplingConfigError, sample
from .session import Session, open_model, open_with_tokenizer
from .tokenizer import TextStream, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "Chat",
    "ContextLengthError",
    "KVCache",
    "ModelFolderError",
    "ModelSpec",
    "SamplingConfig",
    "SamplingConfigError",
    "Session",
    "TextStream",
    "Tokenizer",
    "UserError",
    "generate",
    "load",
    "open_model",
    "open_with_tokenizer",
    "sample",
    "shipped_model_dir",
]
