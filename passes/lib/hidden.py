"""Hidden-size (embedding-channel) pruning of BERT- and Llama-family models, as Minitron does.

Paper: Muralidharan et al., "Compact Language Models via Pruning and Knowledge Distillation"
(Minitron, arXiv 2407.14679). Besides heads, FFN neurons and layers, Minitron prunes the width of the
residual stream itself: the importance of embedding channel i is the activation of the LayerNorms
on calibration data, F(i) = sum over the norms of LN(X)_i aggregated over the tokens; of the batch /
sequence aggregations it compares, the best is the L2 norm over the sequence, then the mean over the
batch. The least important channels are removed from every weight that reads or writes the
residual stream, and the pruned model is retrained by distillation.

Here: `hidden_scores` hooks every norm that sits on the residual stream (BERT: the embeddings'
LayerNorm and both LayerNorms of each layer; Llama: both RMSNorms of each layer and the final norm),
runs the calibration batches and aggregates over the real (unpadded) tokens only; `keep_channels`
picks the channels to keep (`prunable.keep_count`, rounded to multiples of 8 on models of 64 channels
or more, never removing more than asked); `slice_hidden` removes the others for real: embedding
columns, norm weights (and biases), the input columns of q/k/v/up/gate and of the heads reading the
stream (BERT pooler and classifier, Llama lm_head, tied embeddings kept tied), the output rows of
o/down (and the pooler's, whose output the classifier reads), then the config: `hidden_size`, and
the attention width kept as it was (Llama `head_dim`; BERT `attention_head_size`, which
compress.models reads back, as for head-pruned BERTs).

Not exact: the norms normalise over the hidden dimension (mean and variance, or RMS), so with
channels gone every kept channel is scaled differently, and the model is an approximation of the
original; Minitron recovers it by distillation (follow with distill.kd). Removing no channel gives
exactly the same outputs."""
from __future__ import annotations

import torch
from torch import nn

from compress.errors import UserError
from compress.passes.lib import prunable
from compress.passes.lib.prunable import Family, Geometry

# Norms writing the residual stream, as paths: (under the base model, under each layer).
NORMS = {"bert": (("embeddings.LayerNorm",), ("attention.output.LayerNorm", "output.LayerNorm")),
         "llama": (("norm",), ("input_layernorm", "post_attention_layernorm"))}
HEADS = ("classifier", "lm_head", "score")  # top-level Linear heads reading the last hidden state (or the pooler)
BASE_PARTS = {"bert": {"embeddings", "encoder", "pooler"}, "llama": {"embed_tokens", "layers", "norm", "rotary_emb"}}


def residual_norms(model: nn.Module, fam: Family) -> list[nn.Module]:
    """The norms whose outputs Minitron scores, in forward order (BERT embeddings first, Llama final last)."""
    base_paths, layer_paths = NORMS[fam.name]
    per_layer = [prunable._get(layer, path) for layer in prunable.layers(model, fam) for path in layer_paths]
    base = [prunable._get(model.base_model, path) for path in base_paths]
    return base + per_layer if fam.name == "bert" else per_layer + base


@torch.no_grad()
def hidden_scores(model: nn.Module, fam: Family, data: dict[str, torch.Tensor], batch_size: int = 8,
                  forward_kwargs: dict | None = None) -> torch.Tensor:
    """Minitron's activation importance of each of the hidden_size channels, float32 (hidden_size,):
    for every residual norm, the L2 norm of its output channel over each sample's real tokens, the
    mean over the samples, summed over the norms. `data`: padded calibration tensors (input_ids,
    attention_mask; every key is passed to the model, batch_size rows at a time). Leaves the model in
    eval mode (as prune.structured's calibration does), hooks removed."""
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    real: list[torch.Tensor] = []  # the current batch's mask, (batch, seq, 1)

    def hook(_module, _args, out):
        x = (out[0] if isinstance(out, tuple) else out).double() * real[0]
        total.add_(x.pow(2).sum(1).sqrt().sum(0).cpu())  # L2 over the sequence, summed over the batch

    handles = [norm.register_forward_hook(hook) for norm in residual_norms(model, fam)]
    ids = data["input_ids"]
    mask = data.get("attention_mask", torch.ones_like(ids))
    try:
        for b in range(0, ids.shape[0], batch_size):
            batch = {k: v[b:b + batch_size].to(device) for k, v in {**data, "attention_mask": mask}.items()}
            real[:] = [batch["attention_mask"].unsqueeze(-1).double()]
            model(**batch, **(forward_kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    samples = max(int((mask.sum(1) > 0).sum()), 1)  # a sample without a real token adds nothing
    return (total / samples).float()


def keep_channels(scores: torch.Tensor, fraction_removed: float, round_to: int = 8) -> torch.Tensor:
    """Sorted indices of the best channels: `prunable.keep_count(hidden, fraction_removed)` of them,
    rounded UP to a multiple of `round_to` when hidden >= 64 (matrix kernels work in blocks of 8;
    rounding up never removes more than asked: 100 channels at 0.25 keep 80, not 75); 1 = no rounding."""
    if not 0 <= fraction_removed < 1:
        raise ValueError(f"fraction_removed must be in [0, 1), got {fraction_removed}")
    hidden = scores.numel()
    kept = prunable.keep_count(hidden, fraction_removed)
    if hidden >= 64 and round_to > 1:
        kept = min(hidden, -(-kept // round_to) * round_to)
    return torch.topk(scores.float(), kept).indices.sort().values


def _keep_index(keep: torch.Tensor, hidden: int) -> torch.Tensor:
    """`keep` (indices or a bool mask over the channels) as sorted, unique, in-range indices."""
    if keep.dtype == torch.bool:
        if keep.numel() != hidden:
            raise ValueError(f"a keep mask needs {hidden} entries (hidden_size), got {keep.numel()}")
        keep = torch.nonzero(keep).flatten()
    keep = keep.flatten().long().cpu()
    if keep.numel() == 0 or keep.unique().numel() != keep.numel() or keep.min() < 0 or keep.max() >= hidden:
        raise ValueError(f"keep must name distinct channels in [0, {hidden}), at least one")
    return keep.sort().values


def _check_supported(model: nn.Module, fam: Family) -> list[str]:
    """Top-level heads to slice; refuses parts whose hidden-size wiring this module does not know."""
    cfg = model.config
    if getattr(cfg, "embedding_size", cfg.hidden_size) != cfg.hidden_size or getattr(cfg, "add_cross_attention", False):
        raise UserError("hidden-size pruning needs embeddings of hidden_size and no cross-attention")
    unknown = [name for name, child in model.base_model.named_children()
               if name not in BASE_PARTS[fam.name] and any(True for _ in child.parameters())]
    heads = []
    if model.base_model is not model:
        for name, child in model.named_children():
            if child is model.base_model or not any(True for _ in child.parameters()):
                continue
            (heads if name in HEADS and isinstance(child, nn.Linear) else unknown).append(name)
    if unknown:
        raise UserError(f"hidden-size pruning does not know how to slice {', '.join(unknown)} of "
                        f"{type(model).__name__}: supported are the base model, a pooler and a Linear "
                        f"{' / '.join(HEADS)} head")
    return heads


def _slice_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight.data[keep.to(norm.weight.device)].clone())
    if getattr(norm, "bias", None) is not None:
        norm.bias = nn.Parameter(norm.bias.data[keep.to(norm.bias.device)].clone())
    if hasattr(norm, "normalized_shape"):  # nn.LayerNorm checks its input against it
        norm.normalized_shape = (keep.numel(),)


def _slice_embeddings(model: nn.Module, fam: Family, keep: torch.Tensor) -> list[nn.Embedding]:
    owner = model.base_model.embeddings if fam.name == "bert" else model.base_model
    embeddings = [m for m in owner.children() if isinstance(m, nn.Embedding)]  # BERT: word, position, token type
    for emb in embeddings:
        emb.weight = nn.Parameter(emb.weight.data[:, keep.to(emb.weight.device)].clone())
        emb.embedding_dim = keep.numel()
    return embeddings


def _slice_linears(model: nn.Module, fam: Family, heads: list[str], keep: torch.Tensor, tied: dict) -> None:
    """Input columns of everything reading the stream, output rows of everything writing it."""
    for layer in prunable.layers(model, fam):
        lin = prunable.linears(layer, fam)
        for key, path in (("q", fam.q), ("k", fam.k), ("v", fam.v), ("up", fam.up), ("gate", fam.gate)):
            if key in lin:
                prunable._set(layer, path, prunable._sliced(lin[key], cols=keep.to(lin[key].weight.device)))
        for key, path in (("o", fam.o), ("down", fam.down)):
            prunable._set(layer, path, prunable._sliced(lin[key], rows=keep.to(lin[key].weight.device)))
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:  # hidden -> hidden, read by the classifier: both sides
        idx = keep.to(pooler.dense.weight.device)
        pooler.dense = prunable._sliced(pooler.dense, rows=idx, cols=idx)
    for name in heads:
        head = getattr(model, name)
        if name in tied:  # the same Parameter as the (already sliced) input embeddings
            head.weight, head.in_features = tied[name].weight, keep.numel()
        else:
            prunable._set(model, name, prunable._sliced(head, cols=keep.to(head.weight.device)))


def _update_config(model: nn.Module, fam: Family, geo: Geometry, old: int, new: int) -> None:
    """hidden_size in the config and in every module caching it; the attention width stays."""
    for module in model.modules():  # e.g. LlamaMLP.hidden_size, LlamaDecoderLayer.hidden_size
        if type(getattr(module, "hidden_size", None)) is int and module.hidden_size == old:
            module.hidden_size = new
    cfg = model.config
    cfg.hidden_size = new
    if fam.name == "llama":
        cfg.head_dim = geo.head_dim
    elif geo.heads * geo.head_dim != new:
        cfg.attention_head_size = geo.head_dim  # BERT derives it from hidden_size: see compress.models


@torch.no_grad()
def slice_hidden(model: nn.Module, fam: Family, keep: torch.Tensor) -> dict:
    """Remove every hidden channel not in `keep` (sorted indices or a bool mask) from the model, in
    place; returns {"hidden": the new hidden_size}. Tied input / output embeddings stay tied."""
    old = model.config.hidden_size
    keep = _keep_index(keep, old)
    geo = Geometry.of(model.config)  # before hidden_size changes: BERT derives its head size from it
    heads = _check_supported(model, fam)
    embed = model.get_input_embeddings()
    tied = {name: embed for name in heads if getattr(model, name).weight is embed.weight}
    _slice_embeddings(model, fam, keep)
    for norm in residual_norms(model, fam):
        _slice_norm(norm, keep)
    _slice_linears(model, fam, heads, keep, tied)
    _update_config(model, fam, geo, old, keep.numel())
    original = kept_hidden(model.config, old)
    model.config.kept_hidden = [original[i] for i in keep.tolist()]  # the distillation losses read it
    return {"hidden": keep.numel()}


def kept_hidden(config, width: int | None = None) -> list[int]:
    """Original index of every hidden channel of this model (identity when never hidden-pruned)."""
    saved = getattr(config, "kept_hidden", None)
    return list(saved) if saved else list(range(width or config.hidden_size))


def channel_map(student_config, teacher_config) -> list[int] | None:
    """Positions, in the teacher's hidden states, of the student's channels (None when both have the
    same channels); the hidden-state loss compares the student with those teacher channels."""
    s, t = kept_hidden(student_config), kept_hidden(teacher_config)
    if s == t:
        return None
    where = {c: i for i, c in enumerate(t)}
    missing = [c for c in s if c not in where]
    if missing:
        raise UserError(f"the student keeps hidden channels the teacher does not have ({len(missing)}, e.g. "
                        f"{missing[:3]}): distil from the model it was pruned from, or set w_hidden=0")
    return [where[c] for c in s]


def check_kind(kind) -> list[str]:
    """Hidden-size pruning changes the output of a kind whose output IS the last hidden state (a
    sentence encoder): refused there."""
    if "last_hidden_state" in getattr(kind, "onnx_outputs", ()):
        return [("hidden pruning would change the sentence-embedding width (and every index built on the original "
                 "embeddings); it applies to causal LMs and classifiers. Prune an encoder's layers, heads and ffn")]
    return []
