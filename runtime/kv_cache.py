"""KVCache: preallocated past keys and values of every layer, and how many positions they hold."""

from __future__ import annotations

import mmap

import numpy as np


class KVCache:
    """Per-layer buffers, each (batch=1, n_head, capacity, head_dim); positions [0, length) are valid.

    The graph writes each run's keys and values into these buffers in place (its present
    outputs are bound to them), so nothing is copied or reallocated per token. The buffers
    are committed page by page as positions are written, not for the whole capacity (see
    _lazy_zeros). Truncation just moves `length`; later runs overwrite what lies beyond it.
    No onnxruntime calls here: Session does the binding.
    """

    def __init__(self, n_layer: int, n_head: int, head_dim: int, capacity: int, dtype=np.float32):
        if capacity < 1:
            raise ValueError("a KV cache needs a capacity of at least one position")
        self.n_layer = n_layer
        self.n_head = n_head
        self.head_dim = head_dim
        self.capacity = capacity
        self.dtype = np.dtype(dtype)
        shape = (1, n_head, capacity, head_dim)
        self.keys = [_lazy_zeros(shape, self.dtype) for _ in range(n_layer)]
        self.values = [_lazy_zeros(shape, self.dtype) for _ in range(n_layer)]
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def advance(self, n: int) -> None:
        """Count `n` positions the graph has just written after the current ones."""
        if n < 0 or self.length + n > self.capacity:
            raise ValueError(f"cannot advance a cache of length {self.length} by {n} (capacity {self.capacity})")
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the prefix stays valid: positions are absolute)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes the valid positions take (what a decode step reads)."""
        per_position = 2 * self.n_layer * self.n_head * self.head_dim * self.dtype.itemsize
        return self.length * per_position


def _lazy_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros in an anonymous mapping of 4 KiB pages, each committed when first written.

    Not np.zeros: numpy asks the kernel for transparent huge pages on big arrays, and each
    head's slice of a (1, heads, capacity, head_dim) buffer starts in its own 2 MiB page, so
    the first prompt would commit and zero the whole cache. Measured on the DialoGPT-medium
    shape: 190 ms and 127 MiB to write 32 positions, against 4 ms and 8 MiB here.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype, count=int(np.prod(shape))).reshape(shape)
