"""Distillation losses shared by prune.homodistil and distill.kd.

- output (the model's kind picks one, `ModelKind.output_loss`): encoder -> 1 - cosine (or MSE) of
  mean-pooled sentence embeddings (`embedding_loss`); classifier / causal LM / CNN ->
  T^2 * KL(softmax(t/T) || softmax(s/T)) over real (unpadded) positions (`logit_loss`, Hinton et al. 2015);
- hidden: MSE between each student layer's hidden states and the same teacher layer's, divided by
  the teacher's mean square so the weight means the same across models (TinyBERT, arXiv 1909.10351);
- attention: MSE of attention probabilities of the heads the student still has;
- TAID (arXiv 2501.16937): the target moves from the student's own (detached) output towards the
  teacher's as `t` rises, p_t = softmax((1-t) sg(z_s) + t z_T), loss -sum p_t log q_s."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress import kinds
from compress.kinds import ModelKind


@dataclass(frozen=True)
class LossWeights:
    output: float = 1.0
    hidden: float = 1.0
    attention: float = 0.0
    lm: float = 0.0  # causal LMs: next-token cross-entropy on the training text
    temperature: float = 2.0
    encoder_output: str = "cosine"  # or "mse"
    pooling: str = "mean"  # how the model's sentence embedding is pooled: "mean" or "cls"


def pooled(hidden: torch.Tensor, mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def output_loss(kind: str | ModelKind, s_out, t_out, mask: torch.Tensor, w: LossWeights,
                taid_t: float | None = None) -> torch.Tensor:
    """The output loss the kind distils with (a ModelKind or its name)."""
    return kinds.get(kind).output_loss(s_out, t_out, mask, w, taid_t)


def embedding_loss(s_out, t_out, mask: torch.Tensor, w: LossWeights, taid_t: float | None = None) -> torch.Tensor:
    """1 - cosine (or MSE) of the pooled sentence embeddings of last_hidden_state."""
    s_emb = pooled(s_out.last_hidden_state, mask, w.pooling)
    t_emb = pooled(t_out.last_hidden_state, mask, w.pooling)
    if taid_t is not None:  # interpolated target between the student's own embedding and the teacher's
        t_emb = (1 - taid_t) * s_emb.detach() + taid_t * t_emb
    if w.encoder_output == "mse":
        return F.mse_loss(F.normalize(s_emb, dim=-1), F.normalize(t_emb, dim=-1)) * s_emb.shape[-1]
    return (1 - F.cosine_similarity(s_emb, t_emb, dim=-1)).mean()


def logit_loss(s_out, t_out, mask: torch.Tensor, w: LossWeights, taid_t: float | None = None) -> torch.Tensor:
    """T^2 * KL of the logits (or TAID's target); over the real tokens of (batch, seq) LM logits."""
    s_logits, t_logits = s_out.logits.float(), t_out.logits.float()
    if taid_t is not None:
        target = F.softmax((1 - taid_t) * s_logits.detach() + taid_t * t_logits, dim=-1)
        per = -(target * F.log_softmax(s_logits, dim=-1)).sum(-1)
    else:
        T = w.temperature
        per = F.kl_div(F.log_softmax(s_logits / T, dim=-1), F.log_softmax(t_logits / T, dim=-1),
                       log_target=True, reduction="none").sum(-1) * T * T
    if per.dim() == 2:  # causal LM: (batch, seq), average over real tokens
        keep = mask.to(per.dtype)
        return (per * keep).sum() / keep.sum().clamp(min=1)
    return per.mean()


def hidden_loss(s_out, t_out, mask: torch.Tensor, pairs: list[tuple[int, int]] | None = None,
                channels: list[int] | None = None) -> torch.Tensor:
    """Mean over `pairs` (student, teacher) of hidden_states indices (default: layer i with layer i) of
    the masked MSE, each divided by the teacher layer's mean square; `channels`: the teacher channels
    a hidden-pruned student kept (passes/lib/hidden.py channel_map), in the student's order."""
    keep = mask.unsqueeze(-1).to(torch.float32)
    if pairs is None:
        if len(s_out.hidden_states) != len(t_out.hidden_states):
            raise ValueError(f"hidden-state loss needs as many layers in the student ({len(s_out.hidden_states) - 1}) as "
                             f"in the teacher ({len(t_out.hidden_states) - 1}), or a layer map: set w_hidden=0")
        pairs = [(i, i) for i in range(1, len(s_out.hidden_states))]
    losses = []
    for s_i, t_i in pairs:
        s_h, t_h = s_out.hidden_states[s_i], t_out.hidden_states[t_i]
        if channels is not None:
            t_h = t_h[..., channels]
        diff = ((s_h - t_h) ** 2 * keep).sum() / (keep.sum() * s_h.shape[-1])
        scale = ((t_h ** 2) * keep).sum() / (keep.sum() * t_h.shape[-1])
        losses.append(diff / scale.clamp(min=1e-6))
    return torch.stack(losses).mean()


def attention_loss(s_out, t_out, mask: torch.Tensor, head_keep: list[torch.Tensor] | None) -> torch.Tensor:
    """Squared error of attention rows of real (unpadded) query tokens, summed over keys, averaged."""
    rows = mask[:, None, :, None].to(torch.float32)  # (batch, 1, seq, 1): query rows that count
    losses = []
    for i, (s_a, t_a) in enumerate(zip(s_out.attentions, t_out.attentions)):  # (batch, heads, seq, seq)
        if head_keep is not None:
            keep = head_keep[i].to(s_a.device)
            s_a, t_a = s_a[:, keep], t_a[:, keep]
        err = ((s_a - t_a) ** 2 * rows).sum()
        losses.append(err / (rows.sum() * s_a.shape[1]).clamp(min=1))
    return torch.stack(losses).mean()


def lm_loss(s_out, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over real tokens: the task loss of a causal LM (docs/methods.md: 'task/LM
    loss where labels exist'); non-zero even while the student still equals the teacher."""
    logits = s_out.logits[:, :-1].float()
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def distill_loss(kind: str | ModelKind, s_out, t_out, mask: torch.Tensor, w: LossWeights,
                 head_keep: list[torch.Tensor] | None = None, taid_t: float | None = None,
                 input_ids: torch.Tensor | None = None, pairs: list[tuple[int, int]] | None = None,
                 channels: list[int] | None = None) -> tuple[torch.Tensor, dict]:
    """The weighted sum of the losses and each part's value; `pairs` and `channels`: the hidden-state
    map of a depth- or hidden-pruned student (trainer.hidden_map; default: the same layers, all channels)."""
    kind = kinds.get(kind)
    parts = {"output": kind.output_loss(s_out, t_out, mask, w, taid_t)}
    if w.lm > 0 and kind.is_generative and input_ids is not None:
        parts["lm"] = lm_loss(s_out, input_ids, mask)
    if w.hidden > 0:
        parts["hidden"] = hidden_loss(s_out, t_out, mask, pairs, channels)
    if w.attention > 0:
        parts["attention"] = attention_loss(s_out, t_out, mask, head_keep)
    weights = {"output": w.output, "hidden": w.hidden, "attention": w.attention, "lm": w.lm}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


class Taid:
    """TAID's interpolation weight: rises linearly from `start` to 1 over training, and faster
    when the loss improves quickly (relative improvement of its moving average)."""

    def __init__(self, start: float = 0.4, momentum: float = 0.9, beta: float = 0.5):
        self.t, self.start, self.momentum, self.beta = start, start, momentum, beta
        self.avg: float | None = None

    def update(self, loss: float, progress: float) -> float:
        prev = self.avg
        self.avg = loss if prev is None else self.momentum * prev + (1 - self.momentum) * loss
        if prev:
            improvement = max(0.0, (prev - self.avg) / prev)
            self.t = min(1.0, self.t + (1 - self.t) * self.beta * improvement)
        self.t = max(self.t, self.start + (1 - self.start) * progress)
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "avg": self.avg}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.avg = state["t"], state["avg"]
