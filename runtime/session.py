"""Session: owns the onnxruntime InferenceSession; prefill() and decode_step() on a KVCache, through IO binding."""

from __future__ import annotations

import logging
import operator
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .cpus import default_threads, int8_products_saturate
from .embedding import TokenEmbedding
from .errors import ContextLengthError, ModelFolderError, UserError, first_line, is_int_in
from .kv_cache import KVCache
from . import hugepages, prepacked
from .manifest import ModelSpec, load, verify_checksums
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
_SCALARS = ("seqlens_k", "total_sequence_length", "logits_to_keep")


class _Binding:
    """One IOBinding per cache: its buffers are bound once; a decode step only rewrites small arrays."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, vocab: int, n_embd: int):
        self.io = session.io_binding()
        self.embeds = np.zeros((1, 1, n_embd), np.float32)
        self.positions = np.zeros((1, 1), np.int64)
        self.seqlens_k = np.zeros((1,), np.int32)
        self.total = np.zeros((), np.int32)
        self.keep = np.ones((), np.int64)
        self.logits = np.zeros((1, 1, vocab), np.float32)
        for name, array in (("seqlens_k", self.seqlens_k), ("total_sequence_length", self.total), ("logits_to_keep", self.keep)):
            _bind(self.io.bind_input, name, array)
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            for kind, array in (("key", k), ("value", v)):
                _bind(self.io.bind_input, f"past_key_values.{i}.{kind}", array)
                _bind(self.io.bind_output, f"present.{i}.{kind}", array)
        self.step_shape = False  # are inputs_embeds / position_ids / logits bound to the one-token arrays above?

    def bind_tokens(self, embeds: np.ndarray, positions: np.ndarray, logits: np.ndarray) -> None:
        """Bind this run's token rows, their positions and the logits buffer (by pointer: keep them alive until it runs)."""
        _bind(self.io.bind_input, "inputs_embeds", embeds)
        _bind(self.io.bind_input, "position_ids", positions)
        _bind(self.io.bind_output, "logits", logits)
        self.step_shape = embeds is self.embeds


def _bind(bind, name: str, array: np.ndarray) -> None:
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


def _thread_count(threads: int | None) -> int:
    """`threads` checked, or the default (one per physical core) for None."""
    if threads is None:
        return default_threads()
    if not is_int_in(threads, 1):
        raise ValueError(f"threads must be an integer >= 1, or None for one per physical core; got {threads!r}")
    return threads


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # No memory arena: GroupQueryAttention over an fp16 cache allocates per head from both threads,
    # and the arena's lock turned a 17 us attention step into 85-100 us; plain malloc keeps it at 17.
    # Decode with an fp32 cache and the int4 path are no slower without it
    # (benchmarks/results/experiments.md).
    opts.enable_cpu_mem_arena = False
    if int8_products_saturate():
        # onnxruntime then stores the int8 matmuls' weights as u8 and runs its u8 x u8 kernel, which
        # widens to 16 bits before multiplying: exact, about 7 % slower to decode on an AVX2 EPYC
        # (benchmarks/results/experiments.md). Not on VNNI CPUs, where onnxruntime would switch too
        # and lose its faster exact kernel.
        opts.add_session_config_entry("session.x64quantprecision", "1")
    return opts


def prefill_chunk_for(cache_dtype) -> int:
    """Tokens per graph run when a prompt is longer. onnxruntime's attention gets slower per token as one
    run covers more of them, more than reading the weights once per chunk costs; an int8 cache's
    dequantizing kernels the most. Measured on the DialoGPT-small shape, 900-token prompt, ms, in one run
    / in chunks of 256 / of 128: int8 weights and cache 1169 / 767 / 747, int4 1492 / 1129 / 1090,
    fp32 1140 / 910 / 1083, int8 with an fp16 cache 621 / 383 / 435 (benchmarks/results/experiments.md).
    """
    return 128 if np.dtype(cache_dtype) == np.int8 else 256


class Session:
    """One loaded model. Not thread-safe: one decode at a time per Session.

    `graph` runs another ONNX file than the folder's own with the folder's spec: open_model()
    passes the prepacked copy of the same graph (see prepacked.py).
    """

    def __init__(self, spec: ModelSpec, threads: int | None = None, *, graph: Path | None = None):
        self.spec = spec
        self.threads = _thread_count(threads)
        self.graph = graph or spec.model_path
        # quantized weights only: fp32's 4x larger copy took 0.6 s to move for a few % (hugepages.py)
        huge = spec.precision != "fp32" and hugepages.wanted()
        before = hugepages.anonymous_regions() if huge else []
        try:
            self._session = ort.InferenceSession(
                str(self.graph), sess_options=session_options(self.threads), providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelFolderError(f"onnxruntime cannot load {self.graph}: {first_line(e)} (re-export the model)") from e
        self._huge_pages = hugepages.Collapse(before) if huge else None

        inputs = {i.name: i for i in self._session.get_inputs()}
        expected = ["inputs_embeds", "position_ids", *_SCALARS, "past_key_values.0.key"]
        missing = [n for n in [*spec.input_names, *expected] if n not in inputs]
        if missing:
            raise ModelFolderError(
                f"{spec.model_path} lacks inputs {missing} this runtime needs (re-export the model with this version)"
            )
        cache_type = inputs["past_key_values.0.key"].type
        if cache_type not in _ORT_TO_NUMPY:  # a folder from a newer exporter
            raise ModelFolderError(
                f"{spec.model_path} keeps its KV cache as {cache_type}, which this runtime cannot hold "
                "(upgrade dialogpt-edge, or re-export the model with this version)"
            )
        self.cache_dtype = _ORT_TO_NUMPY[cache_type]
        self.prefill_chunk = prefill_chunk_for(self.cache_dtype)
        self._embedding = TokenEmbedding(spec.path, spec.token_table, spec.n_embd)
        self._bindings: weakref.WeakKeyDictionary[KVCache, _Binding] = weakref.WeakKeyDictionary()

    @property
    def huge_page_bytes(self) -> int:
        """How much of onnxruntime's weight memory went onto 2 MiB pages (waits for that to finish)."""
        return self._huge_pages.bytes() if self._huge_pages is not None else 0

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A cache for up to `capacity` positions (default: all the model has); memory is committed as it fills."""
        capacity = self.spec.n_positions if capacity is None else capacity
        if not is_int_in(capacity, 1, self.spec.n_positions):
            # more would reserve memory no position can use
            raise ValueError(f"capacity must be an integer from 1 to the model's {self.spec.n_positions} positions, got {capacity!r}")
        return KVCache(self.spec.n_layer, self.spec.n_head, self.spec.head_dim, capacity, self.cache_dtype)

    def positions_left(self, cache: KVCache) -> int:
        """How many more tokens `cache` can take: the model's positions and the cache's capacity both bound it."""
        return min(self.spec.n_positions, cache.capacity) - cache.length

    def forward(self, ids: list[int] | np.ndarray, cache: KVCache, *, all_logits: bool = True) -> np.ndarray:
        """Run `ids` after the cached positions and write them into the cache.

        Returns logits (len(ids), vocab), or with all_logits=False only the last position's (1, vocab).
        Runs of more than `prefill_chunk` tokens go through the graph a chunk at a time (see
        prefill_chunk_for); if one fails, the cache holds the chunks that ran before it.
        Ids outside the vocabulary are a ValueError.
        """
        ids = np.asarray(ids)
        if ids.size == 0:
            raise ValueError("forward() needs at least one token")
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            raise self._bad_ids()
        return self._forward(np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1), cache, all_logits)

    def _bad_ids(self) -> ValueError:
        # an id out of range would read another row of the data file
        return ValueError(f"token ids must be integers in [0, {self.spec.vocab_size}) for this model")

    def _forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool, copy: bool = True) -> np.ndarray:
        """forward() for ids (1, n) already checked; copy=False: see decode_step()."""
        n_new = ids.shape[1]
        left = self.positions_left(cache)
        if n_new > left:
            raise ContextLengthError(
                f"{cache.length + n_new} tokens exceed the model's {cache.length + left} positions (shorten the prompt)"
            )
        binding = self._binding(cache)
        if n_new <= self.prefill_chunk:
            return self._run(binding, ids, cache, all_logits, copy)
        rows = np.empty((n_new, self.spec.vocab_size), np.float32) if all_logits else None
        for start in range(0, n_new, self.prefill_chunk):
            part = ids[:, start : start + self.prefill_chunk]
            logits = self._run(binding, part, cache, all_logits)
            if all_logits:
                rows[start : start + part.shape[1]] = logits
        return rows if all_logits else logits

    def _run(self, binding: _Binding, ids: np.ndarray, cache: KVCache, all_logits: bool, copy: bool = True) -> np.ndarray:
        """One pass of the graph over `ids` (1, n) after the cached positions."""
        n_new = ids.shape[1]
        past = cache.length
        total = past + n_new
        binding.seqlens_k[0] = total - 1
        binding.total[()] = total
        binding.keep[()] = n_new if all_logits else 1
        if n_new == 1 and not all_logits:
            if not binding.step_shape:
                binding.bind_tokens(binding.embeds, binding.positions, binding.logits)
            self._embedding.rows(ids[0], binding.embeds[0])
            binding.positions[0, 0] = past
            logits = binding.logits
        else:
            embeds = self._embedding.rows(ids[0])[None]
            positions = np.arange(past, total, dtype=np.int64).reshape(1, -1)
            logits = np.empty((1, n_new, self.spec.vocab_size), np.float32) if all_logits else binding.logits
            binding.bind_tokens(embeds, positions, logits)
        if n_new > 1 and self._huge_pages is not None:  # a prompt: the first token waits on it
            with self._huge_pages.paused():
                self._session.run_with_iobinding(binding.io)
        else:
            self._session.run_with_iobinding(binding.io)
        cache.advance(n_new)
        # the step buffer is rewritten by the next run, so callers get their own copy unless they say
        return logits[0] if all_logits or not copy else logits[0].copy()

    def prefill(self, ids: list[int] | np.ndarray, cache: KVCache) -> np.ndarray:
        """Run a prompt (or a new chat turn) in one pass; returns the last position's logits (vocab,)."""
        return self.forward(ids, cache, all_logits=False)[-1]

    def decode_step(self, token: int, cache: KVCache, *, copy: bool = True) -> np.ndarray:
        """One new token against the cache; returns its logits (vocab,).

        copy=False returns the cache's step buffer itself, which the next run on `cache` overwrites:
        for loops done with the logits before their next step (generate()), it saves copying 200 KB
        a token.
        """
        token = operator.index(token)  # the per-token path checks without numpy's per-call overhead
        if not 0 <= token < self.spec.vocab_size:
            raise self._bad_ids()
        return self._forward(np.full((1, 1), token, np.int64), cache, all_logits=False, copy=copy)[-1]

    def _binding(self, cache: KVCache) -> _Binding:
        binding = self._bindings.get(cache)
        if binding is None:
            if (cache.n_layer, cache.n_head, cache.head_dim, cache.dtype) != (
                self.spec.n_layer, self.spec.n_head, self.spec.head_dim, np.dtype(self.cache_dtype)
            ):
                raise ValueError("this cache was made for another model (use session.new_cache())")
            binding = self._bindings[cache] = _Binding(self._session, cache, self.spec.vocab_size, self.spec.n_embd)
        return binding


def open_model(folder: str | os.PathLike | Path, threads: int | None = None, *, prepack: bool | None = None) -> Session:
    """load() + Session(), checking every file's sha256 while onnxruntime loads the same bytes.

    The checksum pass runs beside session creation on the second core, so integrity costs next
    to nothing at start-up; a mismatch is reported in preference to whatever onnxruntime made of
    the altered file. prepack=True (default: $DIALOGPT_EDGE_PREPACK) runs this CPU's prepacked
    copy of the graph (prepacked.py), writing it on first use; an int8 folder on a CPU whose u8 x s8
    kernels clamp runs an unpacked copy with its weights stored as u8 (likewise written once).
    Where a copy cannot be written or read, the folder's own graph runs, with a warning.
    """
    return _open_checked(load(folder, verify_checksums=False), threads, prepack)


def _open_checked(spec: ModelSpec, threads: int | None, prepack: bool | None) -> Session:
    """open_model() for a folder whose manifest is already read."""
    threads = _thread_count(threads)
    with ThreadPoolExecutor(max_workers=1) as pool:
        check = pool.submit(verify_checksums, spec)
        try:
            session, problem = _open(spec, threads, check, prepacked.enabled() if prepack is None else prepack)
        finally:
            check.result()
    if problem:  # worth saying only once the folder itself is known to be good
        log.warning("running %s without its cached copy for this CPU (%s)", spec.path, problem)
    return session


def open_with_tokenizer(folder: str | os.PathLike | Path, threads: int | None = None, *,
                        prepack: bool | None = None) -> tuple[Session, Tokenizer]:
    """open_model() and the folder's Tokenizer, the tokenizer read first.

    Parsing tokenizer.json leaves about 12 MiB of freed heap behind; read before the session, that
    memory is reused by onnxruntime's weight packing instead of staying with the process (chat on the
    DialoGPT-small shape, int8: peak RSS 271 -> 258 MiB). A tokenizer.json that does not parse is
    reported by open_model()'s checksum pass if the file was altered.
    """
    spec = load(folder, verify_checksums=False)
    try:
        tokenizer = Tokenizer(spec.tokenizer_path, spec.eos_token_id)
    except ModelFolderError:
        _open_checked(spec, threads, prepack)
        raise
    return _open_checked(spec, threads, prepack), tokenizer


def _open(spec: ModelSpec, threads: int, check, prepack: bool) -> tuple[Session, str | None]:
    """The session, and why it runs the folder's own graph where a cached copy was meant to run (or None)."""
    graph, problem = _cached_graph(spec, check, packed=prepack) if runs_cached_copy(spec, prepack) else (None, None)
    if graph is not None:
        try:
            return Session(spec, threads, graph=graph), None
        except ModelFolderError as e:
            problem = f"its cached copy did not load: {e}"
            prepacked.discard(graph)
    if problem and not prepack:
        problem = f"converting its int8 weights for this CPU at every load instead: {problem}"
    return Session(spec, threads), problem


def runs_cached_copy(spec: ModelSpec, prepack: bool) -> bool:
    """Whether open_model runs this CPU's cached copy of the folder's graph (prepacked.py), written at
    its first open: the prepacked one, or, for an int8 folder on a CPU that onnxruntime runs exactly
    only with the weights as u8, the u8 one."""
    return prepack or (spec.precision == "int8" and int8_products_saturate())


def _cached_graph(spec: ModelSpec, check, *, packed: bool) -> tuple[Path | None, str | None]:
    """(this CPU's copy of the graph, None), or (None, why there is none)."""
    graph = prepacked.cached_graph(spec, packed)
    if graph is not None:
        return graph, None
    if packed:
        log.info("packing the weights of %s for this CPU, once (cached in %s)", spec.path.name, prepacked.entries_dir())
    else:
        log.info("storing the int8 weights of %s for this CPU's exact kernels, once (cached in %s)",
                 spec.path.name, prepacked.entries_dir())
    try:
        return prepacked.build(spec, session_options(1), verified=check, packed=packed), None
    except UserError:
        raise  # the folder's checksum mismatch, which the caller reports
    except Exception as e:  # an unwritable cache, a full disk, onnxruntime refusing the graph
        return None, first_line(e)
