"""Layer-by-layer calibrated transforms of a transformers model's Linear layers (quant.weight_only's own
rounding methods, prune.sparse's wanda and sparsegpt): the inputs of each decoder / encoder layer's Linears
are measured with every earlier layer already transformed (GPTQ's sequential order), so a layer's rounding
or pruning answers the errors before it.

The lm_head, when asked for, goes first: with a tied embedding it is also the input table, and the
layers after it must see the rounded embedding. Each layer costs one forward of the calibration
windows up to that layer (stopped there)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from compress.passes.lib import prunable
from compress.passes.lib.gptq import Grid, Hessians, Rounded, gptq, output_error, rtn


METHODS = {"mse": "rtn", "gptq-mse": "gptq"}  # quant.weight_only's own methods -> quantize()'s rounding


def calibration_windows(tokenizer, texts: list[str], samples: int, length: int) -> torch.Tensor:
    """(n, length) token ids: the texts' tokens concatenated (separated by EOS when the tokenizer
    has one) and cut into full windows, at most `samples`."""
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        if len(ids) >= samples * length:
            break
    n = min(samples, len(ids) // length)
    if n == 0:
        raise ValueError(f"the training text has {len(ids)} tokens, fewer than one calibration window of "
                         f"max_length={length}: lower max_length or give more text (--data)")
    return torch.tensor(ids[: n * length]).view(n, length)


class _Stop(Exception):
    """Raised by a forward hook once the layer being calibrated has run."""


def _stages(model: nn.Module, lm_head: bool) -> list[tuple[str, dict[str, nn.Linear], nn.Module | None]]:
    """(label, {module name: Linear}, the module after which the forward can stop) in forward order."""
    names = {id(m): n for n, m in model.named_modules()}
    stages = []
    head = model.get_output_embeddings() if lm_head and hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        stages.append(("lm_head", {names[id(head)]: head}, None))
    fam = prunable.family_of(model.config)
    for i, layer in enumerate(prunable.layers(model, fam)):
        lins = {names[id(lin)]: lin for lin in prunable.linears(layer, fam).values()}
        stages.append((f"layer {i}", lins, layer))
    return stages


def stage_count(model: nn.Module, lm_head: bool) -> int:
    """How many calibration forwards `quantize` makes (one per layer, one for the lm_head)."""
    return len(_stages(model, lm_head))


def _calibrate(model: nn.Module, windows: torch.Tensor, stop_at: nn.Module | None, forward_kwargs: dict,
               batch: int) -> None:
    def stop(*_):
        raise _Stop

    handle = stop_at.register_forward_hook(stop) if stop_at is not None else None
    try:
        for i in range(0, len(windows), batch):
            try:
                model(input_ids=windows[i:i + batch], **forward_kwargs)
            except _Stop:
                pass
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def each_layer(model: nn.Module, windows: torch.Tensor, transform: Callable[[str, nn.Linear, torch.Tensor], None], *,
               lm_head: bool = False, forward_kwargs: dict | None = None, batch: int = 8,
               progress: Callable[[int, str], None] | None = None) -> None:
    """Layer by layer in forward order (the lm_head first when asked): measure the input Hessian of every
    Linear of the layer on `windows` with every earlier layer already transformed, then call
    `transform(module name, linear, hessian)`, which sets the Linear's weight in place."""
    model.eval()
    kwargs = forward_kwargs or {}
    for done, (label, linears, stop_at) in enumerate(_stages(model, lm_head)):
        if progress:
            progress(done, label)
        with Hessians(linears) as hess:
            _calibrate(model, windows, stop_at, kwargs, batch)
        for name, h in hess.result().items():
            transform(name, linears[name], h)


def quantize(model: nn.Module, windows: torch.Tensor, grid: Grid, method: str, *, lm_head: bool = False,
             forward_kwargs: dict | None = None, percdamp: float = 0.01, batch: int = 8,
             progress: Callable[[int, str], None] | None = None) -> dict[str, tuple[Rounded, float]]:
    """Round every Linear of `model`'s layers (and its lm_head when asked) in place onto `grid`, layer by
    layer: method "gptq" (error feedback) or "rtn" (each group fitted on its own, weighted by the input
    Hessian's diagonal). The weights are set in place (a tied embedding follows its lm_head). Returns
    {module name: (rounded, relative output error on the calibration inputs)}."""
    out: dict[str, tuple[Rounded, float]] = {}

    def transform(name: str, lin: nn.Linear, h: torch.Tensor) -> None:
        w = lin.weight.data.float()
        rounded = gptq(w, h, grid, percdamp) if method == "gptq" else rtn(w, grid, torch.diag(h))
        out[name] = (rounded, output_error(w, rounded.weight, h))
        lin.weight.data.copy_(rounded.weight.to(lin.weight.dtype))

    each_layer(model, windows, transform, lm_head=lm_head, forward_kwargs=forward_kwargs, batch=batch,
               progress=progress)
    return out
