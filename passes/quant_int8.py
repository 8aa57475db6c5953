"""quant.int8: 8-bit quantization of an ONNX graph with onnxruntime's quantizer.

- dynamic: int8 weights, activations quantized at run time per tensor (MatMulInteger / QAttention /
  DynamicQuantizeMatMul). No calibration data; the usual choice for transformer encoders on CPU.
- static: QDQ format, activation ranges calibrated on the state's training text (never the
  held-out part), per-channel weights optional. The mode for CNNs (calibrated on training images:
  ORT runs QDQ Conv as QLinearConv; dynamic mode makes ConvInteger, slower).
Works on graphs fused by optimize.ort (fused ops keep float inputs via DefaultTensorType).
Defaults were chosen by measurement on all-MiniLM-L6-v2 (see README "int8 defaults"); plain
`quantize_dynamic` drops its held-out embedding cosine to about 0.95."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.config import PassConfig
from compress.context import PassContext
from compress.passes.lib.quiet import quiet_root_logger
from compress.passes.lib.selection import Patterns, matching_nodes
from compress.registry import ALL_KINDS, PassSpec
from compress.state import ModelState


class QuantInt8(PassConfig):
    pass_name = "quant.int8"
    mode: Literal["dynamic", "static"] = Field("dynamic", description="dynamic: activations quantized at run time; static: calibrated QDQ")
    per_channel: bool = Field(True, description="one weight scale per output channel instead of per tensor")
    reduce_range: bool = Field(False, description="7-bit weights (avoids u8s8 saturation on AVX2 CPUs without VNNI)")
    op_types: list[str] = Field(default_factory=list, description="op types to quantize; empty = the quantizer's defaults")
    exclude: Patterns = Field(default_factory=list, description="node names or 're:' patterns to keep in float")
    calibration: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="static mode: range estimator")
    calibration_samples: int = Field(64, ge=1, le=4096, description="static mode: training samples used to calibrate")
    quantize_matmul_outputs: bool = Field(False, description="static mode: also quantize MatMul outputs (full QDQ for NPUs; costs fidelity)")



def _dynamic(src, dst, cfg: QuantInt8, excluded: list[str]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                     weight_type=QuantType.QInt8, op_types_to_quantize=cfg.op_types or None,
                     nodes_to_exclude=excluded, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


class _Reader:
    """CalibrationDataReader over tokenized training text, one sample at a time."""

    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _with_shapes(src, dst) -> None:
    """Static quantization needs tensor types everywhere; a fused graph has no value_info, and
    without it the quantizer silently quantizes weights only (0 QuantizeLinear nodes)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(src))
    try:
        shaped = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - it gives up on some CNN graphs (EfficientNet's padding); ONNX's own copes
        shaped = onnx.shape_inference.infer_shapes(model)
    onnx.save(shaped, str(dst))


def _static(src, dst, cfg: QuantInt8, excluded: list[str], state: ModelState, max_length: int, workdir) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    shaped = workdir / "shape_inferred.onnx"
    _with_shapes(src, shaped)
    from compress.runtime import input_specs, session

    inputs = input_specs(session(src))  # a KV-cache graph's empty past takes its shape from the specs
    samples = state.data.train[: cfg.calibration_samples]
    feeds = state.kind.inputs.calibration_feeds(state.tokenizer, samples, max_length, inputs)  # one shape for all
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if not cfg.quantize_matmul_outputs:  # quantized MatMul outputs cost MiniLM 0.06 of cosine (0.993 -> 0.933)
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    try:
        quantize_static(str(shaped), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                        reduce_range=cfg.reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=cfg.op_types or None, nodes_to_exclude=excluded, calibrate_method=method,
                        extra_options=extra)
    finally:
        shaped.unlink(missing_ok=True)


QUANT_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QLinearMatMul", "DynamicQuantizeLinear",
             "QuantizeLinear", "DequantizeLinear", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "QLinearConv"}


def _ops_of(path, wanted: set[str]) -> dict[str, int]:
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {op: ops.count(op) for op in sorted(set(ops) & wanted)}


def _quant_ops(path) -> dict[str, int]:
    return _ops_of(path, QUANT_OPS)


def run(state: ModelState, cfg: QuantInt8, ctx: PassContext) -> ModelState:
    dst = ctx.workdir / "model.onnx"
    excluded = matching_nodes(state.path, cfg.exclude)
    if cfg.mode == "dynamic":
        with quiet_root_logger():
            _dynamic(state.path, dst, cfg, excluded)
    else:
        fused = _ops_of(state.path, {"FusedConv"})
        if fused:
            raise ValueError(f"static int8 can't calibrate this graph: optimize.ort fused {fused['FusedConv']} Conv + "
                             "activation pairs into FusedConv; put quant.int8 before optimize.ort (onnxruntime fuses the "
                             "quantized graph when it loads it)")
        with quiet_root_logger(), ctx.console.status(
                f"calibrating on {min(cfg.calibration_samples, len(state.data.train))} training samples"):
            _static(state.path, dst, cfg, excluded, state, ctx.max_length, ctx.workdir)
    before, quant_ops = _quant_ops(state.path), _quant_ops(dst)
    if quant_ops == before:
        raise ValueError("the quantizer changed nothing: no op of the graph could be quantized "
                         f"(quantized ops before and after: {before or 'none'})")
    if cfg.mode == "static" and not quant_ops.get("QuantizeLinear"):
        raise ValueError("static quantization quantized weights only (no QuantizeLinear for activations)")
    ctx.notes.update(quantized_ops=quant_ops, excluded=excluded)
    return state.with_file(dst, "onnx", quantized="int8")


def _check_order(cfg: QuantInt8, form: str | None, earlier: list) -> list[str]:
    """A second quant.int8 fails at run time (dynamic: nothing left to quantize; static: the
    quantized graph can't be calibrated again), so it is refused before any work starts."""
    first = next((j for j, c in enumerate(earlier) if c is not None and c.pass_name == "quant.int8"), None)
    if first is None:
        return []
    return [f"quant.int8 runs twice (also passes[{first}]): the graph is already int8 after the first, and a second "
            "quantization fails; keep one quant.int8 with all the settings you want"]


PASS = PassSpec(name="quant.int8", config=QuantInt8, run=run, takes=("onnx",), gives="onnx", kinds=ALL_KINDS,
                needs_data=lambda cfg: cfg.mode == "static", check_order=_check_order,
                summary="int8 quantization: dynamic, or static QDQ calibrated on the state's training text.")
