"""Channel pruning of CNNs and other torch nets through Torch-Pruning's dependency graph
(prune.structured's path for models without a transformers config).

Paper: Fang et al., "DepGraph: Towards Any Structural Pruning" (CVPR 2023, arXiv 2301.12900),
the `torch-pruning` package. Tracing the model once on a real image groups every set of layers
whose channels must go together (a conv's output channels, its BatchNorm, the depthwise conv that
follows, the next conv's input channels, both sides of a residual add); each group loses the same
fraction of its channels, the weights are physically sliced, so the model really is smaller. The
final classifier keeps its outputs. Importance of a channel group:
- `magnitude`: L2 norm of the group's weights (Li et al., arXiv 1608.08710),
- `taylor`: |w * dL/dw| summed over the group (Molchanov et al., arXiv 1611.06440), L the
  cross-entropy of the model against its own top-1 predictions on `taylor_batches` x 8 training
  images (no labels needed; the KL to the teacher would have a zero gradient before pruning),
- `random`: the floor.
Kept channel counts are rounded UP to multiples of `round_to` (default 8: onnxruntime's CPU
convolutions run channel blocks of 8, so odd widths can make a pruned net SLOWER: EfficientNet-Lite0
with 10% of the channels removed and no rounding ran at 0.78x the unpruned speed); rounding up never
removes more than asked. When to use: a quick way to make a CNN narrower; it needs recovery training (distill.kd)
on anything but small ratios: depthwise-separable nets such as EfficientNet-Lite have little
redundancy (numbers in README "Pruning a CNN")."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

BATCH = 8


def _classifier_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The layers whose outputs are the logits (they keep every output)."""
    with torch.no_grad():
        classes = model(example).shape[-1]
    out = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    if not out:  # a fully convolutional head
        out = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == classes]
    return out


def _taylor_gradients(model: nn.Module, images: torch.Tensor) -> None:
    """Gradients of the cross-entropy against the model's own top-1 on `images` (batches of 8)."""
    model.zero_grad(set_to_none=True)
    for xb in images.split(BATCH):
        with torch.no_grad():
            labels = model(xb).argmax(-1)
        nn.functional.cross_entropy(model(xb), labels).backward()


def _pruner_class() -> type:
    """Torch-Pruning's MetaPruner rounding kept channel counts UP to multiples of `round_to` (its own
    rounds down: a 16-channel layer pruned by 10% keeps 8). Never removes more than asked."""
    import torch_pruning as tp

    class RoundUp(tp.pruner.MetaPruner):
        def _round_to(self, n_pruned, current_channels, round_to):
            kept = min(current_channels, -(-(current_channels - n_pruned) // round_to) * round_to)
            return max(current_channels - kept, 0)

    return RoundUp


def prune(model: nn.Module, images: np.ndarray, fraction: float, importance: str, round_to: int, taylor_batches: int,
          seed: int) -> tuple[nn.Module, dict]:
    """A pruned copy of `model` and what changed (params, channel groups, widths); `images`: training
    images (N, channels, H, W), the first traces the model, taylor's gradients use the first batches."""
    import copy

    import torch_pruning as tp

    model = copy.deepcopy(model).eval()  # BatchNorm uses its running statistics throughout
    train = torch.from_numpy(images)
    example = train[:1]
    imp = {"magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
           "taylor": tp.importance.GroupTaylorImportance, "random": tp.importance.RandomImportance}[importance]()
    before = sum(p.numel() for p in model.parameters())
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    pruner = _pruner_class()(model, example, importance=imp, pruning_ratio=fraction,
                             ignored_layers=_classifier_layers(model, example), round_to=round_to if round_to > 1 else None)
    if importance == "taylor":
        _taylor_gradients(model, train[: taylor_batches * BATCH])
    torch.manual_seed(seed)  # RandomImportance draws from torch's generator
    pruner.step()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    narrowed = {n: (widths[n], m.out_channels) for n, m in model.named_modules()
                if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels != widths[n]}
    return model.eval(), {"backend": "torch-pruning", "importance": importance, "channels": fraction,
                          "before": {"params": before}, "after": {"params": sum(p.numel() for p in model.parameters())},
                          "convs_narrowed": len(narrowed), "convs": len(widths),
                          "widths": {n: f"{a}->{b}" for n, (a, b) in list(narrowed.items())[:50]}}


def check(cfg: Any, info: Any) -> list[str]:
    problems = []
    if cfg.channels == 0:
        problems.append("a CNN is pruned by channels: set channels (e.g. prune.structured:channels=0.25)")
    set_fields = cfg.model_fields_set & {"heads", "ffn", "params", "layers", "hidden"}
    if set_fields:
        problems.append(f"{', '.join(sorted(set_fields))}: for transformers; a CNN is pruned by channels")
    if cfg.importance == "activation":
        problems.append("importance=activation is for transformers; for a CNN use magnitude, taylor or random")
    return problems
