"""Per-architecture description of transformers' mixture-of-experts blocks, the calibration that
records what the routers do, and the surgery that removes experts for real.

transformers 5 stores the routed experts of a layer as two stacked tensors on one `experts` module:
`gate_up_proj` (experts, 2 * moe_intermediate, hidden), gate rows first then up rows, and
`down_proj` (experts, hidden, moe_intermediate); the router is a module with `weight`
(experts, hidden). Removing expert e is slicing index e out of axis 0 of all three (and of
DeepSeek-V3's `e_score_correction_bias`), then setting the expert count (and top-k when it would
exceed what is left) on the modules and in the config, so `save_pretrained` / `from_pretrained`
with the library's own classes rebuild the pruned model. Shared experts are other modules of the
block and are never touched.

Routing, as the library computes it (checked against the library's routers by tests/test_moe.py):
- softmax (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): softmax over all experts' logits, top-k, then the
  k weights renormalised (always for Mixtral, with `norm_topk_prob` for the others). After pruning
  the softmax runs over the kept experts only: the same as setting dropped logits to -inf.
- sigmoid_grouped (DeepSeek-V3): scores = sigmoid(logits); the choice adds `e_score_correction_bias`;
  experts form `n_group` contiguous groups, a group's score is the sum of its 2 best choices, the
  `topk_group` best groups are eligible, top-k among them; weights are the plain sigmoid scores,
  renormalised (`norm_topk_prob`) and times `routed_scaling_factor`. The pruned model keeps
  `n_group`: every group keeps the same number of experts (so a kept expert stays in its group and
  the group order is unchanged), at least 2 (the group score takes the top 2). Collapsing to one
  group instead would change which experts a token may reach, so the kept count must be a multiple
  of n_group (checked before any work)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import UserError


@dataclass(frozen=True)
class MoeArch:
    name: str
    model_types: tuple[str, ...]
    count_key: str  # config key of the number of routed experts per layer
    block: str = "mlp"  # the MoE block under each decoder layer (dense layers have no `experts`)
    router: str = "gate"  # module under the block with `weight` (experts, hidden)
    experts: str = "experts"  # module under the block with stacked `gate_up_proj` / `down_proj`
    stacked: tuple[str, ...] = ("gate_up_proj", "down_proj")  # expert axis 0
    router_bias: str | None = None  # buffer (experts,) added to the scores for the choice only
    shared: tuple[str, ...] = ()  # modules of shared experts: never pruned
    routing: Literal["softmax", "sigmoid_grouped"] = "softmax"
    always_normalise: bool = False  # top-k weights renormalised whatever `norm_topk_prob` says
    topk_key: str = "num_experts_per_tok"
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) of grouped routing


ARCHS = (
    MoeArch("mixtral", ("mixtral",), "num_local_experts", always_normalise=True),
    MoeArch("qwen2_moe", ("qwen2_moe",), "num_experts", shared=("shared_expert", "shared_expert_gate")),
    MoeArch("qwen3_moe", ("qwen3_moe",), "num_experts"),
    MoeArch("olmoe", ("olmoe",), "num_experts"),
    MoeArch("deepseek_v3", ("deepseek_v3",), "n_routed_experts", router_bias="e_score_correction_bias",
            shared=("shared_experts",), routing="sigmoid_grouped", group_keys=("n_group", "topk_group")),
)


def arch_of(config: Any) -> MoeArch:
    from compress.passes.lib.prunable import by_model_type

    return by_model_type(config, ARCHS, "expert pruning does not support model_type '{model_type}': supported are "
                                        "{supported} (dense models have no experts to prune: use prune.structured)")


def check_supported(info: Any) -> list[str]:
    """A torch model folder must hold a supported MoE architecture."""
    from compress.passes.lib.prunable import supported_problems

    return supported_problems(info, arch_of)


def experts_of(config: Any, arch: MoeArch) -> int:
    return int(getattr(config, arch.count_key))


def groups_of(config: Any, arch: MoeArch) -> tuple[int, int]:
    """(n_group, topk_group); (1, 1) for routers without groups."""
    if arch.group_keys is None:
        return 1, 1
    return tuple(int(getattr(config, k) or 1) for k in arch.group_keys)  # type: ignore[return-value]


def top_k_after(config: Any, arch: MoeArch, kept: int) -> int:
    """Top-k of the pruned model: never more than a token can reach (kept experts, or for grouped
    routing the experts of the topk_group eligible groups: 8 kept in 2 groups, 1 eligible -> 4)."""
    n_group, topk_group = groups_of(config, arch)
    return min(int(getattr(config, arch.topk_key)), topk_group * (kept // n_group))


def count_problems(config: Any, arch: MoeArch, kept: int) -> list[str]:
    """Whether `kept` experts per layer make a valid model of this architecture."""
    n = experts_of(config, arch)
    if kept < 1:
        return [f"the target keeps 0 of the {n} experts per layer: keep at least 1 (a count, or a larger fraction)"]
    if kept > n:
        return [f"keep={kept} experts but the model has {n} per layer: give a count from 1 to {n - 1} "
                "or a fraction in (0, 1)"]
    if kept == n:
        return [f"the target keeps all {n} experts per layer: nothing to prune (lower keep)"]
    n_group, _ = groups_of(config, arch)
    if arch.routing == "sigmoid_grouped" and (kept % n_group or kept // n_group < 2):
        valid = [m for m in range(2 * n_group, n, n_group)]
        return [f"{arch.name} routes in n_group={n_group} groups: the kept count must be a multiple of n_group "
                f"with at least 2 experts per group (got {kept}); valid counts: {valid or 'none below ' + str(n)}"]
    return []


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def blocks(model: nn.Module, arch: MoeArch) -> list[tuple[int, nn.Module]]:
    """(layer index, MoE block) of every layer that has routed experts (DeepSeek-V3's first
    `first_k_dense_replace` layers and Qwen-MoE's `mlp_only_layers` are dense and skipped)."""
    found = []
    for i, layer in enumerate(model.base_model.layers):
        block = getattr(layer, arch.block, None)
        if block is not None and hasattr(block, arch.experts) and hasattr(block, arch.router):
            experts = _get(block, arch.experts)
            if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
                raise UserError(f"layer {i}: experts stored transposed or interleaved are not supported")
            found.append((i, block))
    return found


def expert_output(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """down_proj(act(gate) * up) of expert e on tokens x (tokens, hidden) -> (tokens, hidden)."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def all_outputs(block: nn.Module, arch: MoeArch, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: (experts, tokens, hidden)."""
    experts = _get(block, arch.experts)
    x = x.to(experts.down_proj.device, experts.down_proj.dtype)
    return torch.stack([expert_output(experts, e, x) for e in range(experts.gate_up_proj.shape[0])]).float()


def router_logits(block: nn.Module, arch: MoeArch, x: torch.Tensor) -> torch.Tensor:
    weight = _get(block, arch.router).weight
    return F.linear(x.to(weight.device).float(), weight.float())  # (tokens, experts)


def route(block: nn.Module, arch: MoeArch, logits: torch.Tensor, keep: torch.Tensor, top_k: int,
          n_group: int = 1, topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's routing with the experts where `keep` is False removed: (weights, indices),
    each (tokens, top_k), indices into the full expert list."""
    gate, keep = _get(block, arch.router), keep.to(logits.device)
    if arch.routing == "softmax":
        probs = torch.softmax(logits.float().masked_fill(~keep, -math.inf), dim=-1)
        weights, idx = torch.topk(probs, top_k, dim=-1)
        if arch.always_normalise or getattr(gate, "norm_topk_prob", False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, idx
    scores = logits.float().sigmoid()
    choice = (scores + getattr(gate, arch.router_bias).float()).masked_fill(~keep, -math.inf)
    per = choice.shape[-1] // n_group  # groups are contiguous runs of the full expert list
    group_scores = choice.view(-1, n_group, per).topk(2, dim=-1)[0].sum(dim=-1)
    eligible = torch.zeros_like(group_scores).scatter_(1, torch.topk(group_scores, topk_group, dim=-1)[1], 1)
    choice = choice.masked_fill(~eligible.bool().repeat_interleave(per, dim=1), -math.inf)
    idx = torch.topk(choice, top_k, dim=-1)[1]
    weights = scores.gather(1, idx) * torch.isfinite(choice.gather(1, idx))  # never a removed expert
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * gate.routed_scaling_factor, idx


def combine(outputs: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Routed output (tokens, hidden) from every expert's output (experts, tokens, hidden)."""
    tokens = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)  # (tokens, 1)
    return (weights.unsqueeze(-1) * outputs.transpose(0, 1)[tokens, idx]).sum(dim=1)


@dataclass
class LayerStats:
    """What calibration records for one MoE layer (E experts, H hidden)."""

    experts: int
    tokens: int = 0
    freq: torch.Tensor = field(init=False)  # (E,) tokens routed to each expert
    logit_sum: torch.Tensor = field(init=False)  # (E,) router logit summed over the tokens that chose the expert
    weight_sum: torch.Tensor = field(init=False)  # (E,) gate weight summed over the tokens that chose the expert
    norm_sum: torch.Tensor = field(init=False)  # (E,) ||expert output|| summed over its tokens
    max_abs: torch.Tensor = field(init=False)  # (E,) max |down_proj output| over its tokens (super experts)
    gram: torch.Tensor = field(init=False)  # (E, E) logits^T logits: router-logit similarity of experts
    inputs: list = field(default_factory=list)  # sampled block inputs (tokens, H) for reconstruction

    def __post_init__(self) -> None:
        e = self.experts
        self.freq, self.logit_sum, self.weight_sum = torch.zeros(e), torch.zeros(e), torch.zeros(e)
        self.norm_sum, self.max_abs, self.gram = torch.zeros(e), torch.zeros(e), torch.zeros(e, e)

    def stored(self) -> torch.Tensor:
        return torch.cat(self.inputs) if self.inputs else torch.zeros(0)

    @torch.no_grad()
    def add(self, block: nn.Module, arch: MoeArch, x: torch.Tensor, sample: int) -> None:
        """x: the block input at real (unpadded) tokens, (tokens, hidden)."""
        logits, weights, idx = _get(block, arch.router)(x)  # the library's own routing
        logits, weights, idx = logits.float().cpu(), weights.float().cpu(), idx.cpu()
        chosen = torch.zeros_like(logits).scatter_(1, idx, 1.0)  # (tokens, E) 1 where routed
        self.tokens += x.shape[0]
        self.freq += chosen.sum(0)
        self.logit_sum += (logits * chosen).sum(0)
        self.weight_sum += torch.zeros_like(logits).scatter_(1, idx, weights).sum(0)
        self.gram += logits.T @ logits
        experts = _get(block, arch.experts)
        for e in torch.nonzero(chosen.sum(0) > 0).flatten().tolist():
            y = expert_output(experts, e, x[chosen[:, e].bool().to(x.device)]).float()
            self.norm_sum[e] += y.norm(dim=-1).sum().cpu()
            self.max_abs[e] = torch.maximum(self.max_abs[e], y.abs().max().cpu())
        if sample > 0:  # evenly spaced tokens of this batch
            pick = torch.linspace(0, x.shape[0] - 1, min(sample, x.shape[0])).round().long().unique()
            self.inputs.append(x[pick].detach().float().cpu())


@torch.no_grad()
def calibrate(model: nn.Module, arch: MoeArch, feeds: Iterable[dict], sample_per_batch: int) -> list[LayerStats]:
    """Run the calibration batches through the model once; hooks on every MoE block accumulate
    per-layer statistics, so memory stays the model's own plus a few (experts, experts) tensors
    and the sampled inputs."""
    found = blocks(model, arch)
    stats = [LayerStats(experts_of(model.config, arch)) for _ in found]
    mask: dict[str, torch.Tensor] = {}

    def hook_for(i: int, block: nn.Module):
        def hook(module, args, kwargs):  # before the block runs: its input, untouched
            hidden = args[0] if args else next(iter(kwargs.values()))  # (batch, seq, hidden)
            x = hidden.reshape(-1, hidden.shape[-1])[mask["real"]]
            stats[i].add(block, arch, x, sample_per_batch)
        return hook

    handles = [block.register_forward_pre_hook(hook_for(i, block), with_kwargs=True) for i, (_, block) in enumerate(found)]
    device = next(model.parameters()).device
    try:
        for feed in feeds:
            ids, att = (torch.as_tensor(feed[k], device=device) for k in ("input_ids", "attention_mask"))
            mask["real"] = att.reshape(-1).bool()
            model.base_model(input_ids=ids, attention_mask=att, use_cache=False)  # no need for the LM head's logits
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def slice_block(block: nn.Module, arch: MoeArch, kept: torch.Tensor, top_k: int) -> None:
    """Keep the experts `kept` (sorted indices): stacked tensors, router rows and bias."""
    experts, gate = _get(block, arch.experts), _get(block, arch.router)
    for name in arch.stacked:
        old = getattr(experts, name)
        setattr(experts, name, nn.Parameter(old.data[kept.to(old.device)].clone(), requires_grad=old.requires_grad))
    rows = kept.to(gate.weight.device)
    gate.weight = nn.Parameter(gate.weight.data[rows].clone(), requires_grad=gate.weight.requires_grad)
    if arch.router_bias:
        setattr(gate, arch.router_bias, getattr(gate, arch.router_bias)[rows].clone())  # stays a buffer
    for module in block.modules():  # router, experts and block keep their own copies of the counts
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)
        if hasattr(module, "top_k"):
            module.top_k = top_k


def set_counts(model: nn.Module, arch: MoeArch, kept: int, top_k: int) -> None:
    setattr(model.config, arch.count_key, kept)
    setattr(model.config, arch.topk_key, top_k)
    for attr, value in (("num_experts", kept), ("num_experts_per_tok", top_k)):  # the *ForCausalLM copies
        if hasattr(model, attr):
            setattr(model, attr, value)
