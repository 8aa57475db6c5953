"""Depth pruning: whole transformer layers removed from BERT- and Llama-family models.

Which layers go is measured, not guessed, on calibration text (training split only):
- `influence`, ShortGPT's Block Influence (Men et al., arXiv 2403.03853): BI_l = 1 - E[cos(x_l, x_l+1)],
  x_l the hidden state entering layer l, the expectation over real (unpadded) tokens; a layer that
  barely turns the residual stream does little, and the n layers of lowest BI are removed;
- `angular`, Gromov et al. ("The Unreasonable Ineffectiveness of the Deeper Layers", arXiv
  2403.17887): the contiguous block of n layers whose input and output are closest,
  argmin_l E[arccos(cos(x_l, x_l+n)) / pi], is removed as one piece.
`drop_layers` cuts the ModuleList for real, renumbers the attention layers' cache indices and
updates the config (`num_hidden_layers`, `layer_types`), so the result saves and reloads with the
library's own classes and exports like any model. `config.kept_layers` records which original
layer each remaining one was, so distillation can pair every student layer with its teacher layer
(`layer_pairs`). While prune.homodistil distils, a dropped layer is first bypassed (`bypass`: its
forward returns its input; weights and state dict unchanged, so checkpoints and resume still
work) and only sliced away at the end."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compress.passes.lib import prunable

IMPORTANCE = ("influence", "angular")


def _layer_io(model: nn.Module, fam: prunable.Family) -> tuple[list, list, list]:
    """Forward hooks recording every layer's input and output hidden states; (inputs, outputs, handles)."""
    ins: list[torch.Tensor | None] = []
    outs: list[torch.Tensor | None] = []
    handles = []
    for i, layer in enumerate(prunable.layers(model, fam)):
        ins.append(None)
        outs.append(None)

        def hook(_module, args, kwargs, output, i=i):
            ins[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            outs[i] = (output[0] if isinstance(output, tuple) else output).detach()

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return ins, outs, handles


@torch.no_grad()
def span_distances(model: nn.Module, fam: prunable.Family, data: dict[str, torch.Tensor], span: int = 1,
                   batch_size: int = 8, forward_kwargs: dict | None = None, angular: bool = False) -> torch.Tensor:
    """For every start l (0 .. L - span): the mean over real tokens of 1 - cos(x_l, x_l+span), or with
    `angular` arccos(cos) / pi; x_l+span is the output of layer l + span - 1. `data`: padded
    `input_ids` / `attention_mask` tensors of training text."""
    n = len(prunable.layers(model, fam))
    totals = torch.zeros(n - span + 1, dtype=torch.float64)
    tokens = 0
    ins, outs, handles = _layer_io(model, fam)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, data["input_ids"].shape[0], batch_size):
            ids = data["input_ids"][b:b + batch_size].to(model.device)
            mask = data["attention_mask"][b:b + batch_size].to(model.device).bool()
            model(input_ids=ids, attention_mask=mask.long(), **(forward_kwargs or {}))
            for start in range(n - span + 1):
                cos = nn.functional.cosine_similarity(ins[start][mask].double(), outs[start + span - 1][mask].double(), dim=-1)
                cos = cos.clamp(-1, 1)
                totals[start] += (torch.arccos(cos) / math.pi if angular else 1 - cos).sum().cpu()
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (totals / max(tokens, 1)).float()


def removal_count(layers: int, fraction: float) -> int:
    """Layers removed for a fraction (at least one layer always stays)."""
    return layers - prunable.keep_count(layers, fraction)


def choose(model: nn.Module, fam: prunable.Family, data: dict[str, torch.Tensor], remove: int, how: str = "influence",
           among: list[int] | None = None, forward_kwargs: dict | None = None, batch_size: int = 8) -> list[int]:
    """Indices (ascending) of the `remove` layers to drop, by `how` (IMPORTANCE). Without `among`,
    `angular` removes Gromov et al.'s contiguous block; with `among` (the candidate layers), both
    rank layers one by one (angular distance or 1 - cos between each layer's input and output)."""
    n = len(prunable.layers(model, fam))
    if remove <= 0:
        return []
    if not 0 < remove < n:
        raise ValueError(f"cannot remove {remove} of {n} layers: at least one must stay")
    if how == "angular" and among is None:
        d = span_distances(model, fam, data, remove, batch_size, forward_kwargs, angular=True)
        start = int(torch.argmin(d))
        return list(range(start, start + remove))
    if how not in IMPORTANCE:
        raise ValueError(f"layer importance must be one of {IMPORTANCE} (got {how!r})")
    distances = span_distances(model, fam, data, 1, batch_size, forward_kwargs, angular=how == "angular")
    return lowest(distances, remove, among)


def lowest(distances: torch.Tensor, remove: int, among: list[int] | None = None) -> list[int]:
    """Indices (ascending) of the `remove` layers of lowest per-layer distance among `among` (default
    all), ties to the lower index."""
    candidates = range(len(distances)) if among is None else among
    return sorted(sorted(candidates, key=lambda i: (float(distances[i]), i))[:remove])


def prune(model: nn.Module, fam: prunable.Family, data: dict[str, torch.Tensor], fraction: float, how: str,
          forward_kwargs: dict | None = None) -> list[int]:
    """One-shot depth pruning in place: `fraction` of the layers, chosen by `how` on `data`, removed;
    returns their original indices (config.kept_layers), empty when none go."""
    remove = removal_count(model.config.num_hidden_layers, fraction)
    if not remove:
        return []
    drop = choose(model, fam, data, remove, how, forward_kwargs=forward_kwargs)
    original = kept_layers(model.config)
    drop_layers(model, fam, drop)
    return [original[i] for i in drop]


def kept_layers(config: Any) -> list[int]:
    """Original index of every layer of this model (identity when it was never depth-pruned)."""
    saved = getattr(config, "kept_layers", None)
    return list(saved) if saved else list(range(config.num_hidden_layers))


@torch.no_grad()
def drop_layers(model: nn.Module, fam: prunable.Family, drop: list[int]) -> dict:
    """Remove the layers `drop` (indices into the current ModuleList) for real; returns the new shape."""
    holder, _, attr = fam.layers.rpartition(".")
    parent = prunable._get(model.base_model, holder) if holder else model.base_model
    current = list(getattr(parent, attr))
    keep = [i for i in range(len(current)) if i not in set(drop)]
    if not keep:
        raise ValueError("cannot remove every layer")
    cfg = model.config
    original = kept_layers(cfg)
    new = nn.ModuleList([current[i] for i in keep])
    for j, layer in enumerate(new):
        for module in layer.modules():  # the KV cache is indexed by layer_idx: keep it dense
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = j
    setattr(parent, attr, new)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    cfg.kept_layers = [original[i] for i in keep]
    return {"layers": len(keep), "kept_layers": cfg.kept_layers}


def layer_pairs(student_config: Any, teacher_config: Any) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` (0 = embeddings, i = output of layer i) for the
    hidden-state loss: each student layer with the teacher layer it was cut from, or, without that
    record, the uniform map of TinyBERT (student layer j with teacher layer ceil((j+1) L_t / L_s));
    the last entries are always paired (both are the model's final representation, normalised in Llama)."""
    s_layers, t_layers = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    s_orig = getattr(student_config, "kept_layers", None) or [None] * s_layers
    where = {orig: i for i, orig in enumerate(kept_layers(teacher_config))}
    pairs = []
    for j in range(s_layers - 1):
        t = where.get(s_orig[j])
        if t is None:
            t = min(t_layers - 1, math.ceil((j + 1) * t_layers / s_layers) - 1)
        pairs.append((j + 1, t + 1))
    pairs.append((s_layers, t_layers))
    return sorted(set(pairs))


def _identity(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def bypass(model: nn.Module, fam: prunable.Family, index: int) -> None:
    """Make layer `index` pass its input through (until `restore`): gradients stop reaching it, and
    the state dict keeps its weights, so a checkpoint and a resume see the same parameters."""
    layer = prunable.layers(model, fam)[index]
    layer.forward = _identity


def restore(model: nn.Module, fam: prunable.Family) -> None:
    """Undo every `bypass`."""
    for layer in prunable.layers(model, fam):
        layer.__dict__.pop("forward", None)


class Dropper:
    """Layers dropped one at a time while distilling (prune.homodistil): `drop_to(model, n)` bypasses the
    kept layer of lowest importance, measured on the student as it is then, until `n` are gone;
    `pairs()` is the hidden-state map of the layers still there; `finish(model)` slices them away."""

    def __init__(self, model: nn.Module, fam: prunable.Family, remove: int, how: str,
                 calibration: dict[str, torch.Tensor], forward_kwargs: dict | None = None):
        self.model, self.fam, self.remove, self.how = model, fam, remove, how
        self.calibration, self.forward_kwargs = calibration, forward_kwargs or {}
        self.keep = [True] * len(prunable.layers(model, fam))

    @property
    def dropped(self) -> list[int]:
        return [i for i, k in enumerate(self.keep) if not k]

    def drop_to(self, model: nn.Module, count: int) -> None:
        while len(self.dropped) < min(count, self.remove):
            kept = [i for i, k in enumerate(self.keep) if k]
            index = choose(model, self.fam, self.calibration, 1, self.how, among=kept,
                           forward_kwargs=self.forward_kwargs)[0]
            bypass(model, self.fam, index)
            self.keep[index] = False

    def pairs(self) -> list[tuple[int, int]] | None:
        if not self.dropped:
            return None
        n = len(self.keep)
        return [(i + 1, i + 1) for i in range(n - 1) if self.keep[i]] + [(n, n)]

    def finish(self, model: nn.Module) -> dict:
        restore(model, self.fam)
        return drop_layers(model, self.fam, self.dropped) if self.dropped else {}

    def describe(self) -> str:
        return f" layers {sum(self.keep)}/{len(self.keep)}" if self.remove else ""

    def state_dict(self) -> dict:
        return {"keep": list(self.keep)}

    def load_state_dict(self, state: dict) -> None:
        self.keep = list(state["keep"])
        for i in self.dropped:
            bypass(self.model, self.fam, i)

