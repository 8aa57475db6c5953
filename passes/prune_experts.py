"""prune.experts: remove whole routed experts from every MoE layer of a mixture-of-experts LLM.

MoE models are the ones that least fit on edge devices: all experts are stored although only top-k
run per token. This pass runs calibration text through the model once (hooks on the MoE blocks,
see passes/lib/moe.py), scores the experts of every layer and keeps the same number in each layer
(transformers' configs hold one expert count), then slices them out for real: the result reloads
with the library's own classes and exports with export.onnx. A global fraction with a per-layer
floor (different counts per layer) is deliberately not offered: no MoE config of transformers
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3) can describe per-layer expert counts, so such a
checkpoint would not reload with the library's own classes.

Scoring (`method`):
- `frequency`: share of calibration tokens routed to the expert.
- `tcess`: PreMoe's task-conditional expected selection score (arXiv 2505.17639): mean over tokens
  of the router logit of e, counted only where e is in the token's top-k.
- `reconstruction`: NAEE (Lu et al., "Not All Experts are Equal", arXiv 2402.14800): the kept
  subset C minimising sum_t ||F(x_t) - F_C(x_t)|| over sampled calibration tokens, F the routed
  output with all experts, F_C with only C (dropped logits at -inf before the routing). Exhaustive
  when at most 1000 subsets are possible (8 experts keep 4: 70), greedy otherwise (drop the expert
  whose removal hurts least, one at a time).
- `random`: the honest floor.
Super experts (Su et al., arXiv 2507.23279): experts whose max |down_proj output| is above the
99.5th percentile of all experts' maxima and above a tenth of the largest; a handful of them carry
the massive activations the model depends on, so by default they are never pruned or merged. If
they need more room than `keep` gives, every layer keeps more and the notes say so.
`merge` (MC-SMoE-lite, Li et al., arXiv 2310.01334): instead of dropping an expert, fold it into
its most similar kept expert (router-logit cosine): its intermediate neurons are permuted to match
the kept expert's (linear assignment on weight similarity), then the weights are averaged,
weighted by routing frequency. Shared experts (Qwen2-MoE, DeepSeek-V3) are never touched.

When to use: to shrink an MoE model's storage roughly in proportion to the experts removed; follow
with distill.kd to recover quality (papers and measured numbers in docs/methods.md)."""
from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.config import PassConfig
from compress.context import PassContext
from compress.errors import ConfigError, UserError
from compress.passes.lib import bare, moe
from compress.registry import PassSpec
from compress.state import ModelState

EXHAUSTIVE_LIMIT = 1000  # subsets evaluated one by one; above it the search is greedy


class PruneExperts(PassConfig):
    pass_name = "prune.experts"
    keep: int | float = Field(0.5, gt=0, le=4096, description=(
        "experts kept in every MoE layer: a fraction in (0, 1) of the layer's experts (0.5 of 8 keeps 4, rounded "
        "down) or a count >= 1"))
    method: Literal["frequency", "tcess", "reconstruction", "random"] = Field(
        "frequency", description="how experts are chosen: routing frequency, PreMoe TCESS, NAEE output reconstruction, random")
    protect_super_experts: bool = Field(True, description="never prune or merge super experts (extreme down_proj outliers)")
    merge: bool = Field(False, description="fold each dropped expert into its most similar kept one instead of dropping it")
    calibration_samples: int = Field(64, ge=1, le=4096, description="training samples run through the model for the statistics")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per calibration sample")
    reconstruction_tokens: int = Field(512, ge=16, le=65536, description=(
        "tokens per layer, sampled evenly from the calibration text, on which the reconstruction error is searched "
        "(method=reconstruction) and reported (every method)"))
    seed: int = Field(0, ge=0, description="random: seed")

    @field_validator("keep")
    @classmethod
    def _fraction_or_count(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v >= 1:
            if not v.is_integer():
                raise ValueError(f"keep must be a fraction in (0, 1) or a whole count >= 1 (got {v})")
            return int(v)
        return v


def kept_count(experts: int, keep: int | float) -> int:
    """Experts kept per layer: a count as given, a fraction rounded down (exact for decimal
    fractions: 10 experts at 0.3 keep 3, where int(10 * 0.3) would give 2)."""
    return keep if isinstance(keep, int) else math.floor(experts * keep + 1e-9)


def super_experts(stats: list[moe.LayerStats]) -> list[set[int]]:
    """Per layer, experts whose max |down_proj output| exceeds both the 99.5th percentile of all
    experts' maxima and a tenth of the largest (with 16 experts in all, only the largest passes
    the percentile; with 6144, about 31 do)."""
    maxima = torch.cat([s.max_abs for s in stats])
    if maxima.numel() == 0 or float(maxima.max()) <= 0:
        return [set() for _ in stats]
    threshold = max(float(torch.quantile(maxima, 0.995)), float(maxima.max()) / 10)
    return [set(torch.nonzero(s.max_abs > threshold).flatten().tolist()) for s in stats]


def room_for_protected(kept: int, protected: list[set[int]], experts: int, n_group: int) -> int:
    """Kept count per layer that leaves room for every protected expert (same count in every
    layer, the same in every group of a grouped router)."""
    per = experts // n_group
    need = max((sum(1 for e in p if e // per == g) for p in protected for g in range(n_group)), default=0)
    return max(kept, need * n_group)


def scores(method: str, stats: moe.LayerStats, gen: torch.Generator) -> torch.Tensor:
    if method == "frequency":
        return stats.freq + 1e-6 * stats.weight_sum  # ties: larger total gate weight first
    if method == "tcess":
        return stats.logit_sum / max(stats.tokens, 1)
    return torch.rand(stats.experts, generator=gen)


def choose(score: torch.Tensor, kept: int, protected: set[int], n_group: int) -> torch.Tensor:
    """The best `kept` experts by score, protected ones first, the same number from every group."""
    per, quota = len(score) // n_group, kept // n_group
    chosen: list[int] = []
    for g in range(n_group):
        ranked = sorted(range(g * per, (g + 1) * per), key=lambda e: (e not in protected, -float(score[e])))
        chosen += ranked[:quota]
    return torch.tensor(sorted(chosen))


class Layer:
    """One MoE layer at search time: sampled inputs x (N, H), every expert's output Y (E, N, H),
    router logits (N, E) and the routed output with all experts (N, H)."""

    def __init__(self, block, arch: moe.MoeArch, x: torch.Tensor, top_k: int, groups: tuple[int, int]):
        self.block, self.arch, self.x, self.groups = block, arch, x, groups
        with torch.no_grad():
            self.outputs = moe.all_outputs(block, arch, x)
            self.logits = moe.router_logits(block, arch, x)
            self.full = self.output(torch.ones(self.logits.shape[1], dtype=torch.bool), top_k)

    def output(self, keep: torch.Tensor, top_k: int, outputs: torch.Tensor | None = None) -> torch.Tensor:
        weights, idx = moe.route(self.block, self.arch, self.logits, keep, top_k, *self.groups)
        return moe.combine(self.outputs if outputs is None else outputs, weights, idx)

    def error(self, keep: torch.Tensor, top_k: int, outputs: torch.Tensor | None = None) -> float:
        """sum over tokens of ||F(x) - F_C(x)||."""
        return float((self.full - self.output(keep, top_k, outputs)).norm(dim=-1).sum())

    def relative_error(self, keep: torch.Tensor, top_k: int, outputs: torch.Tensor | None = None) -> float:
        return self.error(keep, top_k, outputs) / max(float(self.full.norm(dim=-1).sum()), 1e-12)


def _mask(indices, experts: int) -> torch.Tensor:
    mask = torch.zeros(experts, dtype=torch.bool)
    mask[list(indices)] = True
    return mask


def _subsets(experts: int, kept: int, protected: set[int], n_group: int):
    """(how many valid kept subsets there are, a function listing them): protected experts in,
    `kept // n_group` from every group. Counted first: 128 experts keeping 64 have ~2.4e37."""
    per, quota = experts // n_group, kept // n_group
    options = []
    for g in range(n_group):
        members = range(g * per, (g + 1) * per)
        fixed = tuple(e for e in members if e in protected)
        options.append((fixed, [e for e in members if e not in protected], quota - len(fixed)))

    def listing():
        per_group = [[fixed + c for c in itertools.combinations(free, n)] for fixed, free, n in options]
        return (sum(parts, ()) for parts in itertools.product(*per_group))

    return math.prod(math.comb(len(free), n) for _, free, n in options), listing


def reconstruct(layer: Layer, kept: int, protected: set[int], top_k: int, top_k_after: int) -> torch.Tensor:
    """NAEE: the kept subset with the smallest reconstruction error."""
    experts, n_group = layer.logits.shape[1], layer.groups[0]
    count, listing = _subsets(experts, kept, protected, n_group)
    if count <= EXHAUSTIVE_LIMIT:
        best = min(listing(), key=lambda s: layer.error(_mask(s, experts), top_k_after))
        return torch.tensor(sorted(best))
    keep, per, quota = torch.ones(experts, dtype=torch.bool), experts // n_group, kept // n_group
    while int(keep.sum()) > kept:  # greedy: drop the expert whose removal hurts least
        left = int(keep.sum()) - 1
        k = top_k_after if left == kept else min(top_k, left)
        candidates = [e for e in torch.nonzero(keep).flatten().tolist()
                      if e not in protected and int(keep[e // per * per:(e // per + 1) * per].sum()) > quota]
        errors = {e: layer.error(keep & ~_mask([e], experts), k) for e in candidates}
        keep[min(errors, key=errors.get)] = False
    return torch.nonzero(keep).flatten()


@torch.no_grad()
def _aligned(gate_up: torch.Tensor, down: torch.Tensor, e: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's weights with its intermediate neurons permuted to match expert `target`'s:
    neuron i described by (gate row i, up row i, down column i), (I, 3H); Hungarian matching on
    the dot products of those descriptions."""
    from scipy.optimize import linear_sum_assignment

    inter = down.shape[-1]

    def neurons(x: int) -> torch.Tensor:
        return torch.cat([gate_up[x, :inter], gate_up[x, inter:], down[x].T], dim=1).float()  # (I, 3H)

    _, perm = linear_sum_assignment((neurons(target) @ neurons(e).T).cpu().numpy(), maximize=True)
    perm = torch.as_tensor(perm, device=down.device)
    return torch.cat([gate_up[e, :inter][perm], gate_up[e, inter:][perm]]), down[e][:, perm]


@torch.no_grad()
def merge_dropped(block, arch: moe.MoeArch, stats: moe.LayerStats, kept: torch.Tensor,
                  protected: set[int]) -> list[list[int]]:
    """Fold every dropped expert into its most similar kept, unprotected expert (router-logit
    cosine); returns [dropped, into] pairs. The frequency-weighted average is written in place."""
    targets = [k for k in kept.tolist() if k not in protected]
    if not targets:
        return []
    diag = stats.gram.diagonal().clamp(min=1e-12).sqrt()
    cosine = stats.gram / (diag[:, None] * diag[None, :])  # (E, E)
    dropped = [e for e in range(stats.experts) if e not in set(kept.tolist())]
    pairs = [[d, targets[int(cosine[d, targets].argmax())]] for d in dropped]
    experts = moe._get(block, arch.experts)
    gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
    freq = stats.freq + 1e-6  # an expert no token chose still counts a little
    for target in {t for _, t in pairs}:
        sum_gu, sum_down, total = freq[target] * gate_up[target], freq[target] * down[target], freq[target]
        for d in (d for d, t in pairs if t == target):
            gu, dn = _aligned(gate_up, down, d, target)
            sum_gu, sum_down, total = sum_gu + freq[d] * gu, sum_down + freq[d] * dn, total + freq[d]
        gate_up[target], down[target] = sum_gu / total, sum_down / total
    return pairs


def _calibrate(model, arch: moe.MoeArch, tokenizer, data, cfg: PruneExperts) -> list[moe.LayerStats]:
    from compress.runtime import batches

    if data is None:
        raise UserError("prune.experts needs calibration text: give --data FILE or a built-in corpus")
    texts = bare.texts(data, cfg.pass_name)[: cfg.calibration_samples]
    n_batches = max(1, math.ceil(len(texts) / 8))
    feeds = batches(tokenizer, texts, cfg.max_length, batch_size=8)
    return moe.calibrate(model.eval(), arch, feeds, math.ceil(cfg.reconstruction_tokens / n_batches))


def _prune_layer(block, arch, stats, protected, cfg: PruneExperts, counts: dict, gen) -> dict:
    kept, top_k, top_k_after, groups = counts["kept"], counts["top_k"], counts["top_k_after"], counts["groups"]
    layer = Layer(block, arch, stats.stored(), top_k, groups)
    if cfg.method == "reconstruction":
        keep = reconstruct(layer, kept, protected, top_k, top_k_after)
    else:
        keep = choose(scores(cfg.method, stats, gen), kept, protected, groups[0])
    merged = merge_dropped(block, arch, stats, keep, protected) if cfg.merge else []
    with torch.no_grad():  # a measurement: no autograd graph (float() of a grad tensor warns)
        outputs = moe.all_outputs(block, arch, layer.x) if merged else None  # kept experts changed
    error = layer.relative_error(_mask(keep.tolist(), stats.experts), top_k_after, outputs)
    moe.slice_block(block, arch, keep, top_k_after)
    return {"kept": keep.tolist(), "dropped": sorted(set(range(stats.experts)) - set(keep.tolist())),
            "protected": sorted(protected), "merged": merged, "reconstruction_error": round(error, 6),
            "tokens_routed": stats.freq.long().tolist(), "max_abs_down_proj": [round(float(v), 4) for v in stats.max_abs]}


def apply(model: nn.Module, tokenizer: Any, data: Any, cfg: PruneExperts | None = None, *,
          notes: dict | None = None) -> nn.Module:
    """Expert pruning of a bare MoE model (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3): returns a new
    model in eval mode with cfg.keep experts in every MoE layer; `model` is left as it is.

    tokenizer: the model's. data: calibration text, a list of strings or a `compress.data.TextData`
    (its train part; the first cfg.calibration_samples are run). cfg: default `PruneExperts()`.
    notes: a dict to receive notes["experts"] (per-layer kept / dropped / protected experts and
    reconstruction errors), what the pipeline's report records. No progress output and no files:
    calibration is a few forward passes."""
    cfg = cfg or PruneExperts()
    model = copy.deepcopy(model)
    arch = moe.arch_of(model.config)
    experts, top_k = moe.experts_of(model.config, arch), int(getattr(model.config, arch.topk_key))
    kept, groups = kept_count(experts, cfg.keep), moe.groups_of(model.config, arch)
    problems = moe.count_problems(model.config, arch, kept)
    if problems:  # a module given directly is checked here, before any work
        raise ConfigError(problems, "prune.experts")
    if not moe.blocks(model, arch):
        raise UserError(f"the {arch.name} model has no layer with routed experts (num_experts 0 or mlp_only_layers?)")
    before = sum(p.numel() for p in model.parameters())
    stats = _calibrate(model, arch, tokenizer, data, cfg)
    protected = super_experts(stats) if cfg.protect_super_experts else [set() for _ in stats]
    needed = room_for_protected(kept, protected, experts, groups[0])
    counts = {"kept": needed, "top_k": top_k, "top_k_after": moe.top_k_after(model.config, arch, needed), "groups": groups}
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = {}
    for (i, block), layer_stats, prot in zip(moe.blocks(model, arch), stats, protected):
        layers[str(i)] = _prune_layer(block, arch, layer_stats, prot, cfg, counts, gen)
    moe.set_counts(model, arch, needed, counts["top_k_after"])
    notes = notes if notes is not None else {}
    notes["experts"] = {
        "architecture": arch.name, "method": cfg.method, "merge": cfg.merge,
        "before": {"experts": experts, "top_k": top_k, "params": before},
        "after": {"experts": needed, "top_k": counts["top_k_after"], "params": sum(p.numel() for p in model.parameters())},
        "protection": (f"super experts need {needed} experts per layer, more than keep={cfg.keep} gives ({kept}): "
                       f"every layer keeps {needed}") if needed > kept else None,
        "layers": layers}
    return model.eval()


def run(state: ModelState, cfg: PruneExperts, ctx: PassContext) -> ModelState:
    return state.with_torch(apply(state.model, state.tokenizer, state.data, cfg, notes=ctx.notes))


def _check(cfg: PruneExperts, info) -> list[str]:
    problems = moe.check_supported(info)
    if problems or info.path is None or info.form != "torch":
        return problems
    from compress.models import read_hf_config

    config = read_hf_config(info.path, info.trust_remote_code)
    arch = moe.arch_of(config)
    return moe.count_problems(config, arch, kept_count(moe.experts_of(config, arch), cfg.keep))


PASS = PassSpec(name="prune.experts", config=PruneExperts, run=run, takes=("torch",), gives="torch",
                needs_data=lambda cfg: True, check=_check,
                summary="Remove whole experts from every MoE layer (frequency, PreMoe TCESS, NAEE reconstruction or random), "
                        "super experts protected, optional MC-SMoE merging.")
