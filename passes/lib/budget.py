"""A latency budget turned into pruning targets, measured on this machine, before any training.

`latency=0.5` asks for a model whose int8 ONNX graph runs in at most half the time of the unpruned
model's int8 graph. Which architecture that is depends on the machine and the runtime, not on
parameter counts (embeddings, norms and per-op overhead do not shrink with width), so it is
measured: every candidate architecture on a grid of layers x (heads, FFN) fractions is built
with the model's own weights sliced to its shape (the values do not matter for timing), sent
through the same export.onnx + optimize.ort + quant.int8 passes a recipe uses, and timed
interleaved with the unpruned model's int8 graph (batch 1, `seq` tokens of real training text).
Latency is close to affine in depth for a given width (fixed cost + layers x per-layer cost), so
each width is built at two depths and the others are interpolated; the model's own depth and the
chosen candidate are always measured exactly.

Among the candidates that fit, the most accurate by a proxy is chosen: each is pruned one-shot
(layers by block influence, heads and FFN by calibration activations) and its distillation output
loss against the unpruned model is measured on training text (never the held-out split); the
lowest loss wins. A budget no candidate meets is refused with the fastest one reachable."""
from __future__ import annotations

import copy
import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.passes.lib import activations, depth, prunable

WIDTHS = (0.0, 0.25, 0.5, 0.75)  # fractions of heads and of FFN neurons removed


@dataclass(frozen=True)
class Shape:
    """Fractions removed per axis."""

    layers: float
    heads: float
    ffn: float

    def label(self, geo: prunable.Geometry) -> str:
        return (f"{prunable.keep_count(geo.layers, self.layers)} layers, {prunable.keep_count(geo.kv_heads, self.heads)}"
                f"/{geo.kv_heads} head groups, FFN {prunable.keep_count(geo.ffn, self.ffn)}/{geo.ffn}")


def layer_fraction(layers: int, keep: int) -> float:
    """The fraction that keeps exactly `keep` of `layers` (keep_count's inverse)."""
    return round((layers - keep) / layers, 6)


def grid(geo: prunable.Geometry) -> list[Shape]:
    return [Shape(layer_fraction(geo.layers, keep), h, f)
            for keep, h, f in itertools.product(range(geo.layers, 0, -1), WIDTHS, WIDTHS)]


def sliced(model: nn.Module, fam: prunable.Family, shape: Shape) -> nn.Module:
    """A copy of `model` cut to `shape` (the first units / last layers go: only the shape matters)."""
    m = copy.deepcopy(model)
    geo = prunable.Geometry.of(m.config)
    keep_layers = prunable.keep_count(geo.layers, shape.layers)
    if keep_layers < geo.layers:
        depth.drop_layers(m, fam, list(range(keep_layers, geo.layers)))
        geo = prunable.Geometry.of(m.config)
    masks = prunable.Masks.full(geo)
    kh, kf = prunable.keep_count(geo.kv_heads, shape.heads), prunable.keep_count(geo.ffn, shape.ffn)
    for h, f in zip(masks.heads, masks.ffn):
        h[kh:], f[kf:] = False, False
    prunable.slice_model(m, fam, geo, masks)
    return m.eval()


def int8_latencies(models: dict[str, nn.Module], tokenizer: Any, texts: list[str], seq: int, threads: int,
                   runs: int = 60) -> dict[str, float]:
    """p50 ms of each model after export.onnx + optimize.ort + quant.int8, timed interleaved."""
    from rich.console import Console

    from compress import Pipeline
    from compress.profiling import LatencySettings, real_feed, time_interleaved
    from compress.runtime import OnnxRunner

    settings = LatencySettings(batch=1, seq=seq, threads=threads, warmup=5, runs=runs)
    calls: dict[str, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory(prefix="compress-budget-") as tmp:
        data = Path(tmp) / "text.txt"
        data.write_text("\n".join(t.replace("\n", " ") for t in texts[:32]) + "\n")
        for i, (name, model) in enumerate(models.items()):
            out = Path(tmp) / f"c{i}"
            Pipeline(["export.onnx", "optimize.ort", "quant.int8"]).run(
                model, str(data), out, tokenizer=tokenizer, measure="off", tasks=False, console=Console(quiet=True))
            runner = OnnxRunner(out / "model.onnx", _kind_of(model), threads=threads)
            inputs = runner.feed(real_feed(tokenizer, texts, 1, seq))
            calls[name] = lambda r=runner, x=inputs: r.sess.run(None, x)
        lat = time_interleaved(calls, settings, rounds=5)
    return {name: lat[name]["p50"] for name in calls}


def _kind_of(model: nn.Module) -> Any:
    from compress import kinds

    return kinds.of_module(model)


def estimated(geo: prunable.Geometry, measured: dict[Shape, float]) -> dict[Shape, float]:
    """Latency of every grid shape: exact where measured, else affine in depth between the two
    measured depths of the same width."""
    out = dict(measured)
    for shape in grid(geo):
        if shape in out:
            continue
        pts = sorted((prunable.keep_count(geo.layers, s.layers), v) for s, v in measured.items()
                     if (s.heads, s.ffn) == (shape.heads, shape.ffn))
        (l0, v0), (l1, v1) = pts[0], pts[-1]
        keep = prunable.keep_count(geo.layers, shape.layers)
        out[shape] = v0 + (v1 - v0) * (keep - l0) / max(l1 - l0, 1)
    return out


class Proxy:
    """One-shot pruned candidates scored against the unpruned model on training text: the kind's
    distillation output loss (lower = closer to the teacher). Importance is measured once on the
    full model: block influence for layers, calibration activations for heads and FFN neurons."""

    def __init__(self, model: nn.Module, fam: prunable.Family, kind: Any, data: dict[str, torch.Tensor]):
        from compress.passes.lib.losses import LossWeights

        self.model, self.fam, self.kind, self.data = model.eval(), fam, kind, data
        self.weights = LossWeights(hidden=0.0)
        kw = kind.forward_kwargs()
        self.influence = depth.span_distances(model, fam, data, forward_kwargs=kw)
        geo = prunable.Geometry.of(model.config)
        self.heads, self.ffn = prunable.unit_scores(model, fam, geo, activations.unit_element_scores(model, data, kw))
        with torch.no_grad():
            self.target = kind.train_forward(model, data, False)

    def pruned(self, shape: Shape) -> nn.Module:
        m = copy.deepcopy(self.model)
        geo = prunable.Geometry.of(m.config)
        drop = depth.lowest(self.influence, depth.removal_count(geo.layers, shape.layers))
        kept = [i for i in range(geo.layers) if i not in drop]
        if drop:
            depth.drop_layers(m, self.fam, drop)
        masks = prunable.top_masks([self.heads[i] for i in kept], [self.ffn[i] for i in kept],
                                   prunable.keep_count(geo.kv_heads, shape.heads), prunable.keep_count(geo.ffn, shape.ffn))
        prunable.slice_model(m, self.fam, prunable.Geometry.of(m.config), masks)
        return m.eval()

    @torch.no_grad()
    def loss(self, shape: Shape) -> float:
        out = self.kind.train_forward(self.pruned(shape), self.data, False)
        return float(self.kind.output_loss(out, self.target, self.data["attention_mask"], self.weights))


@dataclass
class Choice:
    shape: Shape
    ratio: float  # measured int8 latency over the unpruned int8 model's
    table: list[dict]  # the fitting candidates, best proxy first (up to 8): latency ratio as estimated when
    # choosing (measured at probed shapes, interpolated in depth otherwise), proxy loss

    def as_dict(self, geo: prunable.Geometry, target: float) -> dict:
        return {"target": target, "chosen": self.shape.label(geo), "fractions": vars(self.shape),
                "measured_ratio": round(self.ratio, 3), "candidates": self.table}


def choose(model: nn.Module, fam: prunable.Family, kind: Any, tokenizer: Any, texts: list[str], target: float,
           seq: int = 128, threads: int = 2, status: Callable[[str], None] = lambda msg: None) -> Choice:
    """The most accurate-by-proxy shape whose int8 latency is at most `target` x the unpruned model's;
    UserError naming the fastest reachable when none is."""
    from compress.passes.lib.trainer import tokenized

    geo = prunable.Geometry.of(model.config)
    full = Shape(0.0, 0.0, 0.0)
    probes = {Shape(layer_fraction(geo.layers, keep), h, f)
              for h, f in itertools.product(WIDTHS, WIDTHS) for keep in {geo.layers, 1}}
    status(f"timing {len(probes)} candidate architectures (int8 ONNX, batch 1, {seq} tokens)")
    lat = int8_latencies({s: sliced(model, fam, s) for s in sorted(probes, key=repr)}, tokenizer, texts, seq, threads)
    ratios = {s: v / lat[full] for s, v in estimated(geo, lat).items()}
    fitting = [s for s, r in ratios.items() if r <= target]
    if not fitting:
        fastest = min(ratios, key=ratios.get)
        raise UserError(f"latency={target} is out of reach on this machine: the fastest candidate "
                        f"({fastest.label(geo)}) runs at {ratios[fastest]:.2f}x the unpruned int8 model; give "
                        f"latency >= {ratios[fastest]:.2f}")
    status(f"ranking {len(fitting)} candidates that fit by one-shot pruning on training text")
    proxy = Proxy(model, fam, kind, tokenized(tokenizer, texts[:16], seq))
    losses = {s: proxy.loss(s) for s in fitting}
    scored = sorted(fitting, key=lambda s: (losses[s], ratios[s]))
    best = scored[0]
    measured = ratios[best]
    if best not in lat:  # interpolated: measure it exactly, next to the unpruned model
        exact = int8_latencies({full: sliced(model, fam, full), best: sliced(model, fam, best)}, tokenizer, texts, seq, threads)
        measured = exact[best] / exact[full]
    table = [{"shape": s.label(geo), "latency_ratio": round(ratios[s], 3), "proxy_loss": round(losses[s], 5),
              "measured": s in lat} for s in scored[:8]]
    return Choice(best, measured, table)


LATENCY_FIELD = dict(default=None, gt=0, lt=1, description=(
    "instead of fractions: the int8 ONNX model must run in at most this fraction of the unpruned int8 model's time "
    "(batch 1, 128 tokens, this machine); candidate architectures are timed, the most accurate by a one-shot proxy wins"))


def problems(cfg: Any) -> list[str]:
    """Checks of a `latency` budget against the other target fields, before any work."""
    if getattr(cfg, "latency", None) is None:
        return []
    given = {k: getattr(cfg, k) for k in ("layers", "heads", "ffn", "hidden") if k in cfg.model_fields_set}
    given.update({"params": cfg.params} if cfg.params is not None else {})
    if given:
        return [(f"give either latency or {', '.join(f'{k}={v}' for k, v in given.items())}: a latency budget chooses "
                 "layers, heads and ffn itself (hidden is not searched)")]
    return []


def solve(cfg: Any, model: nn.Module, fam: prunable.Family, kind: Any, tokenizer: Any, texts: list[str],
          console: Any) -> tuple[Any, dict | None]:
    """`cfg` with layers / heads / ffn chosen for its latency budget (unchanged without one), and the
    record of the choice for the report."""
    if getattr(cfg, "latency", None) is None:
        return cfg, None
    geo = prunable.Geometry.of(model.config)
    with console.status("latency budget") as st:
        choice = choose(model, fam, kind, tokenizer, texts, cfg.latency, threads=torch.get_num_threads(),
                        status=lambda msg: st.update(f"latency budget: {msg}"))
    record = choice.as_dict(geo, cfg.latency)
    console.print(f"    latency budget {cfg.latency}: {record['chosen']} (int8 at {choice.ratio:.2f}x the unpruned model)")
    return cfg.model_copy(update=vars(choice.shape)), record
