"""onnxruntime's transformer fusions for GPT-2 (LayerNorm, SkipLayerNorm, FastGelu, ...), applied offline."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

# A graph over protobuf's 2 GB limit (DialoGPT-large in fp32) must keep its weights in a side file.
PROTOBUF_LIMIT = 2**31 - 2**26


def optimize_gpt2(model_path: Path, n_head: int, n_embd: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Fuse the exported graph; returns it (in memory) and the count of each fused op that applied.

    opt_level 0: only the python fusions, so the saved graph stays portable; onnxruntime
    applies its own level-ALL rewrites again when the runtime loads it.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimize_model(
        str(model_path), model_type="gpt2", num_heads=n_head, hidden_size=n_embd, opt_level=0, use_gpu=False
    )
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    return optimized.model, fused


def save_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write model.onnx, with its weights in model.onnx.data when it is too big for one protobuf."""
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    if model.ByteSize() < PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return [path]
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)
    return [path, path.parent / data]
