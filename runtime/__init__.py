"""dialogpt-edge runtime: DialoGPT decoding on onnxruntime + numpy + tokenizers, nothing heavier."""

from .errors import ContextLengthError, ModelFolderError, UserError
from .generate import generate, greedy_token
from .kv_cache import KVCache
from .manifest import ModelSpec, load
from .session import Session
from .tokenizer import TextStream, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "ContextLengthError",
    "KVCache",
    "ModelFolderError",
    "ModelSpec",
    "Session",
    "TextStream",
    "Tokenizer",
    "UserError",
    "generate",
    "greedy_token",
    "load",
]
