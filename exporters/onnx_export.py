"""export.onnx: the torch model to an ONNX graph with dynamic batch and sequence axes, checked
against PyTorch on held-out real inputs before it counts as done.

BERT-family encoders export through the legacy (TorchScript) exporter with eager attention,
the one path on which onnxruntime's transformer optimizer fuses Attention (docs/install.md). Encoders
output `last_hidden_state` and the pooled, L2-normalised `sentence_embedding`; classifiers output
`logits`. Causal LMs export with a KV cache by default (`cache=true`, see exporters/causal_lm.py:
past_key_values inputs, present outputs, one graph for prompt and decode steps); with `cache=false`
they output `logits` only. Image classifiers (compress/images.py): `pixel_values` (batch, 3, H, W) ->
`logits`, dynamic batch, checked on held-out images. The model's kind (compress/kinds/) picks the route
(`kind.export_onnx`: `export_tokens` or `export_pixels` below), the output names (`kind.onnx_outputs`) and
what the traced wrapper computes (`kind.export_forward`). When to use: always, before any ONNX pass."""
from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field

from compress.config import PassConfig
from compress.context import PassContext
from compress import kinds
from compress.exporters import parity
from compress.kinds import ModelKind
from compress.registry import ALL_KINDS, PassSpec
from compress.state import ModelState


class ExportOnnx(PassConfig):
    pass_name = "export.onnx"
    opset: int = Field(17, ge=14, le=21, description="ONNX opset version")
    exporter: Literal["legacy", "dynamo", "genai"] = Field(
        "legacy", description=(
            "legacy: TorchScript exporter (lets ORT fuse BERT attention); dynamo: torch.export based; genai: causal LMs "
            "with a cache, the graph of onnxruntime-genai's model builder (fused GroupQueryAttention, rotary and "
            "skip-norms, shared KV buffer: the fastest to decode; pip install 'compress[genai]')"))
    atol: float = Field(1e-3, gt=0, le=1.0, description="max absolute difference allowed against PyTorch")
    rtol: float = Field(5e-4, ge=0, le=0.1, description=(
        "tolerance added per unit of the largest |output|: LM logits reach ~30 and fp32 reordering over 30 layers "
        "moves them by ~1e-2 (SmolLM2), while MiniLM's export matches to 3e-6"))
    min_cosine: float = Field(0.9999, gt=0, le=1.0, description="min cosine between ONNX and PyTorch outputs")
    cache: bool = Field(True, description=(
        "causal LMs: past_key_values inputs / present outputs for generation; ignored for encoders"))


def forward_wrapper(model, kind: ModelKind, pooling: str):
    import torch

    class Wrapper(torch.nn.Module):
        """Explicit forward(input_ids, attention_mask) -> the kind's onnx_outputs: transformers 5 models can't be
        traced directly (export.executorch exports the same module)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return kind.export_forward(self.model, input_ids, attention_mask, pooling)

    return Wrapper().eval()


def output_names(kind: str | ModelKind) -> list[str]:
    return list(kinds.get(kind).onnx_outputs)


def _export(wrapper, feed: dict, path, kind: ModelKind, cfg: ExportOnnx) -> None:
    import torch

    args = (torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
    outs = output_names(kind)
    if cfg.exporter == "legacy":
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        for name in outs:
            axes[name] = {0: "batch"} if name == "sentence_embedding" else {0: "batch", 1: "sequence"}
        with warnings.catch_warnings():  # tracer warnings on shape branches: parity on other shapes is the check
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=cfg.opset,
                              input_names=["input_ids", "attention_mask"], output_names=outs, dynamic_axes=axes)
        return
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=max(cfg.opset, 18),
                             input_names=["input_ids", "attention_mask"], output_names=outs, dynamic_shapes=shapes)
    prog.save(str(path), external_data=False)


def _torch_outputs(wrapper, kind: ModelKind):
    import torch

    def run(feed: dict) -> dict:
        with torch.inference_mode():
            out = wrapper(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
        out = out if isinstance(out, tuple) else (out,)
        return {n: t.float().numpy() for n, t in zip(output_names(kind), out)}

    return run


def _export_image(model, feeds: list[dict], path, cfg: ExportOnnx) -> None:
    """pixel_values (batch, 3, H, W) -> logits (batch, classes), dynamic batch."""
    import torch

    x = torch.from_numpy(feeds[0]["pixel_values"])
    if cfg.exporter == "legacy":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=cfg.opset, input_names=["pixel_values"],
                              output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        return
    prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=max(cfg.opset, 18), input_names=["pixel_values"],
                             output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))  # positional: any arg name
    prog.save(str(path), external_data=False)


def export_pixels(state: ModelState, cfg: ExportOnnx, ctx: PassContext) -> ModelState:
    """An image classifier: pixel_values -> logits, checked against the module on held-out images."""
    from compress.runtime import OnnxRunner, TorchRunner

    model = state.model.eval()
    feeds = state.kind.inputs.parity_feeds(None, state.data.eval, ctx.max_length)
    path = ctx.workdir / "model.onnx"
    _export_image(model, feeds, path, cfg)
    torch_logits = TorchRunner(model, state.kind)

    def reference(feed: dict) -> dict:
        return {"logits": torch_logits(feed)}

    ctx.notes["parity"] = parity.check("export.onnx vs PyTorch", reference, OnnxRunner(path, state.kind).raw, feeds,
                                       cfg.atol, cfg.min_cosine, cfg.rtol)
    return state.with_file(path, "onnx", exporter=cfg.exporter)


def run(state: ModelState, cfg: ExportOnnx, ctx: PassContext) -> ModelState:
    return state.kind.export_onnx(state, cfg, ctx)


def export_tokens(state: ModelState, cfg: ExportOnnx, ctx: PassContext, cache: bool = False) -> ModelState:
    """Token inputs -> the kind's `onnx_outputs`, checked against PyTorch on held-out text; `cache` (causal
    LMs): the KV-cache graph of exporters/causal_lm.py instead."""
    from compress.runtime import OnnxRunner

    model = state.model
    config = getattr(model, "config", None)  # a plain torch module fed token ids has none
    previous = getattr(config, "_attn_implementation", None)
    if cfg.exporter == "legacy" and previous not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # the pattern ORT's fusion recognises
    experts = getattr(config, "_experts_implementation", None)
    switch = experts not in (None, "batched_mm") and getattr(model, "_can_set_experts_implementation", lambda: False)()
    if switch:  # MoE: grouped_mm traces to aten::histc (no ONNX op); batched_mm exports (docs/install.md)
        model.set_experts_implementation("batched_mm")
    texts = state.data.eval if state.data else []
    try:
        if cache and cfg.exporter == "genai":
            from compress.exporters import genai_builder

            path, rows = genai_builder.export(model, state.tokenizer, texts, cfg, ctx.workdir, ctx.max_length)
        elif cache:
            from compress.exporters import causal_lm

            path, rows = causal_lm.export(model, state.tokenizer, texts, cfg, ctx.workdir, ctx.max_length)
        else:
            wrapper = forward_wrapper(model, state.kind, state.meta.get("pooling", "mean"))
            feeds = state.kind.inputs.parity_feeds(state.tokenizer, texts, ctx.max_length)
            path = ctx.workdir / "model.onnx"
            _export(wrapper, feeds[0], path, state.kind, cfg)
            rows = parity.check("export.onnx vs PyTorch", _torch_outputs(wrapper, state.kind),
                                OnnxRunner(path, state.kind).raw, feeds, cfg.atol, cfg.min_cosine, cfg.rtol)
    finally:
        if previous not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(previous)
        if switch:
            model.set_experts_implementation(experts)
    ctx.notes["parity"] = rows
    return state.with_file(path, "onnx", hf_config=config, exporter=cfg.exporter)


def _check(cfg: ExportOnnx, info) -> list[str]:
    """exporter=genai: onnxruntime-genai's builder writes causal LMs with a KV cache only, and must be installed."""
    if cfg.exporter != "genai":
        return []
    if info.kind.name != "causal-lm" or not cfg.cache:
        what = "causal LM exported without a cache" if info.kind.name == "causal-lm" else f"{info.kind.name} model"
        return [f"exporter=genai builds causal LMs with a KV cache only (cache=true); this is a {what}: use "
                "exporter=legacy"]
    from compress.exporters import genai_builder

    return [] if genai_builder.available() else [
        "exporter=genai needs onnxruntime-genai: pip install 'compress[genai]' (or use exporter=legacy)"]


PASS = PassSpec(name="export.onnx", config=ExportOnnx, run=run, takes=("torch",), gives="onnx", kinds=ALL_KINDS,
                check=_check,
                summary="Export to ONNX (dynamic batch/sequence axes; KV cache for causal LMs), checked against PyTorch on held-out text.")
