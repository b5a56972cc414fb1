"""optimum's ORTModelForCausalLM: the same onnxruntime, driven by transformers' generate loop."""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("fp32", "int8")


def available() -> str | None:
    from dialogpt_edge.benchmarks.backends import missing

    return missing("optimum-onnx", "pip install 'dialogpt-edge[bench]'", "optimum.onnxruntime")


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    from dialogpt_edge.benchmarks.backends import cached_conversion, conversion_stamp

    fp32 = cache_dir / "optimum-fp32"

    def export(folder: Path) -> None:
        from optimum.exporters.onnx import main_export

        from dialogpt_edge.export.convert import quiet_libraries

        with quiet_libraries():
            main_export(str(checkpoint), output=folder, task="text-generation-with-past", do_validation=False)

    # both redone when this module or optimum / onnxruntime change (what else decides them: the checkpoint
    # is the cache folder's key)
    stamp = conversion_stamp(__file__, version())
    cached_conversion(fp32, stamp, export)
    if precision == "fp32":
        return fp32
    out = cache_dir / "optimum-int8"

    def quantize(folder: Path) -> None:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        # optimum's stock dynamic int8 recipe for this CPU (AVX-512 VNNI), as its docs show
        config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
        ORTQuantizer.from_pretrained(fp32).quantize(save_dir=folder, quantization_config=config)

    cached_conversion(out, stamp, quantize)
    return out


def version() -> str:
    from importlib import metadata

    return f"optimum-onnx {metadata.version('optimum-onnx')} / onnxruntime {metadata.version('onnxruntime')}"


class Runner:
    def __init__(self, artifact: Path, threads: int, precision: str = ""):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        torch.set_num_threads(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        name = "model_quantized.onnx" if (artifact / "model_quantized.onnx").is_file() else "model.onnx"
        self.model = ORTModelForCausalLM.from_pretrained(artifact, file_name=name, session_options=opts, use_cache=True)

    def generate(self, prompt_ids: list[int], n_new: int):
        from .streamer import timed_generate

        return timed_generate(self.model, prompt_ids, n_new)
