"""export.ort: the ORT format (`.ort`), what onnxruntime-mobile and minimal builds load on phones
and edge boards. The converted model is loaded back and checked against the ONNX graph.
When to use: last, after quantization (no ONNX pass can read an .ort file)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.config import PassConfig
from compress.context import PassContext
from compress.exporters import parity
from compress.registry import ALL_KINDS, PassSpec
from compress.state import ModelState


class ExportOrt(PassConfig):
    pass_name = "export.ort"
    optimization: Literal["basic", "extended", "all"] = Field(
        "basic", description="graph optimisation baked into the .ort file (basic is portable across hardware)")
    atol: float = Field(1e-3, gt=0, le=1.0, description="max absolute difference allowed against the ONNX graph")
    min_cosine: float = Field(0.9999, gt=0, le=1.0, description="min cosine against the ONNX graph")


def convert(src, dst, optimization: str) -> None:
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def run(state: ModelState, cfg: ExportOrt, ctx: PassContext) -> ModelState:
    from compress.runtime import OnnxRunner

    dst = ctx.workdir / "model.ort"
    convert(state.path, dst, cfg.optimization)
    feeds = state.kind.inputs.parity_feeds(state.tokenizer, state.data.eval if state.data else [], ctx.max_length)
    rows = parity.check("export.ort vs ONNX graph", OnnxRunner(state.path, state.kind).raw,
                        OnnxRunner(dst, state.kind).raw, feeds, cfg.atol, cfg.min_cosine)
    ctx.notes["parity"] = rows
    return state.with_file(dst, "ort")


PASS = PassSpec(name="export.ort", config=ExportOrt, run=run, takes=("onnx",), gives="ort", kinds=ALL_KINDS,
                summary="Convert to the ORT mobile format (.ort) for edge runtimes, checked against the ONNX graph.")
