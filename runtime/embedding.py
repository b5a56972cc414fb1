"""TokenEmbedding: the graph's inputs_embeds, rows of the token table read from the data file with pread.

Why not a lookup inside the graph: onnxruntime memory-maps the table, and each row it reads maps
the whole page-cache folio around it (up to 2 MiB), so a conversation's diverse ids left most of
the table resident: DialoGPT-small int8, 32 random prompt ids and 256 random decode ids, peak RSS
236 MiB against 201 for one repeated id. A read copies only the row into the process; the page
cache still holds the file, shared and reclaimable, as it does for every weight.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ModelFolderError
from .manifest import TokenTable


class TokenEmbedding:
    """Dequantized rows of one model folder's token table (manifest.TokenTable). Not thread-safe.

    Between two graph runs every numpy call is slow (the run has just streamed the weights through
    the caches), so one token costs two reads and two or three numpy calls into buffers kept for it.
    """

    def __init__(self, folder: Path, table: TokenTable, n_embd: int):
        self.table, self.n_embd = table, n_embd
        self.path = Path(folder) / table.file
        self._file = open(self.path, "rb", buffering=0)  # closed with the object
        self._preadv = getattr(os, "preadv", None)
        self._row_bytes = table.row_bytes(n_embd)
        self._blocks = table.blocks(n_embd)
        if table.bits == 4:  # each byte's two values (low nibble first) less the zero point 8
            byte = np.arange(256)
            self._nibbles = (np.stack([byte & 0x0F, byte >> 4], -1) - 8.0).astype(np.float32)
        self._padded = self._blocks * (table.block_size or 0) != n_embd
        self._one = self._buffers(1)

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Buffers for n tokens' raw rows (float32 rows for an fp32 table) and their block scales."""
        if self.table.bits == 32:
            return np.empty((n, self.n_embd), np.float32), None
        return np.empty((n, self._blocks, self._row_bytes // self._blocks), np.uint8), np.empty((n, self._blocks, 1), np.float32)

    def rows(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The embedding of each id in `ids` (n,), float32 (n, n_embd), written into `out` if given.

        Ids must already be checked to be in the vocabulary.
        """
        n = len(ids)
        raw, scales = self._one if n == 1 else self._buffers(n)
        if out is None:
            out = np.empty((n, self.n_embd), np.float32)
        table, row_bytes = self.table, self._row_bytes
        for j, i in enumerate(ids.tolist()):
            self._read_into(raw[j], table.rows_offset + i * row_bytes)
            if scales is not None:
                self._read_into(scales[j], table.scales_offset + i * self._blocks * 4)
        if scales is None:
            out[:] = raw
            return out
        in_place = not self._padded and out.flags.c_contiguous
        blocks = out if in_place else np.empty((n, self._blocks * table.block_size), np.float32)
        blocks = blocks.reshape(n, self._blocks, table.block_size)
        if table.bits == 8:
            np.subtract(raw, 128, out=blocks, dtype=np.float32)
        else:  # 'clip' never triggers (a byte indexes 256 entries); numpy buffers `out` under the default 'raise'
            np.take(self._nibbles, raw, axis=0, out=blocks.reshape(*raw.shape, 2), mode="clip")
        np.multiply(blocks, scales, out=blocks)
        if not in_place:
            out[:] = blocks.reshape(n, -1)[:, : self.n_embd]  # the last block's padding dropped
        return out

    def _read_into(self, buffer: np.ndarray, offset: int) -> None:
        if self._preadv is not None:  # one system call, no file position
            done = self._preadv(self._file.fileno(), [buffer], offset)
        else:  # Windows, and macOS before 11: no preadv
            self._file.seek(offset)
            done = self._file.readinto(buffer)
        if done != buffer.nbytes:
            self._short_read()

    def _short_read(self):
        raise ModelFolderError(f"{self.path} ended before the token table did: the file was truncated while in use "
                               "(restore the folder and restart)")
