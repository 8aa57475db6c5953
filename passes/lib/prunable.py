"""Per-family description of what structured pruning may remove, and the surgery that removes it.

A unit of attention is one key/value head with the query heads that share it (GQA-consistent: a
Llama layer with 9 query / 3 kv heads has 3 units of 3 query heads; a BERT layer with 12 heads has
12 units of 1). A unit of the FFN is one intermediate neuron (row of up/gate, column of down).
While training, pruned units are zeroed (`apply_masks`), which computes exactly what the sliced
model computes; at the end `slice_model` cuts the rows/columns away for real and updates the config,
with the same count in every layer so the result is a regular architecture."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from compress.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str  # ModuleList under the base model
    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    gate: str | None = None


FAMILIES = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra"), "encoder.layer",
           "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"),
    Family("llama", ("llama", "qwen2", "mistral"), "layers", "self_attn.q_proj", "self_attn.k_proj",
           "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj", gate="mlp.gate_proj"),
)
def by_model_type(config: Any, table: Iterable[Any], refusal: str) -> Any:
    """The entry of `table` (items with `model_types`) holding the config's model_type; otherwise a
    UserError from `refusal`, formatted with {model_type} and {supported} (the table's types)."""
    model_type = getattr(config, "model_type", "?")
    for entry in table:
        if model_type in entry.model_types:
            return entry
    supported = ", ".join(sorted(t for entry in table for t in entry.model_types))
    raise UserError(refusal.format(model_type=model_type, supported=supported))


def family_of(config: Any) -> Family:
    return by_model_type(config, FAMILIES, "structured pruning does not support model_type '{model_type}': supported "
                                           "are {supported} (use prune.structured for other architectures)")


def supported_problems(info: Any, lookup: Callable[[Any], Any]) -> list[str]:
    """Validation before any work: `lookup(config)` (a family or architecture table) must accept the
    input's config when the input is a torch model folder; its UserError becomes the problem."""
    if info.path is None or info.form != "torch":
        return []
    from compress.models import read_hf_config

    try:
        lookup(read_hf_config(info.path, info.trust_remote_code))
    except UserError as exc:
        return [str(exc)]
    return []


def check_supported(info: Any) -> list[str]:
    """The input must be a torch model of a supported family."""
    return supported_problems(info, family_of)


@dataclass(frozen=True)
class Geometry:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @property
    def group(self) -> int:  # query heads per kv head
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, config: Any) -> "Geometry":
        heads = config.num_attention_heads
        head_dim = getattr(config, "attention_head_size", None) or getattr(config, "head_dim", None) \
            or config.hidden_size // heads
        return cls(config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads,
                   head_dim, config.intermediate_size)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def layers(model: nn.Module, fam: Family) -> list[nn.Module]:
    return list(_get(model.base_model, fam.layers))


def linears(layer: nn.Module, fam: Family) -> dict[str, nn.Linear]:
    names = {"q": fam.q, "k": fam.k, "v": fam.v, "o": fam.o, "up": fam.up, "down": fam.down}
    if fam.gate:
        names["gate"] = fam.gate
    return {key: _get(layer, path) for key, path in names.items()}


def head_index(geo: Geometry, keep_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of q (and columns of o), rows of k/v, for the kept units (a bool mask over kv heads)."""
    units = torch.nonzero(keep_units).flatten()
    hd, g = geo.head_dim, geo.group
    q_rows = torch.cat([torch.arange(u * g * hd, (u + 1) * g * hd) for u in units.tolist()] or [torch.empty(0, dtype=torch.long)])
    kv_rows = torch.cat([torch.arange(u * hd, (u + 1) * hd) for u in units.tolist()] or [torch.empty(0, dtype=torch.long)])
    return q_rows, kv_rows


@dataclass
class Masks:
    heads: list[torch.Tensor]  # per layer, bool (kv_heads,)
    ffn: list[torch.Tensor]  # per layer, bool (ffn,)

    @classmethod
    def full(cls, geo: Geometry) -> "Masks":
        return cls([torch.ones(geo.kv_heads, dtype=torch.bool) for _ in range(geo.layers)],
                   [torch.ones(geo.ffn, dtype=torch.bool) for _ in range(geo.layers)])

    def state(self) -> dict:
        return {"heads": [m.clone() for m in self.heads], "ffn": [m.clone() for m in self.ffn]}


def _zero_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    lin.weight[rows] = 0
    if lin.bias is not None:
        lin.bias[rows] = 0


@torch.no_grad()
def apply_masks(model: nn.Module, fam: Family, geo: Geometry, masks: Masks) -> None:
    """Zero every pruned unit's parameters: output identical to the sliced model."""
    for layer, hm, fm in zip(layers(model, fam), masks.heads, masks.ffn):
        lin = linears(layer, fam)
        q_rows, kv_rows = head_index(geo, ~hm)
        for key, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            _zero_rows(lin[key], rows)
        lin["o"].weight[:, q_rows] = 0
        drop = torch.nonzero(~fm).flatten()
        for key in ("up", "gate"):
            if key in lin:
                _zero_rows(lin[key], drop)
        lin["down"].weight[:, drop] = 0


def unit_scores(model: nn.Module, fam: Family, geo: Geometry, score: dict[int, torch.Tensor]) -> tuple[list, list]:
    """Sum per-element scores (keyed by id(parameter)) into per-unit scores, per layer. The scores of
    o and down are required; a q/k/v/up/gate parameter without a score adds nothing."""
    heads, ffn = [], []
    for layer in layers(model, fam):
        lin = linears(layer, fam)

        def s(p: torch.Tensor | None) -> torch.Tensor | None:
            return None if p is None else score.get(id(p))

        hd, g = geo.head_dim, geo.group
        h = torch.zeros(geo.kv_heads, device=lin["q"].weight.device)
        for key, per in (("q", g * hd), ("k", hd), ("v", hd)):
            for p in (lin[key].weight, lin[key].bias):
                if s(p) is not None:
                    h += s(p).reshape(geo.kv_heads, per, -1).sum(dim=(1, 2))
        h += s(lin["o"].weight).reshape(-1, geo.kv_heads, g * hd).sum(dim=(0, 2))
        f = s(lin["down"].weight).sum(0).clone()
        for key in ("up", "gate"):  # a score may leave these out (importance=activation scores down only)
            if key in lin:
                if s(lin[key].weight) is not None:
                    f += s(lin[key].weight).sum(1)
                if s(lin[key].bias) is not None:
                    f += s(lin[key].bias)
        heads.append(h)
        ffn.append(f)
    return heads, ffn


def keep_count(units: int, fraction_removed: float) -> int:
    """Units left after removing `fraction_removed` of `units` (at least 1); exact for decimal
    fractions: 10 units at 0.7 keep 3, where ceil(10 * 0.3) would keep 4 (0.3 is 0.30000000000000004)."""
    return max(1, units - math.floor(units * fraction_removed + 1e-9))


def top_masks(heads: list[torch.Tensor], ffn: list[torch.Tensor], keep_heads: int, keep_ffn: int,
              previous: Masks | None = None) -> Masks:
    """Keep the `keep_*` best units in every layer; units pruned before stay pruned."""
    def pick(scores: torch.Tensor, k: int, prev: torch.Tensor | None) -> torch.Tensor:
        scores = scores.clone().float()
        if prev is not None:
            scores[~prev] = -float("inf")
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[torch.topk(scores, k).indices] = True
        return mask.cpu()

    return Masks([pick(h, keep_heads, previous.heads[i] if previous else None) for i, h in enumerate(heads)],
                 [pick(f, keep_ffn, previous.ffn[i] if previous else None) for i, f in enumerate(ffn)])


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    b = lin.bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    new.weight.data = w.clone()
    if b is not None:
        new.bias.data = (b.data[rows] if rows is not None else b.data).clone()
    return new


def _set(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(layer, parent) if parent else layer, name, module)


@torch.no_grad()
def slice_model(model: nn.Module, fam: Family, geo: Geometry, masks: Masks) -> dict:
    """Cut pruned rows/columns away for real and update module attributes and the config."""
    kept_units = int(masks.heads[0].sum())
    kept_ffn = int(masks.ffn[0].sum())
    if any(int(m.sum()) != kept_units for m in masks.heads) or any(int(m.sum()) != kept_ffn for m in masks.ffn):
        raise ValueError("every layer must keep the same number of units for a regular architecture")
    for layer, hm, fm in zip(layers(model, fam), masks.heads, masks.ffn):
        lin = linears(layer, fam)
        q_rows, kv_rows = head_index(geo, hm)
        keep = torch.nonzero(fm).flatten()
        _set(layer, fam.q, _sliced(lin["q"], rows=q_rows))
        _set(layer, fam.k, _sliced(lin["k"], rows=kv_rows))
        _set(layer, fam.v, _sliced(lin["v"], rows=kv_rows))
        _set(layer, fam.o, _sliced(lin["o"], cols=q_rows))
        _set(layer, fam.up, _sliced(lin["up"], rows=keep))
        if fam.gate:
            _set(layer, fam.gate, _sliced(lin["gate"], rows=keep))
        _set(layer, fam.down, _sliced(lin["down"], cols=keep))
        attn = _get(layer, fam.q.rpartition(".")[0])
        if hasattr(attn, "all_head_size"):  # BERT self-attention keeps these as attributes
            attn.num_attention_heads = kept_units * geo.group
            attn.all_head_size = kept_units * geo.group * geo.head_dim
    cfg = model.config
    cfg.num_attention_heads = kept_units * geo.group
    cfg.intermediate_size = kept_ffn
    if fam.name == "llama":
        cfg.num_key_value_heads = kept_units
        cfg.head_dim = geo.head_dim
    elif cfg.num_attention_heads * geo.head_dim != cfg.hidden_size:
        cfg.attention_head_size = geo.head_dim  # BERT derives it from hidden_size: see compress.models
    return {"heads": cfg.num_attention_heads, "kv_heads": kept_units, "ffn": kept_ffn}


def unit_params(model: nn.Module, fam: Family, geo: Geometry) -> tuple[int, int]:
    """Parameters one kv unit (its query heads, k/v rows, o columns) and one FFN neuron hold in ONE
    layer: what slice_model removes per unit (biases of row-sliced linears included)."""
    lin = linears(layers(model, fam)[0], fam)

    def rows(key: str, units: int) -> int:
        m = lin[key]
        return (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)) // units

    head = rows("q", geo.kv_heads) + rows("k", geo.kv_heads) + rows("v", geo.kv_heads) + lin["o"].weight.numel() // geo.kv_heads
    neuron = rows("up", geo.ffn) + (rows("gate", geo.ffn) if fam.gate else 0) + lin["down"].weight.numel() // geo.ffn
    return head, neuron


def fractions_for_budget(model: nn.Module, fam: Family, geo: Geometry, keep: float,
                         kinds: tuple[str, ...] = ("heads", "ffn")) -> dict[str, float]:
    """The smallest fraction f, removed alike from each kind in `kinds`, that leaves at most `keep` of
    the model's parameters (same count in every layer; the fractions are on the grid of unit counts).
    Raises ValueError naming the reachable minimum when even the largest removal leaves more."""
    head, neuron = unit_params(model, fam, geo)
    before = sum(p.numel() for p in model.parameters())

    def after(f: float) -> int:
        h = geo.kv_heads - keep_count(geo.kv_heads, f) if "heads" in kinds else 0
        n = geo.ffn - keep_count(geo.ffn, f) if "ffn" in kinds else 0
        return before - geo.layers * (h * head + n * neuron)

    grid = sorted({i / geo.ffn for i in range(geo.ffn)} | {i / geo.kv_heads for i in range(geo.kv_heads)})
    for f in grid:
        if after(f) <= keep * before:
            return {k: round(f, 6) for k in kinds}
    raise ValueError(f"params={keep} is out of reach by pruning {' and '.join(kinds)}: the most they can remove leaves "
                     f"{after(grid[-1]) / before:.3f} of the {before:,} parameters (embeddings, norms and one unit per "
                     "layer stay)")


PARAMS_FIELD = dict(default=None, gt=0, lt=1, description=(
    "instead of heads / ffn: keep at most this fraction of the model's parameters, the same fraction removed from "
    "heads and FFN neurons (a kind set to 0 stays whole)"))


def budget_problems(cfg: Any) -> list[str]:
    """Checks of the `params` budget against the fraction fields, before any work."""
    if cfg.params is None:
        return []
    other = {k: getattr(cfg, k) for k in ("layers", "hidden") if getattr(cfg, k, 0) > 0}
    if other:
        return [f"params solves heads and ffn only: give either params or {', '.join(f'{k}={v}' for k, v in other.items())} "
                "(with heads / ffn fractions)"]
    fixed = {k: getattr(cfg, k) for k in ("heads", "ffn") if k in cfg.model_fields_set}
    if any(v > 0 for v in fixed.values()):
        return [f"give either params or fractions ({', '.join(f'{k}={v}' for k, v in fixed.items())}); with params, "
                "heads=0 or ffn=0 keeps that kind whole"]
    if len(fixed) == 2:
        return ["params with heads=0 and ffn=0 leaves nothing to prune"]
    return []


def targets(cfg: Any, model: nn.Module, fam: Family, geo: Geometry) -> Any:
    """`cfg` with heads / ffn solved from its `params` budget (unchanged without one)."""
    if cfg.params is None:
        return cfg
    kinds = tuple(k for k in ("heads", "ffn") if k not in cfg.model_fields_set)
    solved = {"heads": 0.0, "ffn": 0.0, **fractions_for_budget(model, fam, geo, cfg.params, kinds)}
    return cfg.model_copy(update=solved)
