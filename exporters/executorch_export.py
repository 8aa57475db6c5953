"""export.executorch: the torch model to an ExecuTorch program (`model.pte`) for phones and edge
boards, lowered to the XNNPACK delegate, loaded back in ExecuTorch's own runtime and checked against
PyTorch on held-out inputs before it counts as done.

Route: `torch.export` with dynamic batch and sequence axes, bounded (ExecuTorch plans memory for the
largest input) -> `quantize: int8`: PT2E with ExecuTorch's `XNNPACKQuantizer` (symmetric int8,
per-channel weights; CNNs: every op, per-tensor static activations calibrated on the state's training
split, never the held-out one; transformers: the Linear layers only, activations quantized per run
(dynamic), as static int8 of everything took MiniLM's held-out cosine to 0.44 and of the Linears to
0.885, dynamic 0.9989; `prepare_pt2e`, `convert_pt2e`) -> `to_edge_transform_and_lower` with the
`XnnpackPartitioner` -> `to_executorch`. The program takes the inputs and returns the outputs
export.onnx's graph does (the kind's traced forward, `kind.export_forward`: an encoder's
`last_hidden_state` and pooled, L2-normalised `sentence_embedding`; a classifier's or an image
classifier's `logits`), so compress.runtime.PteRunner measures it like an ONNX stage (fidelity on
held-out data, latency). Parity: fp32 within atol / rtol / min_cosine as export.onnx; int8 by cosine
only (`int8_min_cosine`: int8 moves every value a little). The record holds the parity rows and
`executorch`: the share of the compute nodes XNNPACK took, the ops left to ExecuTorch's portable
kernels, the program's delegates and operators (what a selective runtime build must include).

Not for causal LMs yet (refused before any work): generation needs a KV-cache method (ExecuTorch's
LLM export). Needs `pip install 'compress[executorch]'`: ExecuTorch pulls torchao, which transformers
then imports on every model load, so it stays out of the default install.

When to use: last, after the torch passes, for an app that links ExecuTorch (Android, iOS, embedded
Linux). One model to both back ends: run the same torch passes once ending in export.onnx and once
in export.executorch, with one `stages_dir`, and the second run loads the torch stages the first
one made instead of running them again (stages are keyed by the pass list up to them):

    torch_passes = [{"pass": "prune.structured", "ffn": 0.5}, {"pass": "distill.kd"}]
    Pipeline([*torch_passes, "export.onnx", "quant.int8"]).run("minilm", outdir="out/onnx", stages_dir="out/stages")
    Pipeline([*torch_passes, {"pass": "export.executorch", "quantize": "int8"}]).run(
        "minilm", outdir="out/pte", stages_dir="out/stages")"""
from __future__ import annotations

import importlib.util
from typing import Any, Literal

import numpy as np
from pydantic import Field

from compress.config import PassConfig
from compress.context import PassContext
from compress.exporters import parity
from compress.registry import ALL_KINDS, PassSpec
from compress.report import DASH, fmt, stage_label
from compress.state import ModelState

# nodes that compute nothing: tuple unpacking, shape reads, and int8's quantize / dequantize (XNNPACK
# folds those it takes into its kernels); left out of the delegated share
BOOKKEEPING = ("getitem", "sym_size", "quantized_decomposed_")


class ExportExecutorch(PassConfig):
    pass_name = "export.executorch"
    quantize: Literal["none", "int8"] = Field("none", description=(
        "none: fp32; int8: PT2E static int8 with the XNNPACK quantizer (per-channel weights), calibrated on training "
        "samples"))
    calibration_samples: int = Field(64, ge=1, le=4096, description="int8: training samples the activation ranges are "
                                                                    "calibrated on (never held-out ones)")
    max_batch: int = Field(16, ge=2, le=256, description=(
        "largest batch the program takes (its memory is planned for it); larger batches run in slices"))
    max_sequence: int | None = Field(None, ge=8, le=8192, description=(
        "text: longest input in tokens the program takes; default: the longest the pipeline feeds (max_length, "
        "latency seq, 256 for task metrics), at most the model's max_position_embeddings"))
    atol: float = Field(1e-3, gt=0, le=1.0, description="fp32: max absolute difference allowed against PyTorch")
    rtol: float = Field(5e-4, ge=0, le=0.1, description="fp32: tolerance added per unit of the largest |output|")
    min_cosine: float = Field(0.9999, gt=0, le=1.0,
                              description="fp32: min cosine between ExecuTorch and PyTorch outputs")
    int8_min_cosine: float = Field(0.98, gt=0, le=1.0, description=(
        "int8: min cosine against the fp32 PyTorch outputs (the held-out bound compress's int8 MiniLM meets)"))


def _check(cfg: ExportExecutorch, info: Any) -> list[str]:
    problems = []
    if info.kind.is_generative:
        problems.append(f"does not export a {info.kind} model yet: generation needs a KV-cache method in the program "
                        "(ExecuTorch's LLM export); use export.onnx (cache=true) for this model")
    if importlib.util.find_spec("executorch") is None:
        problems.append("needs ExecuTorch, which is not installed: pip install 'compress[executorch]'")
    return problems


def _names(feed: dict) -> tuple[str, ...]:
    """The program's inputs, in order (compress.runtime.PteRunner feeds them the same way)."""
    return ("pixel_values",) if "pixel_values" in feed else ("input_ids", "attention_mask")


def _args(feed: dict) -> tuple:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(feed[name])) for name in _names(feed))


def _entry(state: ModelState) -> Any:
    """What the program computes: export.onnx's traced forward for token inputs; the module itself for pixels."""
    from compress.exporters.onnx_export import forward_wrapper

    model = state.model.eval()
    if not state.kind.inputs.uses_tokenizer:
        return model
    return forward_wrapper(model, state.kind, state.meta.get("pooling", "mean"))


def _max_sequence(state: ModelState, cfg: ExportExecutorch, ctx: PassContext) -> int:
    from compress.evaluate import TASK_MAX_LENGTH

    needed = max(ctx.max_length, ctx.latency.seq, TASK_MAX_LENGTH if state.tokenizer is not None else 0)
    positions = getattr(state.hf_config, "max_position_embeddings", None) or needed
    if cfg.max_sequence is None:
        return min(needed, positions)
    if cfg.max_sequence < max(ctx.max_length, ctx.latency.seq):
        raise ValueError(f"max_sequence={cfg.max_sequence} is shorter than what the pipeline feeds the program "
                         f"(max_length {ctx.max_length}, latency seq {ctx.latency.seq}): raise it, or leave it unset")
    return min(cfg.max_sequence, positions)


def _dynamic_shapes(feed: dict, max_batch: int, max_sequence: int) -> tuple:
    """Positional (any argument name): batch on axis 0 of every input, and tokens on axis 1 of text inputs."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max_batch)
    if "pixel_values" in feed:
        return ({0: batch},)
    sequence = Dim("sequence", min=2, max=max_sequence)
    return tuple({0: batch, 1: sequence} for _ in _names(feed))


def _lift_integer_scalars(gm: Any) -> Any:
    """Make every integer add / mul scalar a tensor of the node's own dtype before the quantizer sees it.
    XNNPACKQuantizer (ExecuTorch 1.5.1) lifts those scalars as float32 tensors, which turns the int64
    position / mask index arithmetic of transformers models (`arange(seq) + 0`) into floats, and the
    prepared model fails with "tensors used as indices must be long" (pytorch/executorch#22062)."""
    import torch

    for node in list(gm.graph.nodes):
        val = node.meta.get("val")
        if node.op != "call_function" or node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor) \
                or not isinstance(val, torch.Tensor) or val.dtype.is_floating_point or val.dtype == torch.bool:
            continue
        args = []
        for arg in node.args:
            if not isinstance(arg, (int, float)) or isinstance(arg, bool):
                args.append(arg)
                continue
            name = f"_integer_scalar_{len(list(gm.named_buffers()))}"
            gm.register_buffer(name, torch.tensor(arg, dtype=val.dtype))
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(name)
            const.meta["val"] = val.fake_mode.from_tensor(getattr(gm, name), static_shapes=True)
            args.append(const)
        node.args = tuple(args)
    gm.recompile()
    return gm


def _quantize_int8(program: Any, example: tuple, shapes: tuple, state: ModelState, cfg: ExportExecutorch,
                   ctx: PassContext) -> Any:
    """PT2E static int8 for XNNPACK, calibrated on training samples; the exported program of the result."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if state.kind.name == "image-classifier":
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    else:  # transformers: the Linear layers only, activations quantized per run (dynamic, as onnxruntime's default
        # int8): static per-tensor int8 of everything took MiniLM to cosine 0.44, of the Linears only to 0.885
        config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
        quantizer = XNNPACKQuantizer().set_operator_type(torch.ops.aten.linear.default, config)
    prepared = prepare_pt2e(_lift_integer_scalars(program.module()), quantizer)
    samples = state.data.train[: cfg.calibration_samples]
    with ctx.console.status(f"calibrating int8 on {len(samples)} training samples"), torch.no_grad():
        for feed in state.kind.inputs.batches(state.tokenizer, samples, ctx.max_length, min(cfg.max_batch, 16)):
            prepared(*_args(feed))
    return torch.export.export(convert_pt2e(prepared), example, dynamic_shapes=shapes)


def delegation(edge: Any) -> dict:
    """How much of the lowered graph XNNPACK took: compute nodes inside its delegates against those
    left to ExecuTorch's portable kernels (BOOKKEEPING nodes not counted), and which ops were left."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    ops = {op: row for op, row in info.delegation_by_operator.items() if not op.startswith(BOOKKEEPING)}
    taken, left = sum(r.delegated for r in ops.values()), sum(r.non_delegated for r in ops.values())
    return {"subgraphs": info.num_delegated_subgraphs, "delegated_nodes": taken, "portable_nodes": left,
            "delegated_share": taken / max(taken + left, 1),
            "delegated_ops": {op: r.delegated for op, r in sorted(ops.items()) if r.delegated},
            "portable_ops": {op: r.non_delegated for op, r in sorted(ops.items()) if r.non_delegated}}


def _program_facts(program: Any) -> dict:
    """What the serialised program holds: its delegates by backend and the operators it calls outside them."""
    plan = program.executorch_program.execution_plan[0]
    backends = [d.id for d in plan.delegates]
    return {"delegates": {b: backends.count(b) for b in sorted(set(backends))},
            "operators": sorted({f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators})}


def _reference(module: Any, names: list[str]) -> Any:
    import torch

    def run(feed: dict) -> dict:
        with torch.inference_mode():
            out = module(*_args(feed))
        out = out if isinstance(out, tuple) else (out,)
        return {name: getattr(t, "logits", t).float().numpy() for name, t in zip(names, out)}

    return run


def run(state: ModelState, cfg: ExportExecutorch, ctx: PassContext) -> ModelState:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from compress.runtime import PteRunner

    module = _entry(state)
    feeds = state.kind.inputs.parity_feeds(state.tokenizer, state.data.eval if state.data else [], ctx.max_length)
    max_sequence = _max_sequence(state, cfg, ctx) if "input_ids" in feeds[0] else None
    example, shapes = _args(feeds[0]), _dynamic_shapes(feeds[0], cfg.max_batch, max_sequence)
    with ctx.console.status("torch.export"):
        program = torch.export.export(module, example, dynamic_shapes=shapes)
    if cfg.quantize == "int8":
        program = _quantize_int8(program, example, shapes, state, cfg, ctx)
    with ctx.console.status("lowering to XNNPACK"):
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        facts = {"quantize": cfg.quantize, "max_batch": cfg.max_batch, "max_sequence": max_sequence,
                 **delegation(edge)}
        executorch = edge.to_executorch()
    path = ctx.workdir / "model.pte"
    path.write_bytes(executorch.buffer)
    ctx.notes["executorch"] = {**facts, **_program_facts(executorch)}
    fp32 = cfg.quantize == "none"
    atol, rtol, min_cos = (cfg.atol, cfg.rtol, cfg.min_cosine) if fp32 else (float("inf"), 0.0, cfg.int8_min_cosine)
    reference = _reference(module, list(state.kind.onnx_outputs))
    rows = parity.check(f"export.executorch ({cfg.quantize}) vs PyTorch", reference, PteRunner(path, state.kind).raw,
                        feeds, atol, min_cos, rtol)
    ctx.notes["parity"] = rows if fp32 else [{**row, "atol": None} for row in rows]  # int8: cosine only, no atol
    quantized = {"quantized": "int8"} if cfg.quantize == "int8" else {}
    return state.with_file(path, "pte", hf_config=state.hf_config, **quantized)


def _report(stage: dict) -> list[str]:
    """report.md's section: what XNNPACK took, what is left to portable kernels, parity."""
    et = stage.get("executorch")
    if not et:
        return []
    portable = ", ".join(f"{op} x{n}" for op, n in et.get("portable_ops", {}).items()) or "none"
    rows = stage.get("parity") or []
    cosines = ", ".join(f"{r['name']} {fmt(r.get('cosine'), '.6f')}" for r in rows) or DASH
    longest = f", sequence <= {et['max_sequence']}" if et.get("max_sequence") else ""
    bounds = f"batch <= {et.get('max_batch')}{longest}"
    taken = et.get("delegated_nodes") or 0
    total = taken + (et.get("portable_nodes") or 0)
    return [f"## ExecuTorch: {stage_label(stage)}", "",
            f"- `model.pte` ({et.get('quantize')}; inputs {bounds}): XNNPACK took {taken} of {total} compute nodes "
            f"({fmt(100 * (et.get('delegated_share') or 0), '.0f')}%) in {fmt(et.get('subgraphs'), 'd')} subgraphs",
            f"- Left to ExecuTorch's portable kernels: {portable}",
            f"- Loaded in ExecuTorch's runtime and compared with PyTorch on held-out inputs: cosine {cosines}", ""]


PASS = PassSpec(name="export.executorch", config=ExportExecutorch, run=run, takes=("torch",), gives="pte",
                kinds=ALL_KINDS, check=_check, needs_data=lambda cfg: cfg.quantize == "int8", report=_report,
                summary="Export to an ExecuTorch program (.pte) lowered to XNNPACK, fp32 or PT2E int8, checked in "
                        "ExecuTorch's runtime against PyTorch on held-out data.")
