"""Second stage of MoEfication (passes/lib/moefy.py): make the routed MoE closer to the dense model it
came from, block by block (`Reconstruction`) and then end to end (`Distillation`).

Block-wise reconstruction (after the routers; `reconstruct_experts`): layer by layer, on packed
wiki training text (16384 tokens in rows of 128), each MoE block is fitted to the dense FFN on the
inputs the MoE itself produces (its earlier layers already converted), first by the closed-form
least-squares down_proj for the current routing (`refit_down`, ridge 1e-2 towards the current
weights), then optionally by Adam on experts and router. Measured on SmolLM2-135M (top-2, seed 0,
1 torch thread on 2 heavily shared cores; perplexity on the first 20 lee_background paragraphs,
<= 256 tokens each; dense model 34.35 on this text), mean held-out block error over layers and
perplexity:
  routers only                                    block 0.563   ppl 1894    (12 min)
  + refit, target = dense FFN, ridge 1e-3         block 0.483   ppl 468     (+224 s)
  + refit, target = dense FFN, ridge 1e-2         block 0.461   ppl 436     (+94 s, less load)  <- default
  + refit, target = dense residual stream, 1e-3   block 0.831   ppl 766     (+464 s)
  + refit (ridge 1e-2) + 100 Adam steps, lr 1e-4  block 0.460 -> 0.458   ppl 412   (+710 s)
So the default is the refit with target `ffn`, ridge 1e-2 and no Adam steps (Adam bought 0.002
of block error and 436 -> 412 perplexity for 10 more minutes). The residual target (make the
MoE's stream match the dense one; its block error is against that harder target) is worse: it asks
each layer to undo the errors of all earlier ones.

End-to-end distillation (`Distillation`, `distill_moe`, after the refit): block-wise fitting
cannot see how errors compound through the layers or what the logits need, so the Mixtral model
(student) is trained against the dense model (teacher) with KL(teacher || student) of the logits
at temperature 1 (Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv
1503.02531), on packed wiki training text (never lee_background), by the project's trainer
(passes/lib/trainer.py: AdamW, warm-up then linear decay, batches a function of (seed, step), so the
same seed gives the same weights). Only the MoE blocks (experts and routers) train by default: the
attention, norms and embeddings stay the dense model's, so the two differ only in their FFNs.
Measured on SmolLM2-135M (defaults: refit as above, then 150 steps of 4 packed rows x 128 tokens =
76,800 wiki tokens, one pass, lr 3e-4; seed 0, 1 torch thread on 2 shared cores; same 20
lee_background paragraphs):
  python examples/moefy_smollm2.py --out /tmp/moe_s4/fixture --threads 1 --kd-steps 150
  before distillation ppl 474.4 (this build; block error after the refit 0.471), after 230.5;
  logit KL (training batches) 2.25 at the first step -> 1.68 (moving average at the end);
  759 s of distillation (5.1 s/step), 1038 s for the whole build.
The refit rows above (436) came from an earlier build of the same code and settings whose router
errors are identical to this one's; only its refit came out better (block 0.461 vs 0.471), cause
not found. Tiny Llama (tests/test_moefy.py, 30 steps of 4 x 32 tokens, lr 1e-3): held-out logit
KL 0.0129 -> 0.0122 with a 30x sharper lm_head in both models (its random logits are ~uniform)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from compress.errors import UserError


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).norm() / target.norm().clamp_min(1e-12))


@dataclass(frozen=True)
class Reconstruction:
    """Block-wise reconstruction after the routers are trained (see `reconstruct_experts`)."""

    steps: int = 0  # Adam steps per layer after the refit (measured: little gain for their time, see above)
    tokens: int = 16384  # training tokens, packed into rows of seq_len
    seq_len: int = 128
    lr: float = 1e-4
    batch: int = 512  # tokens per step
    target: Literal["ffn", "residual"] = "ffn"
    ridge: float | None = 1e-2  # least-squares down_proj refit before Adam (None: no refit)


@dataclass(frozen=True)
class Distillation:
    """End-to-end logit distillation of the MoE from the dense model (see `distill_moe`)."""

    steps: int = 150  # optimizer steps (0: off)
    batch: int = 4  # packed rows of seq_len tokens per step
    seq_len: int = 128
    lr: float = 3e-4  # peak AdamW learning rate: warm-up over 10% of the steps, then linear decay to 0
    shared: bool = False  # also train attention, norms and embeddings (default: experts and routers only)


def packed_ids(tokenizer: Any, texts: list[str], seq_len: int, max_tokens: int) -> torch.Tensor:
    """(sequences, seq_len) token ids: the texts tokenized, joined by EOS and cut into full rows
    (no padding, so every position is a real token and a plain causal mask is right)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    flat: list[int] = []
    for text in texts:
        flat += tokenizer(text)["input_ids"] + [eos]
        if len(flat) >= max_tokens:
            break
    rows = min(len(flat), max_tokens) // seq_len
    if rows < 2:
        raise UserError(f"moefy reconstruction needs at least 2 x {seq_len} tokens of training text (got {len(flat)})")
    return torch.tensor(flat[: rows * seq_len]).view(rows, seq_len)


class Stream:
    """Runs decoder layers one at a time on packed sequences (n, L): the residual stream h (n, L, H)
    and the causal mask / rotary embeddings every layer needs."""

    def __init__(self, model: Any, ids: torch.Tensor, chunk: int = 16):
        self.chunk = chunk
        length = ids.shape[1]
        self.mask = torch.full((length, length), float("-inf")).triu(1)[None, None]  # (1, 1, L, L) additive
        with torch.no_grad():
            self.h = model.model.embed_tokens(ids).float()
            self.rope = model.model.rotary_emb(self.h[:1], torch.arange(length)[None])

    def _chunks(self, fn, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fn(h[i : i + self.chunk]) for i in range(0, h.shape[0], self.chunk)])

    def attention(self, layer: Any, h: torch.Tensor) -> torch.Tensor:
        """h + self_attn(input_layernorm(h)): the residual before the FFN."""
        def half(part):
            out = layer.self_attn(hidden_states=layer.input_layernorm(part), position_embeddings=self.rope,
                                  attention_mask=self.mask)[0]
            return part + out
        return self._chunks(half, h)

    def layer(self, layer: Any, h: torch.Tensor) -> torch.Tensor:
        return self._chunks(lambda part: layer(part, attention_mask=self.mask, position_embeddings=self.rope), h)


@torch.no_grad()
def routed_activations(block: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (tokens, experts, moe_ffn): each chosen expert's act(gate) * up times its routing weight,
    zeros elsewhere, so the block output is exactly z.flatten(1) @ cat(down_proj over experts).T;
    and the (tokens, experts) mask of the chosen experts."""
    experts = block.experts
    _, weights, idx = block.gate(x)  # (tokens, top_k) each
    z = torch.zeros(x.shape[0], experts.num_experts, experts.down_proj.shape[2])
    for e in range(experts.num_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        z[tok, e] = experts.act_fn(gate) * up * weights[tok, slot, None]
    return z, torch.zeros(z.shape[:2], dtype=torch.bool).scatter_(1, idx, True)


@torch.no_grad()
def refit_down(block: Any, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-2, chunk: int = 4096) -> None:
    """Least-squares down_proj for the current routing: the block is linear in down_proj, so
    min ||z D^T - y||^2 + lam ||D - D_now||^2 (lam = ridge * mean diag of z^T z) has a closed form:
    one (E*I)^2 solve (SmolLM2: 1536 x 1536). The chosen experts learn to stand in for the unchosen
    ones on average; an expert no token chose keeps its weights. z^T z is built one expert's block
    row at a time from its own tokens (top-2 of 8: 1/4 of the tokens each), 8x cheaper than dense."""
    n, hidden, inter = block.experts.down_proj.shape
    gram, cross = torch.zeros(n * inter, n * inter, dtype=torch.float64), torch.zeros(n * inter, hidden, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        z, chosen = routed_activations(block, x[i : i + chunk])
        for e in range(n):
            ze = z[chosen[:, e]]  # (tokens of e, experts, inter)
            rows = slice(e * inter, (e + 1) * inter)
            gram[rows] += (ze[:, e].T @ ze.flatten(1)).double()
            cross[rows] += (ze[:, e].T @ y[i : i + chunk][chosen[:, e]]).double()
    now = block.experts.down_proj.permute(0, 2, 1).reshape(n * inter, hidden).double()  # rows: (expert, neuron)
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    down = torch.linalg.solve(gram + lam * torch.eye(n * inter, dtype=torch.float64), cross + lam * now)
    block.experts.down_proj.copy_(down.float().view(n, inter, hidden).permute(0, 2, 1))  # (experts, hidden, inter)


def train_block(block: Any, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, lr: float = 1e-4,
                batch: int = 512, ridge: float | None = 1e-2) -> dict[str, float]:
    """Fit one Mixtral block so block(x) ~ y: the least-squares down_proj (`refit_down`, skipped
    when ridge is None), then Adam on experts and router (relative MSE, learning rate decaying
    linearly to 0). x, y: (tokens, hidden); 10% of the tokens held out for the reported errors."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_held = max(1, x.shape[0] // 10)
    held, train = perm[:n_held], perm[n_held:]
    energy = y[train].pow(2).mean().clamp_min(1e-12)
    params = [block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight]

    def held_error() -> float:
        with torch.no_grad():
            return relative_error(block(x[held][None])[0], y[held])

    result = {"block_before": held_error()}
    if ridge is not None:
        refit_down(block, x[train], y[train], ridge)
        result["block_refit"] = held_error()
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(steps, 1))
    with torch.enable_grad():
        for _ in range(steps):
            pick = train[torch.randint(0, train.shape[0], (min(batch, train.shape[0]),), generator=gen)]
            loss = (block(x[pick][None])[0] - y[pick]).pow(2).mean() / energy
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    for p, flag in zip(params, saved):
        p.requires_grad_(flag)
    return {**result, "block_after": held_error()}


def reconstruct_experts(dense: Any, mixtral: Any, ids: torch.Tensor, steps: int, seed: int, lr: float = 1e-4,
                        target: Literal["ffn", "residual"] = "ffn", batch: int = 512,
                        ridge: float | None = 1e-2) -> list[dict[str, float]]:
    """Layer by layer, train each MoE block on the inputs the MoE itself produces (its earlier
    layers already converted, so their errors are seen, not compounded blindly). Target `ffn`: the
    dense FFN on those inputs; `residual`: what brings the MoE's residual stream back to the dense
    model's after this layer (dense layer output on the dense stream minus the MoE's pre-FFN residual)."""
    moe_stream, dense_stream = Stream(mixtral, ids), Stream(dense, ids)
    h_moe, h_dense = moe_stream.h, dense_stream.h
    rows = []
    for i, (dense_layer, layer) in enumerate(zip(dense.model.layers, mixtral.model.layers)):
        a = moe_stream.attention(layer, h_moe)  # (n, L, H)
        with torch.no_grad():
            x = layer.post_attention_layernorm(a).reshape(-1, a.shape[-1])  # (n * L, H)
        if target == "residual":
            h_dense = dense_stream.layer(dense_layer, h_dense)
            y = (h_dense - a).reshape(-1, a.shape[-1])
        else:
            with torch.no_grad():
                y = dense_layer.mlp(x)
        rows.append(train_block(layer.mlp, x, y, steps, seed + i, lr, batch, ridge))
        with torch.no_grad():
            h_moe = a + layer.mlp(x.view_as(a))
    return rows


def distill_moe(dense: Any, mixtral: Any, tokenizer: Any, texts: list[str], cfg: Distillation, seed: int,
                console: Any = None) -> dict[str, Any]:
    """Train `mixtral` in place against `dense` (frozen) with KL(dense || mixtral) of the logits at
    temperature 1, on the texts packed into (steps * batch) rows of seq_len tokens (no padding;
    rows repeat in a new seeded order once the text runs out). Returns the trainer's stats."""
    from rich.console import Console

    from compress.passes.lib.losses import LossWeights
    from compress.passes.lib.trainer import TrainSettings, train

    ids = packed_ids(tokenizer, texts, cfg.seq_len, cfg.steps * cfg.batch * cfg.seq_len)  # (rows, seq_len)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch, lr=cfg.lr, warmup=0.1, weight_decay=0.0,
                             max_grad_norm=1.0, seed=seed, checkpoint_every=cfg.steps + 1)
    weights = LossWeights(output=1.0, hidden=0.0, temperature=1.0)  # logit KL only
    frozen = [] if cfg.shared else [p for n, p in mixtral.named_parameters() if ".mlp." not in n and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with tempfile.TemporaryDirectory(prefix="moefy-kd-") as work:  # the trainer's end-of-run checkpoint
            stats = train(mixtral, dense, "causal-lm", data, settings, weights, Path(work), f"moefy-kd-{seed}",
                          console or Console(stderr=True), label="moefy distillation")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {**stats, "rows": ids.shape[0], "tokens": ids.numel()}
