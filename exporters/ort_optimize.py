"""optimize.ort: onnxruntime graph optimisation, checked for parity against the unoptimised graph.

BERT-family encoders go through onnxruntime's transformer optimizer (model_type="bert"), which
fuses embeddings + LayerNorm, Attention, SkipLayerNorm and GELU into single kernels; the head
count and the attention width (heads x head size) come from the model config, so head-pruned
models fuse too (before 2026-11-29 they silently did not: no Attention fusion after head pruning). Other models get onnxruntime's
offline extended graph optimisations. When to use: after export.onnx, before quantization (the
int8 pass quantizes the fused Attention op as a whole)."""
from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from compress.config import PassConfig
from compress.context import PassContext
from compress.exporters import parity
from compress.registry import ALL_KINDS, PassSpec
from compress.state import ModelState

BERT_LIKE = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet")


class OptimizeOrt(PassConfig):
    pass_name = "optimize.ort"
    model_type: Literal["auto", "bert", "generic"] = Field(
        "auto", description="auto: transformer fusion for BERT-family encoders, generic graph optimisation otherwise")
    opt_level: int = Field(1, ge=0, le=2, description="onnxruntime optimisation level used during fusion (0-2)")
    gelu_approximation: bool = Field(
        True, description="fuse GELU as FastGelu (tanh form): about 2% faster int8 MiniLM, held-out cosine unchanged at 4 decimals")
    atol: float = Field(2e-2, gt=0, le=1.0, description=(
        "max absolute difference allowed against the input graph (FastGelu moves MiniLM hidden states by up to "
        "6e-3 while their cosine stays 0.999999; min_cosine is the tighter guard)"))
    min_cosine: float = Field(0.9999, gt=0, le=1.0, description="min cosine against the input graph")


def resolved_type(cfg: OptimizeOrt, hf_config) -> str:
    if cfg.model_type != "auto":
        return cfg.model_type
    return "bert" if getattr(hf_config, "model_type", "") in BERT_LIKE else "generic"


def _fuse_bert(src, dst, hf_config, cfg: OptimizeOrt) -> dict:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    heads = getattr(hf_config, "num_attention_heads", 0) if hf_config is not None else 0
    hidden = getattr(hf_config, "hidden_size", 0) if hf_config is not None else 0
    # the fusion's hidden_size is the attention width (heads x head size), which head pruning makes smaller than
    # the model's hidden size (the pruned config keeps the head size as attention_head_size)
    size = getattr(hf_config, "attention_head_size", None) if hf_config is not None else None
    if heads and size:
        hidden = heads * size
    options = FusionOptions("bert")
    options.enable_gelu_approximation = cfg.gelu_approximation
    # it warns that the attention width is not the q/k/v input width: by design after head or hidden pruning
    # (onnxruntime's transformers modules log under their bare module names)
    logs = [logging.getLogger(name) for name in ("fusion_attention", "onnxruntime.transformers.fusion_attention")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        opt = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=cfg.opt_level,
                             optimization_options=options)
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    opt.save_model_to_file(str(dst))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def _generic(src, dst) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return {}


def run(state: ModelState, cfg: OptimizeOrt, ctx: PassContext) -> ModelState:
    from compress.runtime import OnnxRunner

    dst = ctx.workdir / "model.onnx"
    how = resolved_type(cfg, state.hf_config)
    fused = _fuse_bert(state.path, dst, state.hf_config, cfg) if how == "bert" else _generic(state.path, dst)
    feeds = state.kind.inputs.parity_feeds(state.tokenizer, state.data.eval if state.data else [], ctx.max_length)
    before, after = OnnxRunner(state.path, state.kind), OnnxRunner(dst, state.kind)
    rows = parity.check("optimize.ort vs input graph", before.raw, after.raw, feeds, cfg.atol, cfg.min_cosine)
    ctx.notes.update(parity=rows, fused_ops=fused, optimizer=how)
    if how == "bert" and not fused.get("Attention"):
        ctx.console.print("[yellow]note:[/yellow] no Attention fusion (export with exporter=legacy and eager attention)")
    return state.with_file(dst, "onnx", optimized=how)


PASS = PassSpec(name="optimize.ort", config=OptimizeOrt, run=run, takes=("onnx",), gives="onnx", kinds=ALL_KINDS,
                summary="onnxruntime graph optimisation / transformer fusion, checked for parity.")
