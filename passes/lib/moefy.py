"""MoEfication: turn a dense Llama-family causal LM into a transformers Mixtral mixture-of-experts
model with the same attention, norms and embeddings, each FFN split into experts.

Paper: Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts"
(arXiv 2110.01786). Each FFN's `ffn` neurons are split into E groups of ffn/E neurons (balanced
k-means, seeded); group e becomes expert e (its gate/up rows and down_proj columns). A router per
layer, trained briefly on real hidden states of the dense model, picks top-k experts per token.
When to use: no pretrained MoE installs offline here, so this builds a real-weight MoE fixture
(SmolLM2-135M -> 8 experts of 192 neurons, top-2) for the expert passes (prune.experts) and
benchmarks. Deterministic for a seed: the same weights every time on the same machine.

The dense FFN is the plain sum of all E experts' outputs. Mixtral multiplies each selected
expert's output by its renormalised softmax weight (top-2 weights sum to 1), so every expert's
down_proj is stored times top_k: with equal weights (1/k each) the block returns exactly the sum
of the k chosen experts, i.e. the dense FFN with the unchosen neurons switched off. The conversion
is checked (`check_all_experts`): with every expert chosen (router zeroed, top_k = E, down_proj
rescaled to E) the Mixtral logits equal the dense logits (max |diff| 1.5e-7 on the tiny Llama).

Router training (router weights only, Adam, seeded minibatches of 512 tokens, on the MLP inputs
after post_attention_layernorm collected from the dense model on training text):
  1. cross-entropy towards the top_k experts with the largest output norm on each token
     (MoEfication's labels: the experts that contribute most), then
  2. MSE between the routed Mixtral block output and the dense FFN output (relative to the dense
     output's energy): the selection is not differentiable, so phase 1 teaches which experts to
     choose and phase 2 tunes the weighting of the chosen ones (it may move away from 1/k).
Measured: relative block-output error ||F_moe - F_dense|| / ||F_dense|| on held-out tokens (a
seeded random 20% of the calibration tokens, not trained on; same paragraphs), mean over layers.
Tiny random Llama (tests/conftest.py tiny_llama, FFN 64 -> 8 x 8, top-2, 1280 tokens, 100 steps):
random router 0.87, after phase 1 0.78, after phase 2 0.77; the norm-label oracle (the top-2
experts by true output norm, weights 1/2) gives 0.64. SmolLM2-135M (8 x 192, top-2, 4096 wiki
tokens, 300 steps, 618 s on 2 loaded cores): random router 0.852, after phase 1 0.635, after
phase 2 0.614, oracle 0.573 (layers range 0.08-0.81 after training). Only 2 of 8 experts run, so
with routers alone the MoE is a poor LM.

Then (passes/lib/moefy_refit.py, where the measurements are) each MoE block is refitted to the dense
FFN on the MoE's own hidden states (`Reconstruction`: least-squares down_proj; routers only ppl
1894 -> 436 on SmolLM2, dense 34.35) and, optionally, the whole MoE is distilled end to end from
the dense model's logits (`Distillation`; 150 steps: 474 -> 231 in 13 min). The MoE is still far from the
dense model (top-2 of 8 keeps a quarter of each FFN): it is a routing / expert-pruning fixture
whose pruned variants are compared with it, not a replacement for SmolLM2.
`MoefyReport.layers` holds the per-layer numbers (examples/moefy_smollm2.py prints them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from compress.errors import UserError
from compress.passes.lib import moe
from compress.passes.lib.moefy_refit import (Distillation, Reconstruction, distill_moe, packed_ids, reconstruct_experts,
                                             relative_error)

SUPPORTED = ("llama", "mistral")
MIXTRAL = next(a for a in moe.ARCHS if a.name == "mixtral")
TOLERANCE = 1e-3  # max |logit diff| of the all-experts check, relative to the largest |logit|


@dataclass
class MoefyReport:
    """What the conversion measured: per layer relative block-output errors on held-out tokens."""

    layers: list[dict[str, float]] = field(default_factory=list)
    all_experts_max_diff: float = float("nan")  # max |logit diff|, dense vs Mixtral with every expert on
    tokens: int = 0  # calibration tokens per layer (train + held out)
    distillation: dict[str, Any] = field(default_factory=dict)  # the trainer's stats (first / final loss, seconds)

    def mean(self, key: str) -> float:
        return sum(row[key] for row in self.layers) / max(len(self.layers), 1)


def check_dense(config: Any, experts: int, top_k: int) -> None:
    """Every problem with the source model and the expert counts, reported together."""
    problems = []
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED:
        problems.append(f"model_type '{model_type}' is not a Llama-family causal LM "
                        f"(supported: {', '.join(SUPPORTED)})")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=True has no place in Mixtral (biases would be lost)")
    ffn = getattr(config, "intermediate_size", 0)
    if experts < 2 or ffn % experts:
        problems.append(f"experts={experts} must be >= 2 and divide the FFN width {ffn} "
                        f"(valid: {[e for e in range(2, min(ffn, 64) + 1) if ffn % e == 0]})")
    if not 1 <= top_k <= experts:
        problems.append(f"top_k={top_k} must be in 1..experts ({experts})")
    if problems:
        raise UserError(f"{len(problems)} problem(s) with moefy: " + "; ".join(problems))


def mixtral_config(config: Any, experts: int, top_k: int) -> Any:
    from transformers import MixtralConfig

    heads = config.num_attention_heads
    return MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=config.num_key_value_heads or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, hidden_act=config.hidden_act,
        intermediate_size=config.intermediate_size // experts, num_local_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
        sliding_window=getattr(config, "sliding_window", None), attention_dropout=config.attention_dropout,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        initializer_range=config.initializer_range, architectures=["MixtralForCausalLM"])


def copy_shared(dense: Any, mixtral: Any) -> None:
    """Embeddings, attention, norms and lm_head: same names in Llama and Mixtral, copied exactly."""
    shared = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = mixtral.load_state_dict(shared, strict=False)
    wrong = [k for k in missing if ".mlp." not in k and k != "lm_head.weight"] + list(unexpected)
    if wrong:
        raise UserError(f"weights that do not map from {dense.config.model_type} to Mixtral: {wrong[:5]}")


@torch.no_grad()
def collect_mlp_inputs(dense: Any, tokenizer: Any, texts: list[str], max_length: int,
                       max_tokens: int) -> list[torch.Tensor]:
    """Per layer, the MLP inputs (after post_attention_layernorm) of real tokens: (tokens, hidden)."""
    from compress.runtime import batches

    layers = dense.model.layers
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    mask: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().float()))
             for i, layer in enumerate(layers)]
    count = 0
    try:
        for feed in batches(tokenizer, texts, max_length, batch_size=8):
            mask.append(torch.from_numpy(feed["attention_mask"]).bool())
            dense(input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=mask[-1])
            count += int(mask[-1].sum())
            if count >= max_tokens:
                break
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise UserError("moefy got no calibration tokens: give non-empty training texts")
    return [torch.cat([h[m] for h, m in zip(per, mask)])[:max_tokens] for per in seen]


def neuron_features(mlp: Any, x: torch.Tensor, how: str) -> torch.Tensor:
    """(ffn, features) rows to cluster, L2-normalised. `activations`: |act(gate)*up| of each neuron
    on up to 1024 calibration tokens (neurons that fire on the same tokens share an expert);
    `weights`: the neuron's gate and up weight rows."""
    if how == "weights":
        rows = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=1).float()
    else:
        x = x[:: max(1, x.shape[0] // 1024)][:1024].to(mlp.up_proj.weight.dtype)
        rows = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().T.float()  # (ffn, tokens)
    return F.normalize(rows, dim=1)


def _balanced_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Each point to a cluster, `size` points per cluster: greedily over (point, cluster) pairs in
    order of increasing distance, a point takes the nearest cluster that still has room."""
    n, k = dist.shape
    labels, room = [-1] * n, [size] * k
    for flat in torch.argsort(dist.flatten(), stable=True).tolist():
        i, e = divmod(flat, k)
        if labels[i] < 0 and room[e] > 0:
            labels[i], room[e] = e, room[e] - 1
    return torch.tensor(labels)


def balanced_kmeans(points: torch.Tensor, clusters: int, seed: int, iters: int = 10) -> torch.Tensor:
    """Labels (n,) with exactly n / clusters points each; seeded initial centroids."""
    gen = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(points.shape[0], generator=gen)[:clusters]]
    labels = torch.full((points.shape[0],), -1)
    for _ in range(iters):
        new = _balanced_assign(torch.cdist(points, centroids), points.shape[0] // clusters)
        if torch.equal(new, labels):
            break
        labels = new
        centroids = torch.stack([points[labels == e].mean(0) for e in range(clusters)])
    return labels


@torch.no_grad()
def fill_experts(experts: Any, mlp: Any, labels: torch.Tensor, top_k: int) -> torch.Tensor:
    """Expert e gets the neurons labelled e (ascending order), down_proj times top_k. Returns the
    neuron order: expert e's rows are dense rows order[e * size:(e + 1) * size]."""
    order = torch.cat([(labels == e).nonzero().squeeze(1) for e in range(experts.gate_up_proj.shape[0])])
    size = experts.down_proj.shape[2]
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (ffn, h), (ffn, h), (h, ffn)
    for e in range(experts.gate_up_proj.shape[0]):
        idx = order[e * size : (e + 1) * size]
        experts.gate_up_proj[e] = torch.cat([gate[idx], up[idx]])
        experts.down_proj[e] = down[:, idx] * top_k
    return order


def _routed(block: Any, outputs: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    logits = F.linear(x, block.gate.weight)
    weights, idx = moe.route(block, MIXTRAL, logits, torch.ones(logits.shape[1], dtype=torch.bool), top_k)
    return moe.combine(outputs, weights, idx)


def _norm_labels(outputs: torch.Tensor, top_k: int) -> torch.Tensor:
    """(tokens, top_k): the experts with the largest output norm on each token."""
    return outputs.norm(dim=-1).T.topk(top_k, dim=-1).indices


def layer_errors(block: Any, outputs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, top_k: int) -> dict[str, float]:
    """Relative block-output errors of the current router and of the norm-label oracle."""
    with torch.no_grad():
        idx = _norm_labels(outputs, top_k)
        oracle = moe.combine(outputs, torch.full(idx.shape, 1.0 / top_k), idx)
        return {"router": relative_error(_routed(block, outputs, x, top_k), y), "oracle": relative_error(oracle, y)}


def train_router(block: Any, x: torch.Tensor, y: torch.Tensor, steps: int, top_k: int, seed: int,
                 lr: float = 3e-3, batch: int = 512) -> dict[str, float]:
    """Phase 1 (steps // 2): cross-entropy towards the norm labels; phase 2: MSE to the dense output.
    x, y: (tokens, hidden); the last 20% of the tokens are held out for the reported errors."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_train = max(1, int(x.shape[0] * 0.8))
    with torch.no_grad():
        outputs = torch.stack([moe.expert_output(block.experts, e, x)
                               for e in range(block.experts.num_experts)]).float()  # (experts, tokens, hidden)
    train, held = perm[:n_train], perm[n_train:] if x.shape[0] - n_train >= 8 else perm
    labels = _norm_labels(outputs[:, train], top_k)
    energy = y[train].pow(2).mean().clamp_min(1e-12)
    result = {"error_init": layer_errors(block, outputs[:, held], x[held], y[held], top_k)["router"]}
    weight = block.gate.weight
    opt = torch.optim.Adam([weight], lr=lr)
    for step in range(steps):
        pick = torch.randint(0, n_train, (min(batch, n_train),), generator=gen)
        tokens = train[pick]
        if step < steps // 2:
            logp = torch.log_softmax(F.linear(x[tokens], weight), dim=-1)
            loss = -logp.gather(1, labels[pick]).mean()
        else:
            loss = (_routed(block, outputs[:, tokens], x[tokens], top_k) - y[tokens]).pow(2).mean() / energy
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == steps // 2 - 1:
            result["error_ce"] = layer_errors(block, outputs[:, held], x[held], y[held], top_k)["router"]
    errors = layer_errors(block, outputs[:, held], x[held], y[held], top_k)
    final_loss = loss.item() if steps else float("nan")
    return {**result, "error_final": errors["router"], "error_oracle": errors["oracle"], "final_loss": final_loss}


@torch.no_grad()
def check_all_experts(dense: Any, mixtral: Any, input_ids: torch.Tensor) -> float:
    """Max |logit diff| between the dense model and the Mixtral model with every expert chosen at
    weight 1 (router zeroed so the E weights are 1/E, down_proj times E / top_k): 0 up to float
    rounding when the conversion is right. The Mixtral model is restored afterwards."""
    blocks = [layer.mlp for layer in mixtral.model.layers]
    saved = [(b.gate.weight.clone(), b.experts.down_proj.clone(), b.top_k) for b in blocks]
    try:
        for b in blocks:
            n = b.experts.num_experts
            b.gate.weight.zero_()
            b.experts.down_proj.mul_(n / b.top_k)
            b.top_k = b.gate.top_k = n
        diff = (dense(input_ids=input_ids).logits - mixtral(input_ids=input_ids).logits).abs().max()
    finally:
        for b, (w, down, k) in zip(blocks, saved):
            b.gate.weight.copy_(w)
            b.experts.down_proj.copy_(down)
            b.top_k = b.gate.top_k = k
    return float(diff)


def moefy(model: Any, texts: list[str], tokenizer: Any, experts: int = 8, top_k: int = 2, router_steps: int = 300,
          max_length: int = 128, seed: int = 0, max_tokens: int = 4096,
          cluster_on: Literal["activations", "weights"] = "activations",
          reconstruction: Reconstruction | None = Reconstruction(), distillation: Distillation | None = None,
          report: MoefyReport | None = None) -> Any:
    """Dense Llama-family causal LM -> MixtralForCausalLM (eval mode, same dtype). `report`, when
    given, is filled with per-layer errors, the all-experts check and the distillation's losses.
    `reconstruction=None` (or 0 steps and no ridge) stops after the routers; `distillation` (off
    by default) then trains the MoE end to end against `model` on the same texts."""
    from transformers import MixtralForCausalLM

    from compress.runtime import tokenize

    check_dense(model.config, experts, top_k)
    model = model.eval()
    torch.manual_seed(seed)  # the random init of the expert tensors is overwritten; the router's is seeded
    mixtral = MixtralForCausalLM(mixtral_config(model.config, experts, top_k)).to(model.dtype).eval()
    mixtral.set_attn_implementation(model.config._attn_implementation)  # same kernel: bitwise-equal attention
    copy_shared(model, mixtral)
    xs = collect_mlp_inputs(model, tokenizer, texts, max_length, max_tokens)
    report = report if report is not None else MoefyReport()
    report.tokens = xs[0].shape[0]
    for i, (dense_layer, layer) in enumerate(zip(model.model.layers, mixtral.model.layers)):
        row = _convert_layer(dense_layer.mlp, layer.mlp, xs[i], router_steps, top_k, seed + i, cluster_on)
        report.layers.append(row)
        xs[i] = None  # free the layer's calibration tensors as we go
    ids = torch.from_numpy(tokenize(tokenizer, texts[:1], 32)["input_ids"])
    report.all_experts_max_diff = check_all_experts(model, mixtral, ids)  # before reconstruction moves the experts
    with torch.no_grad():
        scale = float(model(input_ids=ids).logits.abs().max())
    if not report.all_experts_max_diff <= TOLERANCE * max(scale, 1.0):
        raise UserError(f"MoEfied model does not reproduce the dense model with every expert on: max |logit diff| "
                        f"{report.all_experts_max_diff:.3g} > {TOLERANCE} x {scale:.3g} (a bug in the weight mapping)")
    if reconstruction is not None and (reconstruction.steps > 0 or reconstruction.ridge is not None):
        r = reconstruction
        rows = reconstruct_experts(model, mixtral, packed_ids(tokenizer, texts, r.seq_len, r.tokens), r.steps, seed,
                                   r.lr, r.target, r.batch, r.ridge)
        for row, new in zip(report.layers, rows):
            row.update(new)
    if distillation is not None and distillation.steps > 0:
        report.distillation = distill_moe(model, mixtral, tokenizer, texts, distillation, seed)
    return mixtral


def _convert_layer(mlp: Any, block: Any, x: torch.Tensor, steps: int, top_k: int, seed: int, cluster_on: str) -> dict:
    labels = balanced_kmeans(neuron_features(mlp, x, cluster_on), block.experts.num_experts, seed)
    fill_experts(block.experts, mlp, labels, top_k)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=gen) * 0.02)
        y = mlp(x.to(mlp.up_proj.weight.dtype)).float()
    block.gate.weight.requires_grad_(True)
    with torch.enable_grad():
        result = train_router(block, x.to(block.gate.weight.dtype), y, steps, top_k, seed)
    return result
