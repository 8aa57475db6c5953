"""prune.structured: one-shot structured pruning, the baseline HomoDistil has to beat.

Removes the same fraction of attention units (kv groups) and FFN neurons in every layer of a
BERT- or Llama-family model in one step, ranked by
- `magnitude`: L2 norm of each unit's weights (rows of q/k/v/up/gate, columns of o/down),
- `taylor`: first-order Taylor importance |theta * dL/dtheta| summed per unit, with L the language-
  modelling loss on a few training batches (Molchanov et al., arXiv 1611.06440); causal LMs only,
- `random`: the honest floor,
- `activation`: weights times calibration activations, structured Wanda / FLAP (Sun et al., "A Simple
  and Effective Pruning Approach for LLMs", arXiv 2306.11695; An et al., "Fluctuation-based Adaptive
  Structured Pruning for LLMs", arXiv 2312.11983): FFN neuron j scores ||W_down[:, j]||_2 *
  sqrt(mean h_j^2), h the down/output.dense input over the real tokens of `calibration_batches`
  batches of the training text; an attention unit sums the same over the o / attention.output.dense
  input columns of its query heads. Works for every kind (a forward pass, no loss).
Then slices the model like prune.homodistil (same regular architecture, reloads with the library's
classes). CNNs and other nets without a transformers config (kind image-classifier) are pruned by
`channels` through Torch-Pruning's dependency graph instead (passes/lib/channels.py; magnitude,
taylor or random). No training: follow with distill.kd to recover. When to use: as a quick baseline, or
when there is no budget for iterative pruning; for decoder LLMs use `activation`.

Why weight norms fail on LLMs: on SmolLM2-135M the rank correlation between a neuron's weight norm and
its activation score is negative in layer 0 and layers 16-29 (down to -0.39), so magnitude removes
30-57% of the activation energy of those layers; protecting the 1 or 3 neurons with the largest
activation per layer (the 'super' / massive-activation neurons, which magnitude mostly keeps anyway)
leaves magnitude at ppl 2.2M / 747k: the whole ranking is wrong, not a few neurons.
Measured (SmolLM2-135M fp32, heads 0, held-out perplexity on the first 20 lee_background paragraphs,
256 tokens, evaluate.perplexity; calibration: 4 x 8 wiki training samples, taylor 8 x 8; dense 34.35):

    importance   ffn 0.25    ffn 0.5
    activation      66.2       239
    taylor          75.6       422
    random         876      1.26e6
    magnitude     2.19e6     2.42e5

Each row: `run(ModelState(kind="causal-lm", form="torch", model=..., tokenizer=..., data=data.load("wiki")),
PruneStructured(ffn=..., heads=0, importance=...), ctx)` on `models.load_hf(models.alias_path("smollm2"))`,
then `evaluate.perplexity(TorchRunner(pruned, "causal-lm"), tok, data.lee_background()[:20])`; the CLI
equivalent is `compress run smollm2 --pass prune.structured:ffn=0.25,heads=0,importance=activation -o out`
(its report's ppl_lee uses 100 paragraphs). MiniLM, heads 0.5 + ffn 0.5, held-out wiki cosine
(`Pipeline([{"pass": "prune.structured", "heads": 0.5, "ffn": 0.5, "importance": ...}]).run("minilm", "wiki")`):
activation 0.588, magnitude 0.501, random 0.473."""
from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.config import PassConfig
from compress.context import PassContext
from compress.passes.lib import activations, bare, budget, channels, depth, hidden, prunable
from compress.passes.lib.trainer import tokenized
from compress.registry import ALL_KINDS, PassSpec
from compress.state import ModelState


class PruneStructured(PassConfig):
    pass_name = "prune.structured"
    heads: float = Field(0.5, ge=0, lt=1, description="fraction of attention units (kv groups) to remove in every layer")
    ffn: float = Field(0.5, ge=0, lt=1, description="fraction of FFN neurons to remove in every layer")
    layers: float = Field(0.0, ge=0, lt=1, description=(
        "fraction of transformer layers to remove (before heads / FFN), chosen by layer_importance on "
        "calibration_batches x 8 training samples"))
    layer_importance: Literal["influence", "angular"] = Field("influence", description=(
        "influence: drop the layers of lowest block influence, 1 - cos between a layer's input and output (ShortGPT); "
        "angular: drop the contiguous block whose input and output are closest (Gromov et al.)"))
    hidden: float = Field(0.0, ge=0, lt=1, description=(
        "fraction of hidden (embedding) channels to remove from the whole residual stream, ranked by the norms' "
        "activations on calibration text (Minitron); causal LMs and classifiers (an encoder's embedding width "
        "would change)"))
    params: float | None = Field(**prunable.PARAMS_FIELD)
    latency: float | None = Field(**budget.LATENCY_FIELD)
    importance: Literal["magnitude", "taylor", "random", "activation"] = Field(
        "magnitude", description="how units are ranked (activation: weights x calibration activations, best for LLMs)")
    taylor_batches: int = Field(8, ge=1, le=1000, description="taylor: training batches of 8 samples for the gradients")
    calibration_batches: int = Field(4, ge=1, le=1000,
                                     description="activation: batches of 8 training samples run to measure activations")
    max_length: int = Field(128, ge=8, le=8192, description="taylor / activation: tokens per sample")
    seed: int = Field(0, ge=0, description="random: seed")
    channels: float = Field(0.0, ge=0, lt=1, description=(
        "CNNs and other nets without a transformers config (Torch-Pruning): fraction of channels removed from every "
        "prunable layer group"))
    round_to: int = Field(8, ge=1, le=128, description=(
        "CNNs: kept channel counts are rounded UP to multiples of this (onnxruntime's CPU convolutions work in "
        "blocks of 8 channels; odd widths can be slower than the unpruned net); 1 = no rounding"))


def _taylor_scores(model, tokenizer, texts: list[str], cfg: PruneStructured) -> dict[int, torch.Tensor]:
    data = tokenized(tokenizer, texts[: cfg.taylor_batches * 8], cfg.max_length)
    model.zero_grad(set_to_none=True)
    for i in range(0, data["input_ids"].shape[0], 8):
        ids, mask = data["input_ids"][i:i + 8].to(model.device), data["attention_mask"][i:i + 8].to(model.device)
        labels = ids.masked_fill(mask == 0, -100)
        model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    scores = {id(p): (p * p.grad).abs().detach() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return scores


def _scores(model, tokenizer, data, kind: str, cfg: PruneStructured) -> dict[int, torch.Tensor]:
    if cfg.importance == "taylor":
        return _taylor_scores(model, tokenizer, bare.texts(data, cfg.pass_name), cfg)
    if cfg.importance == "activation":
        model.eval()  # no dropout while measuring
        return activations.unit_element_scores(model, _calibration(tokenizer, data, cfg), kind.forward_kwargs())
    if cfg.importance == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        return {id(p): torch.rand(p.shape, generator=g) for p in model.parameters()}
    return {id(p): p.detach() ** 2 for p in model.parameters()}  # unit score = squared L2 norm


def _calibration(tokenizer, data, cfg: PruneStructured) -> dict[str, torch.Tensor]:
    return tokenized(tokenizer, bare.texts(data, cfg.pass_name)[: cfg.calibration_batches * 8], cfg.max_length)


def _drop_layers(model, tokenizer, data, kind, cfg: PruneStructured, fam: prunable.Family) -> list[int]:
    """Depth pruning in place (cfg.layers); the removed layers' original indices."""
    if not depth.removal_count(model.config.num_hidden_layers, cfg.layers):
        return []
    model.eval()
    return depth.prune(model, fam, _calibration(tokenizer, data, cfg), cfg.layers, cfg.layer_importance,
                       kind.forward_kwargs())


def _narrow(model, tokenizer, data, kind, cfg: PruneStructured, fam: prunable.Family) -> dict:
    """Hidden-size pruning in place (cfg.hidden), Minitron's activation importance; what changed."""
    if not cfg.hidden:
        return {}
    before = model.config.hidden_size
    scores = hidden.hidden_scores(model, fam, _calibration(tokenizer, data, cfg), forward_kwargs=kind.forward_kwargs())
    hidden.slice_hidden(model, fam, hidden.keep_channels(scores, cfg.hidden))
    return {"hidden": {"before": before, "after": model.config.hidden_size}}


def apply(model: nn.Module, tokenizer: Any = None, data: Any = None, cfg: PruneStructured | None = None, *,
          notes: dict | None = None, progress: bool = True, kind: str | None = None,
          ctx: PassContext | None = None) -> nn.Module:
    """One-shot structured pruning of a bare model: returns a new, pruned model in eval mode; `model`
    is left as it is.

    A transformers model (BERT or Llama family) loses heads / FFN neurons (cfg.heads, cfg.ffn or
    cfg.params); tokenizer and data (a list of training strings or a `compress.data.TextData`, its
    train part) are needed for importance=taylor / activation only. Any other nn.Module (a CNN)
    loses channels (cfg.channels); data: its training images, a (N, channels, H, W) float32 array
    or tensor preprocessed for it, or a `compress.images.ImageData` (one image is enough to trace
    it; taylor uses taylor_batches x 8); tokenizer: None. cfg: default `PruneStructured()`.
    notes: a dict to receive notes["pruning"] (what the pipeline's report records). progress: False
    for no status line. kind: default read from the model (no transformers config: a CNN). ctx: the
    pipeline's context, given by run(); leave it None."""
    cfg = cfg or PruneStructured()
    kind = bare.prepare(cfg, model, data, ctx, kind)
    notes = notes if notes is not None else {}
    if not kind.is_transformers:  # a CNN: channels through Torch-Pruning's dependency graph
        with bare.context(ctx, None, progress) as c, \
                c.console.status(f"pruning {cfg.channels:.0%} of the channels ({cfg.importance}, Torch-Pruning)"):
            model, notes["pruning"] = channels.prune(model, bare.images(data, cfg.pass_name), cfg.channels,
                                                     cfg.importance, cfg.round_to, cfg.taylor_batches, cfg.seed)
        return model
    model = copy.deepcopy(model)
    fam, geo = prunable.family_of(model.config), prunable.Geometry.of(model.config)
    before = sum(p.numel() for p in model.parameters())
    with bare.context(ctx, None, progress) as c:
        cfg, chosen = budget.solve(cfg, model, fam, kind, tokenizer, bare.texts(data, cfg.pass_name) if cfg.latency else [],
                                   c.console)
    removed = _drop_layers(model, tokenizer, data, kind, cfg, fam)
    narrowed = _narrow(model, tokenizer, data, kind, cfg, fam)
    geo = prunable.Geometry.of(model.config)
    cfg = prunable.targets(cfg, model, fam, geo)
    heads, ffn = prunable.unit_scores(model, fam, geo, _scores(model, tokenizer, data, kind, cfg))
    keep_heads, keep_ffn = prunable.keep_count(geo.kv_heads, cfg.heads), prunable.keep_count(geo.ffn, cfg.ffn)
    shape = prunable.slice_model(model, fam, geo, prunable.top_masks(heads, ffn, keep_heads, keep_ffn))
    notes["pruning"] = {"before": {"layers": geo.layers + len(removed), "heads": geo.heads, "kv_heads": geo.kv_heads,
                                   "ffn": geo.ffn, "params": before},
                        "after": {"layers": geo.layers, **shape, "params": sum(p.numel() for p in model.parameters())},
                        "importance": cfg.importance, "fractions": {"layers": cfg.layers, "heads": cfg.heads, "ffn": cfg.ffn},
                        **({"layers_removed": removed, "layer_importance": cfg.layer_importance} if removed else {}),
                        **narrowed, **({"budget": chosen} if chosen else {})}
    return model.eval()


def run(state: ModelState, cfg: PruneStructured, ctx: PassContext) -> ModelState:
    return state.with_torch(apply(state.model, state.tokenizer, state.data, cfg, notes=ctx.notes, kind=state.kind,
                                  ctx=ctx))


def _check(cfg: PruneStructured, info) -> list[str]:
    if not info.kind.is_transformers:  # a CNN
        return channels.check(cfg, info)
    problems = prunable.check_supported(info)
    if cfg.channels > 0:
        problems.append("channels applies to CNNs (Torch-Pruning); prune a transformer with heads and ffn")
    if cfg.importance == "taylor" and not info.kind.is_generative:
        problems.append(f"importance=taylor needs a causal LM's loss (the input is a {info.kind}); use magnitude")
    if cfg.heads == 0 and cfg.ffn == 0 and cfg.layers == 0 and cfg.hidden == 0 and cfg.params is None \
            and cfg.latency is None:
        problems.append("nothing to prune: set layers, heads, ffn and/or hidden above 0, or a params budget")
    if cfg.hidden > 0:
        problems.extend(hidden.check_kind(info.kind))
    problems.extend(prunable.budget_problems(cfg) + budget.problems(cfg))
    return problems


PASS = PassSpec(name="prune.structured", config=PruneStructured, run=run, takes=("torch",), gives="torch",
                needs_data=lambda cfg: cfg.importance in ("taylor", "activation") or cfg.layers > 0 or cfg.hidden > 0
                or cfg.latency is not None, check=_check, kinds=ALL_KINDS,
                summary="One-shot structured pruning of heads and FFN neurons (magnitude, Taylor, activation or random); CNNs by channels (Torch-Pruning).")
