"""OpenVINO, Intel's CPU inference runtime, on optimum's ONNX export of the same checkpoint.

The model is read from that export, fixed to batch 1 and made stateful (the KV cache kept inside
the compiled model between requests, as optimum-intel does), its weights compressed by NNCF with
its default recipes for int8 and int4 (as optimum-intel's load_in_8bit / load_in_4bit do), and
saved as OpenVINO IR. optimum-intel itself is not used: it needs optimum 2.3, and optimum-onnx
0.1.0 (the optimum peer and the tests' reference) pins optimum 2.1. The openvino package has no
generation loop, so a plain greedy loop drives the compiled model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "int8", "int4")
MODEL_XML = "openvino_model.xml"


def available() -> str | None:
    from dialogpt_edge.benchmarks.backends import missing

    return missing("openvino", "pip install openvino nncf", "openvino", "nncf")


def prepare(checkpoint: Path, cache_dir: Path, precision: str) -> Path:
    from dialogpt_edge.benchmarks.backends import cached_conversion, conversion_stamp, optimum_ort

    out = cache_dir / f"openvino-{precision}"

    def convert(folder: Path) -> None:  # from optimum's export, made only when a conversion is due
        _convert(optimum_ort.prepare(checkpoint, cache_dir, "fp32") / "model.onnx", folder / MODEL_XML, precision)

    # redone when this conversion or OpenVINO / NNCF change
    cached_conversion(out, conversion_stamp(__file__, version()), convert)
    return out


def _convert(onnx_model: Path, xml: Path, precision: str) -> None:
    import openvino as ov
    from openvino._offline_transformations import apply_make_stateful_transformation

    model = ov.Core().read_model(str(onnx_model))
    # batch 1: a stateful cache starts from an empty state of the input's shape, and batch must be known for it
    model.reshape({i.get_any_name(): ov.PartialShape([1, *list(i.get_partial_shape())[1:]]) for i in model.inputs})
    if precision != "fp32":
        import logging

        import nncf

        logging.getLogger("nncf").setLevel(logging.ERROR)  # a progress bar and a table per model otherwise
        if precision == "int8":
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        else:  # NNCF's defaults: groups of 128, the first / last layers int8; a width 128 does not divide gets smaller groups
            adjust = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, advanced_parameters=adjust)
    past = [i.get_any_name() for i in model.inputs if i.get_any_name().startswith("past_key_values.")]
    apply_make_stateful_transformation(model, {name: name.replace("past_key_values.", "present.") for name in past})
    ov.save_model(model, str(xml), compress_to_fp16=False)  # its default stores float weights as fp16: fp32 stays fp32


def version() -> str:
    from importlib import metadata

    return f"openvino {metadata.version('openvino')} / nncf {metadata.version('nncf')}"


class Runner:
    def __init__(self, artifact: Path, threads: int, precision: str = ""):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision == "fp32":
            # OpenVINO computes in bf16 by default where the CPU has it (AVX-512 BF16, AMX): an fp32 row
            # must compute in fp32 (on a Zen 5 bf16 decoded faster and agreed with PyTorch on 28 % of
            # greedy ids). int8 / int4 keep OpenVINO's own defaults, as its users get them.
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = ov.Core().compile_model(str(artifact / MODEL_XML), "CPU", config)
        self.names = {i.get_any_name() for i in compiled.inputs}
        self.request = compiled.create_infer_request()

    def _logits(self, ids, start: int):
        n = len(ids)
        feed = {"input_ids": np.asarray(ids, np.int64)[None], "attention_mask": np.ones((1, start + n), np.int64)}
        if "position_ids" in self.names:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        self.request.infer(feed)
        return self.request.get_tensor("logits").data[0, -1]

    def generate(self, prompt_ids: list[int], n_new: int):
        self.request.reset_state()
        stamps, ids = [], []
        token = int(np.argmax(self._logits(prompt_ids, 0)))
        while True:
            stamps.append(time.perf_counter())
            ids.append(token)
            if len(ids) == n_new:
                return ids, stamps
            token = int(np.argmax(self._logits([token], len(prompt_ids) + len(ids) - 1)))
