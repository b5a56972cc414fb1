"""KVCache: the past keys and values of every layer, and how many positions they hold."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Per-layer past arrays, each (batch=1, n_head, length, head_dim).

    The cache owns `length`; positions of new tokens come from it. It makes no
    onnxruntime calls: Session reads it as inputs and replaces it with the outputs.
    """

    def __init__(self, n_layer: int, n_head: int, head_dim: int, dtype=np.float32):
        self.n_layer = n_layer
        self.n_head = n_head
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.n_head, 0, self.head_dim), dtype=self.dtype)
        self.keys = [empty] * self.n_layer
        self.values = [empty] * self.n_layer

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def update(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Take the graph's present key/values, which hold past + new positions."""
        if len(keys) != self.n_layer or len(values) != self.n_layer:
            raise ValueError(f"expected {self.n_layer} layers, got {len(keys)} keys and {len(values)} values")
        self.keys = list(keys)
        self.values = list(values)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the prefix stays valid: positions are absolute)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
