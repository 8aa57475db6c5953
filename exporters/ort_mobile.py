"""export.ort: the ORT format (`.ort`), what onnxruntime-mobile and minimal builds load on phones
and edge boards. The converted model is loaded back and checked against the ONNX graph.
When to use: last, after quantization (no ONNX pass can read an .ort file).

Beside model.ort the pass writes `required_operators.config`, the operator list of a minimal
onnxruntime build that runs this model (`build.sh --minimal_build --include_ops_by_config
required_operators.config`), made by onnxruntime's own tool from the .ort file. Its record
(`mobile` note, report.md "ORT Mobile") holds onnxruntime's mobile usability checker's verdict on
the graph the .ort holds: per execution provider (NNAPI, CoreML MLProgram, CoreML NeuralNetwork) the
op types it supports and not, the nodes it covers, into how many partitions they fall (each one a
CPU <-> accelerator copy) and the checker's YES / MAYBE / NO, as is and with fixed input shapes.
XNNPACK: where the installed onnxruntime offers it, the .ort is run under it, checked against the
ONNX graph and timed against the CPU EP; the pip CPU wheel has no XNNPACK and the record says so.
Neither check can fail the export: a checker that fails records its error."""
from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from compress.config import PassConfig
from compress.context import PassContext
from compress.errors import OutputMatchError, clip
from compress.exporters import parity
from compress.registry import ALL_KINDS, PassSpec
from compress.report import DASH, fmt, md_table, stage_label
from compress.state import ModelState

OPS_CONFIG = "required_operators.config"  # the name onnxruntime's convert_onnx_models_to_ort gives it
XNNPACK = "XnnpackExecutionProvider"
# (record key, name in the checker's messages, its supported-ops table in onnxruntime/tools/mobile_helpers,
# less the ".md": a markdown file of onnxruntime's package, not of this repository)
EPS = (("nnapi", "NNAPI", None), ("coreml_mlprogram", "CoreML MLProgram", "coreml_supported_mlprogram_ops"),
       ("coreml_neuralnetwork", "CoreML NeuralNetwork", "coreml_supported_neuralnetwork_ops"))


class ExportOrt(PassConfig):
    pass_name = "export.ort"
    optimization: Literal["basic", "extended", "all"] = Field(
        "basic", description="graph optimisation baked into the .ort file (basic is portable across hardware)")
    atol: float = Field(1e-3, gt=0, le=1.0, description="max absolute difference allowed against the ONNX graph")
    min_cosine: float = Field(0.9999, gt=0, le=1.0, description="min cosine against the ONNX graph")


def _level(optimization: str) -> Any:
    import onnxruntime as ort

    return {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]


def convert(src, dst, optimization: str) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _level(optimization)
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _quiet_ort_tools():
    """onnxruntime.tools.ort_format_model calls logging.basicConfig when imported (tools/logger.py), which
    would give the root logger a stderr handler for the rest of the process, and logs "Created config
    in ..." at INFO on its own DEBUG-level logger. A root handler present during the import makes
    basicConfig do nothing; the tool's logger is held at WARNING while it runs."""
    root, hold = logging.getLogger(), logging.NullHandler()
    root.addHandler(hold)
    try:
        import onnxruntime.tools.ort_format_model  # noqa: F401 - imported here, where basicConfig finds a handler
    finally:
        root.removeHandler(hold)
    tool = logging.getLogger("ort_format_model.utils")  # its import set it to DEBUG: lowered after, not before
    previous = tool.level
    tool.setLevel(logging.WARNING)
    try:
        yield
    finally:
        tool.setLevel(previous)


def write_ops_config(ort_model: Path, dst: Path) -> dict:
    """onnxruntime's required-operators config of `ort_model` (create_config_from_models, as
    convert_onnx_models_to_ort writes it), read back with onnxruntime's parser: {domain: [op types]}."""
    with _quiet_ort_tools():
        from onnxruntime.tools.ort_format_model import create_config_from_models
        from onnxruntime.tools.reduced_build_config_parser import parse_config

        create_config_from_models([Path(ort_model)], Path(dst), enable_type_reduction=False)
        required, _ = parse_config(str(dst))  # {domain: {opset: {op types}}}
    # its header names the model by the path it was made from (the run's temporary folder): its file name instead
    lines = Path(dst).read_text().splitlines(keepends=True)
    Path(dst).write_text("".join(f"# - {Path(line[4:].strip()).name}\n" if line.startswith("# - ") else line
                                 for line in lines))
    return {domain: sorted({op for ops in opsets.values() for op in ops}) for domain, opsets in sorted(required.items())}


def _silent_logger() -> logging.Logger:
    """For the checker's functions that want a logger: nothing it logs reaches the root handlers."""
    log = logging.getLogger("compress.ort_mobile.checker")
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.NullHandler())  # else Python's last-resort handler prints warnings to stderr
    return log


def _partitions(uc: Any, model: Any, table: str | None, fixed_sizes: bool) -> Any:
    if table is None:
        return uc.check_nnapi_partitions(model, fixed_sizes)
    return uc.check_coreml_partitions(model, fixed_sizes, table + ".md")


def _op_types(graph: Any) -> dict[str, Any]:
    """One node per "domain:op" of the graph (subgraphs included), the checker's way of naming ops."""
    found: dict[str, Any] = {}
    for node in graph.node:
        found.setdefault(f"{node.domain or 'ai.onnx'}:{node.op_type}", node)
        for attr in node.attribute:
            if attr.HasField("g"):
                found.update({k: v for k, v in _op_types(attr.g).items() if k not in found})
    return found


def _ep_verdict(uc: Any, model: Any, table: str | None, dynamic: bool) -> dict:
    """One EP's partitioning, as the checker's `checker()` does it: with the shapes as they are, and when
    that is not a YES and inputs are dynamic, once more as if the shapes were fixed; the better verdict counts."""
    info = _partitions(uc, model, table, fixed_sizes=True)
    ops = _op_types(model.graph)
    supported = sorted(name for name, node in ops.items() if info.supported_ops_checker.is_op_supported(node))
    verdict = info.suitability()
    entry = {"nodes": info.num_nodes, "nodes_covered": info.num_supported_nodes, "partitions": info.num_partitions,
             "partition_sizes": [len(group) for group in info.supported_groups],
             "supported_ops": supported, "unsupported_ops": sorted(info.unsupported_ops),
             "unsupported_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
             "unsupported_rank": info.num_unsupported_nodes_due_to_rank,
             "caveats": info.supported_ops_checker.get_caveats(), "as_is": verdict.name}
    if verdict != uc.PartitioningInfo.TryWithEP.YES and dynamic:
        fixed = _partitions(uc, model, table, fixed_sizes=False)
        entry["fixed_shapes"] = {"nodes_covered": fixed.num_supported_nodes, "partitions": fixed.num_partitions,
                                 "verdict": fixed.suitability().name}
        verdict = max(verdict, fixed.suitability())
    entry["verdict"] = verdict.name
    return entry


def check_mobile(src: Path, optimization: str) -> dict:
    """onnxruntime's mobile usability checker (tools/mobile_helpers/usability_checker.py) on `src` optimised
    as the .ort is: its functions return the partitioning, so the verdict is taken from them, not from its log."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "model.onnx"
        optimize_model(Path(src), graph, level=_level(optimization), use_external_initializers=True)
        model = ModelProtoWithShapeInfo(graph).model_with_shape_info
        dynamic, _ = uc.check_shapes(model.graph, _silent_logger())
        out: dict[str, Any] = {"nodes": len(model.graph.node), "dynamic_inputs": [i.name for i in dynamic]}
        for key, _, table in EPS:
            out[key] = _ep_verdict(uc, model, table, bool(dynamic))
    out["try_nnapi_or_coreml"] = any(out[key]["verdict"] != "NO" for key, _, _ in EPS)
    # the advice check_onnx_model_mobile_usability.py prints after the checker
    out["recommendation"] = ("NNAPI or CoreML may help: compare the NNAPI EP on Android and the CoreML EP on iOS "
                             "against the CPU EP" if out["try_nnapi_or_coreml"]
                             else "use the CPU EP (NNAPI and CoreML would not run enough of the graph in one piece)")
    if any(out[key]["verdict"] != out[key]["as_is"] for key, _, _ in EPS):
        out["recommendation"] += ("; only with fixed input shapes "
                                  "(python -m onnxruntime.tools.make_dynamic_shape_fixed)")
    return out


def xnnpack_session(path: Path, threads: int) -> Any:
    """XNNPACK runs its own thread pool: onnxruntime's intra-op pool gets one thread and no spinning, as
    its XNNPACK EP page recommends."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with warnings.catch_warnings():  # a fallback to the CPU EP is read from get_providers() and recorded
        warnings.filterwarnings("ignore", message="Specified provider", category=UserWarning)
        return ort.InferenceSession(str(path), so, providers=[(XNNPACK, {"intra_op_num_threads": str(threads)}),
                                                              "CPUExecutionProvider"])


def check_xnnpack(state: ModelState, ort_model: Path, feeds: list[dict], cfg: ExportOrt, ctx: PassContext) -> dict:
    """The .ort under the XNNPACK EP: parity with the ONNX graph and p50 against the CPU EP; or why not."""
    import onnxruntime as ort

    from compress.profiling import time_onnx
    from compress.runtime import OnnxRunner

    available = ort.get_available_providers()
    if XNNPACK not in available:
        return {"available": False,
                "why": f"onnxruntime {ort.__version__} here offers {', '.join(available)}: its wheel is built "
                       "without XNNPACK (onnxruntime-android / onnxruntime-objc or a --use_xnnpack build have it)"}
    settings = ctx.latency
    sess = xnnpack_session(ort_model, settings.threads)
    if XNNPACK not in sess.get_providers():
        return {"available": False, "why": f"a session asking for it ran on {', '.join(sess.get_providers())}"}
    try:
        rows = parity.check("export.ort under XNNPACK vs ONNX graph", OnnxRunner(state.path, state.kind).raw,
                            OnnxRunner.from_session(sess, state.kind).raw, feeds, cfg.atol, cfg.min_cosine)
    except OutputMatchError as err:
        rows = err.rows
    feed = state.kind.inputs.latency_feed(state.tokenizer, state.data.eval if state.data else [],
                                          settings.batch, settings.seq)
    return {"available": True, "parity_ok": all(r["ok"] for r in rows), "parity": rows, "threads": settings.threads,
            "p50_ms": {"cpu": time_onnx(ort_model, state.kind, feed, settings)["p50"],
                       "xnnpack": time_onnx(ort_model, state.kind, feed, settings, sess=sess)["p50"]}}


def _guarded(check: Any, *args: Any) -> dict:
    """A check that may not fail the export: its error is recorded instead."""
    try:
        return check(*args)
    except Exception as err:  # noqa: BLE001 - an exotic graph the checker cannot read must not fail the export
        return {"error": f"{type(err).__name__}: {clip(str(err), 300)}"}


def run(state: ModelState, cfg: ExportOrt, ctx: PassContext) -> ModelState:
    from compress.runtime import OnnxRunner

    dst = ctx.workdir / "model.ort"
    convert(state.path, dst, cfg.optimization)
    feeds = state.kind.inputs.parity_feeds(state.tokenizer, state.data.eval if state.data else [], ctx.max_length)
    rows = parity.check("export.ort vs ONNX graph", OnnxRunner(state.path, state.kind).raw,
                        OnnxRunner(dst, state.kind).raw, feeds, cfg.atol, cfg.min_cosine)
    ctx.notes["parity"] = rows
    ops = write_ops_config(dst, ctx.workdir / OPS_CONFIG)
    with ctx.console.status("onnxruntime's mobile usability checker"):
        mobile = _guarded(check_mobile, Path(state.path), cfg.optimization)
    mobile["required_operators"] = {"file": OPS_CONFIG, "ops": ops}
    mobile["xnnpack"] = _guarded(check_xnnpack, state, dst, feeds, cfg, ctx)
    ctx.notes["mobile"] = mobile
    artifacts = {**state.meta.get("artifacts", {}), OPS_CONFIG: str(ctx.workdir / OPS_CONFIG)}
    return state.with_file(dst, "ort", artifacts=artifacts)


def _ep_row(name: str, ep: dict) -> list[str]:
    nodes = ep.get("nodes") or 0
    share = f" ({100 * ep['nodes_covered'] / nodes:.0f}%)" if nodes else ""
    fixed = ep.get("fixed_shapes")
    fixed_txt = (f"{fixed['nodes_covered']}/{nodes} in {fixed['partitions']}: {fixed['verdict']}" if fixed else DASH)
    unsupported = ", ".join(op.removeprefix("ai.onnx:") for op in ep.get("unsupported_ops", [])) or "none"
    return [name, f"{ep.get('nodes_covered')}/{nodes}{share}", fmt(ep.get("partitions"), "d"), str(ep.get("as_is")),
            fixed_txt, unsupported]


def _report(stage: dict) -> list[str]:
    """report.md's section for the `mobile` note: the minimal-build config, the usability checker's verdict
    per EP and XNNPACK."""
    mobile = stage.get("mobile")
    if not mobile:
        return []
    lines = [f"## ORT Mobile: {stage_label(stage)}", ""]
    ops = (mobile.get("required_operators") or {}).get("ops") or {}
    if ops:
        counts = ", ".join(f"{domain} {len(names)}" for domain, names in ops.items())
        lines.append(f"- Minimal build: `{OPS_CONFIG}` lists {sum(len(n) for n in ops.values())} operators ({counts}); "
                     f"build onnxruntime with `--minimal_build --include_ops_by_config {OPS_CONFIG}`")
    if "error" in mobile:
        lines.append(f"- Mobile usability checker failed on this graph: {mobile['error']}")
    else:
        dynamic = ", ".join(mobile.get("dynamic_inputs") or []) or "none"
        lines += [(f"- Usability checker (graph of {fmt(mobile.get('nodes'), 'd')} nodes, dynamic inputs: {dynamic}): "
                   f"{mobile.get('recommendation', DASH)}"), ""]
        rows = [_ep_row(title, mobile[key]) for key, title, _ in EPS if key in mobile]
        lines += md_table(["EP", "nodes covered", "partitions", "as is", "fixed shapes", "unsupported ops"], rows,
                          left=("EP", "as is", "fixed shapes", "unsupported ops")) + [""]
    xnn = mobile.get("xnnpack") or {}
    if xnn.get("available"):
        p50 = xnn.get("p50_ms") or {}
        lines.append(f"- XNNPACK EP: parity with the ONNX graph {'OK' if xnn.get('parity_ok') else 'FAILED'}; p50 "
                     f"{fmt(p50.get('xnnpack'), '.2f')} ms against {fmt(p50.get('cpu'), '.2f')} ms on the CPU EP "
                     f"({fmt(xnn.get('threads'), 'd')} threads)")
    elif xnn:
        lines.append(f"- XNNPACK EP: not measured: {xnn.get('why') or xnn.get('error', DASH)}")
    return lines + [""]


PASS = PassSpec(name="export.ort", config=ExportOrt, run=run, takes=("onnx",), gives="ort", kinds=ALL_KINDS,
                report=_report,
                summary="Convert to the ORT mobile format (.ort) for edge runtimes, checked against the ONNX graph; "
                        "minimal-build operator config and NNAPI/CoreML/XNNPACK verdict.")
