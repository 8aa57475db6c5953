"""Activation importance of attention units and FFN neurons: structured Wanda / FLAP.

Sun et al., "A Simple and Effective Pruning Approach for LLMs" (arXiv 2306.11695); An et al.,
"Fluctuation-based Adaptive Structured Pruning for LLMs" (arXiv 2312.11983). FFN neuron j scores
||W_down[:, j]||^2 * E[h_j^2], h the input of down (BERT output.dense) over the real tokens of the
calibration text; an attention unit sums the same over the o (attention.output.dense) input columns
of its query heads. Used by prune.structured (importance=activation) and by the latency-budget
proxy (passes/lib/budget.py)."""
from __future__ import annotations

import torch
from torch import nn

from compress.passes.lib import prunable


@torch.no_grad()
def mean_squares(model: nn.Module, data: dict[str, torch.Tensor], inputs: list[nn.Linear], forward_kwargs: dict,
                 batch_size: int = 8) -> list[torch.Tensor]:
    """Mean of x_c^2 over the real (unpadded) tokens of `data` (tokenized training text, never the
    held-out split), for every input column c of each linear in `inputs`, from forward pre-hooks."""
    sums = [torch.zeros(lin.in_features, dtype=torch.float64) for lin in inputs]
    real: list[torch.Tensor] = []  # the current batch's attention mask, flattened to (batch * seq,)

    def hook(i: int):
        def pre(_module, args):
            x = args[0].detach().reshape(-1, inputs[i].in_features)[real[0]]  # (real tokens, in_features)
            sums[i] += x.double().pow(2).sum(0).cpu()
        return pre

    handles = [lin.register_forward_pre_hook(hook(i)) for i, lin in enumerate(inputs)]
    try:
        for b in range(0, data["input_ids"].shape[0], batch_size):
            ids = data["input_ids"][b:b + batch_size].to(model.device)
            mask = data["attention_mask"][b:b + batch_size].to(model.device)
            real[:] = [mask.reshape(-1).bool()]
            model(input_ids=ids, attention_mask=mask, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    tokens = max(int(data["attention_mask"].sum()), 1)
    return [(total / tokens).float() for total in sums]


def unit_element_scores(model: nn.Module, data: dict[str, torch.Tensor], forward_kwargs: dict) -> dict[int, torch.Tensor]:
    """Per element of o and down: W[r, c]^2 * E[x_c^2], x the linear's input. prunable.unit_scores sums
    it over a neuron's down column (the square of the FLAP / structured-Wanda score) and over the o
    columns of a kv group's query heads; q/k/v/up/gate get no score. Squares rank like the norms, and
    add up over a group's columns as expected squared contributions."""
    fam = prunable.family_of(model.config)
    targets = [prunable.linears(layer, fam)[key] for layer in prunable.layers(model, fam) for key in ("o", "down")]
    means = mean_squares(model, data, targets, forward_kwargs)
    return {id(lin.weight): lin.weight.detach().float().pow(2) * mean.to(lin.weight.device)[None, :]
            for lin, mean in zip(targets, means)}  # (out_features, in_features)
