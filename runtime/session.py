"""Session: owns the onnxruntime InferenceSession; prefill() and decode_step() on a KVCache."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from .errors import ContextLengthError, ModelFolderError
from .kv_cache import KVCache
from .manifest import ModelSpec

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def default_threads() -> int:
    """Physical-ish core count: decode is memory-bound and hyper-threads only contend."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Session:
    """One loaded model. Not thread-safe: one decode at a time per Session."""

    def __init__(self, spec: ModelSpec, threads: int | None = None):
        self.spec = spec
        self.threads = threads or default_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(spec.model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own untyped errors
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelFolderError(f"onnxruntime cannot load {spec.model_path}: {first_line} (re-export the model)") from e

        inputs = {i.name: i for i in self._session.get_inputs()}
        missing = [n for n in spec.input_names if n not in inputs]
        if missing:
            raise ModelFolderError(
                f"{spec.model_path} lacks inputs {missing} that its manifest lists (re-export the model)"
            )
        self._past_names = [
            (f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(spec.n_layer)
        ]
        self._present_names = [(f"present.{i}.key", f"present.{i}.value") for i in range(spec.n_layer)]
        self._output_names = ["logits"] + [n for pair in self._present_names for n in pair]
        self.cache_dtype = _ORT_TO_NUMPY.get(inputs[self._past_names[0][0]].type, np.float32)
        self._has_position_ids = "position_ids" in inputs

    def new_cache(self) -> KVCache:
        return KVCache(self.spec.n_layer, self.spec.n_head, self.spec.head_dim, self.cache_dtype)

    def forward(self, ids: list[int] | np.ndarray, cache: KVCache) -> np.ndarray:
        """Run `ids` after the cached positions; returns logits (len(ids), vocab) and grows the cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n_new = ids.shape[1]
        if n_new == 0:
            raise ValueError("forward() needs at least one token")
        past = cache.length
        total = past + n_new
        if total > self.spec.n_positions:
            raise ContextLengthError(
                f"{total} tokens exceed the model's {self.spec.n_positions} positions "
                "(shorten the prompt or lower --max-new-tokens)"
            )
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total), dtype=np.int64),
        }
        if self._has_position_ids:
            feeds["position_ids"] = np.arange(past, total, dtype=np.int64).reshape(1, -1)
        for (k_name, v_name), k, v in zip(self._past_names, cache.keys, cache.values):
            feeds[k_name] = k
            feeds[v_name] = v
        outputs = self._session.run(self._output_names, feeds)
        cache.update(outputs[1::2], outputs[2::2])
        return outputs[0][0]

    def prefill(self, ids: list[int] | np.ndarray, cache: KVCache) -> np.ndarray:
        """Run a prompt (or a new chat turn) in one pass; returns the last position's logits (vocab,)."""
        return self.forward(ids, cache)[-1]

    def decode_step(self, token: int, cache: KVCache) -> np.ndarray:
        """One new token against the cache; returns its logits (vocab,)."""
        return self.forward([token], cache)[-1]
