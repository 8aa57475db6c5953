"""prune.structured: one-shot structured pruning, the baseline HomoDistil has to beat.

Removes the same fraction of attention units (kv groups) and FFN neurons in every layer of a
BERT- or Llama-family model in one step, ranked by
- `magnitude`: L2 norm of each unit's weights (rows of q/k/v/up/gate, columns of o/down),
- `taylor`: first-order Taylor importance |theta * dL/dtheta| summed per unit, with L the language-
  modelling loss on a few training batches (Molchanov et al., arXiv 1611.06440); causal LMs only,
- `random`: the honest floor.
Then slices the model like prune.homodistil (same regular architecture, reloads with the library's
classes). No training: follow with distill.kd to recover. When to use: as a quick baseline, or
when there is no budget for iterative pruning."""
from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from compress.config import PassConfig
from compress.passes import prunable
from compress.passes.trainer import tokenized
from compress.registry import PassSpec
from compress.state import ModelState


class PruneStructured(PassConfig):
    pass_name = "prune.structured"
    heads: float = Field(0.5, ge=0, lt=1, description="fraction of attention units (kv groups) to remove in every layer")
    ffn: float = Field(0.5, ge=0, lt=1, description="fraction of FFN neurons to remove in every layer")
    importance: Literal["magnitude", "taylor", "random"] = Field("magnitude", description="how units are ranked")
    taylor_batches: int = Field(8, ge=1, le=1000, description="taylor: training batches of 8 samples for the gradients")
    max_length: int = Field(128, ge=8, le=8192, description="taylor: tokens per sample")
    seed: int = Field(0, ge=0, description="random: seed")


def _taylor_scores(model, state: ModelState, cfg: PruneStructured) -> dict[int, torch.Tensor]:
    data = tokenized(state.tokenizer, state.data.train[: cfg.taylor_batches * 8], cfg.max_length)
    model.zero_grad(set_to_none=True)
    for i in range(0, data["input_ids"].shape[0], 8):
        ids, mask = data["input_ids"][i:i + 8].to(model.device), data["attention_mask"][i:i + 8].to(model.device)
        labels = ids.masked_fill(mask == 0, -100)
        model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    scores = {id(p): (p * p.grad).abs().detach() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return scores


def _scores(model, state: ModelState, cfg: PruneStructured) -> dict[int, torch.Tensor]:
    if cfg.importance == "taylor":
        return _taylor_scores(model, state, cfg)
    if cfg.importance == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        return {id(p): torch.rand(p.shape, generator=g) for p in model.parameters()}
    return {id(p): p.detach() ** 2 for p in model.parameters()}  # unit score = squared L2 norm


def run(state: ModelState, cfg: PruneStructured, ctx) -> ModelState:
    model = copy.deepcopy(state.model)
    fam, geo = prunable.family_of(model.config), prunable.Geometry.of(model.config)
    before = sum(p.numel() for p in model.parameters())
    heads, ffn = prunable.unit_scores(model, fam, geo, _scores(model, state, cfg))
    keep_heads, keep_ffn = prunable.keep_count(geo.kv_heads, cfg.heads), prunable.keep_count(geo.ffn, cfg.ffn)
    shape = prunable.slice_model(model, fam, geo, prunable.top_masks(heads, ffn, keep_heads, keep_ffn))
    ctx.notes["pruning"] = {"before": {"heads": geo.heads, "kv_heads": geo.kv_heads, "ffn": geo.ffn, "params": before},
                            "after": {**shape, "params": sum(p.numel() for p in model.parameters())},
                            "importance": cfg.importance}
    return state.with_torch(model.eval())


def _check(cfg: PruneStructured, info) -> list[str]:
    problems = prunable.check_supported(info)
    if cfg.importance == "taylor" and info.kind != "causal-lm":
        problems.append(f"importance=taylor needs a causal LM's loss (the input is a {info.kind}); use magnitude")
    if cfg.heads == 0 and cfg.ffn == 0:
        problems.append("nothing to prune: set heads and/or ffn above 0")
    return problems


PASS = PassSpec(name="prune.structured", config=PruneStructured, run=run, takes=("torch",), gives="torch",
                needs_data=lambda cfg: cfg.importance == "taylor", check=_check,
                summary="One-shot structured pruning of heads and FFN neurons (magnitude, Taylor or random).")
