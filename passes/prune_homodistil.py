"""prune.homodistil: iterative structured pruning while distilling from the original model.

HomoDistil ("Homotopic Distillation for Pre-trained Transformer Compression", Liang et al., ICLR
2023, arXiv 2302.09632). The student starts as an exact copy of the teacher; it trains with
distillation losses while a few units are pruned at a time, so the teacher-student gap stays small
all along. Importance is PLATON's (arXiv 2206.12562): sensitivity |theta * grad| smoothed by an
exponential moving average (beta1) times its uncertainty (beta2), summed over each unit's
parameters. The kept fraction follows a cubic schedule from 1 to the target between a warm-up and
a final phase, masks are refreshed every `mask_every` steps, and at the end the pruned rows and
columns are sliced away for real (a smaller, regular architecture that reloads with transformers'
own classes; see prunable.py). When to use: BERT-family encoders and Llama-family decoders that
must become smaller and faster while keeping what they know; `prune.structured` is the one-shot
baseline and the route for other architectures."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.config import PassConfig
from compress.context import PassContext
from compress.passes.lib import bare, budget, depth, hidden, prunable
from compress.passes.lib.trainer import Callbacks, tokenized, train
from compress.passes.lib.training import TrainingFields
from compress.registry import PassSpec
from compress.state import ModelState


class HomoDistil(TrainingFields):
    pass_name = "prune.homodistil"
    heads: float = Field(0.5, ge=0, lt=1, description="fraction of attention units (kv groups) to remove in every layer")
    ffn: float = Field(0.5, ge=0, lt=1, description="fraction of FFN neurons to remove in every layer")
    layers: float = Field(0.0, ge=0, lt=1, description=(
        "fraction of transformer layers to remove (when: layer_schedule; which: layer_importance); each kept layer "
        "distils from its teacher layer"))
    layer_importance: Literal["influence", "angular"] = Field("influence", description=(
        "how layers to drop are chosen: influence = 1 - cos between a layer's input and output (ShortGPT), "
        "angular = arccos of that cos / pi (Gromov et al.); both over real tokens of 32 training samples"))
    layer_schedule: Literal["start", "gradual"] = Field("start", description=(
        "start: the layers go in one shot before training, then every step trains the final depth (measured better "
        "on MiniLM, 3 of 6 layers: see docs/methods.md); gradual: one at a time over the pruning phase, the next "
        "one measured on the student then"))
    hidden: float = Field(0.0, ge=0, lt=1, description=(
        "fraction of hidden (embedding) channels removed before training, by the norms' activations (Minitron), "
        "then distilled (hidden-state loss on the teacher's kept channels); causal LMs and classifiers"))
    params: float | None = Field(**prunable.PARAMS_FIELD)
    latency: float | None = Field(**budget.LATENCY_FIELD)
    w_lm: float = Field(0.5, ge=0, le=1000, description=(
        "causal LMs: weight of the next-token cross-entropy; it also gives the importance a signal while the "
        "student still equals the teacher (Llama has no dropout to do that)"))
    mask_every: int = Field(10, ge=1, le=10000, description="steps between mask refreshes")
    initial_warmup: float = Field(0.1, ge=0, lt=1, description="fraction of steps before pruning starts (t_i)")
    final_phase: float = Field(0.3, ge=0, lt=1, description="fraction of steps at the target before the end (t_f)")
    beta1: float = Field(0.85, gt=0, lt=1, description="PLATON sensitivity moving-average factor")
    beta2: float = Field(0.95, gt=0, lt=1, description="PLATON uncertainty moving-average factor")

    @model_validator(mode="after")
    def _phases(self) -> "HomoDistil":
        if self.initial_warmup + self.final_phase >= 1:
            raise ValueError(f"initial_warmup + final_phase must be < 1 (got {self.initial_warmup} + {self.final_phase})")
        if self.heads == 0 and self.ffn == 0 and self.layers == 0 and self.hidden == 0:
            raise ValueError("nothing to prune: set heads, ffn, layers and/or hidden above 0")
        if self.layers > 0 and self.w_attention > 0:
            raise ValueError("the attention-map loss cannot follow dropped layers: set w_attention=0 with layers")
        t_i, last = int(self.steps * self.initial_warmup), self.steps - int(self.steps * self.final_phase) - 1
        if last <= t_i:
            raise ValueError(f"{self.steps} steps leave no pruning phase between the warm-up (step {t_i}) and the "
                             f"final phase (from step {last + 1}): raise steps or lower initial_warmup / final_phase")
        return self


def remaining(step: int, target: float, t_i: int, last: int) -> float:
    """Cubic schedule: 1 until t_i, r_T + (1 - r_T)(1 - (t - t_i)/(last - t_i))^3 up to `last`
    (= T - t_f - 1, the last pruning step), r_T from there on."""
    if step < t_i:
        return 1.0
    if step >= last:
        return target
    progress = min(1.0, (step - t_i) / max(1, last - t_i))
    return target + (1 - target) * (1 - progress) ** 3


class Platon(Callbacks):
    """PLATON importance of every prunable parameter, and the masks it implies over time."""

    def __init__(self, model: torch.nn.Module, cfg: HomoDistil, fam: prunable.Family, geo: prunable.Geometry,
                 calibration: dict[str, torch.Tensor] | None = None, forward_kwargs: dict | None = None):
        self.cfg, self.fam, self.geo = cfg, fam, geo
        gradual = depth.removal_count(geo.layers, cfg.layers) if cfg.layer_schedule == "gradual" else 0
        self.depth = depth.Dropper(model, fam, gradual, cfg.layer_importance, calibration or {}, forward_kwargs)
        self.masks = prunable.Masks.full(geo)
        self.names = self._prunable_names(model)
        self.ibar: dict[str, torch.Tensor] = {}
        self.ubar: dict[str, torch.Tensor] = {}
        self.t_i = int(cfg.steps * cfg.initial_warmup)
        self.last = max(self.t_i, cfg.steps - int(cfg.steps * cfg.final_phase) - 1)  # last step that prunes

    def _prunable_names(self, model: torch.nn.Module) -> list[str]:
        wanted = {id(p) for layer in prunable.layers(model, self.fam)
                  for lin in prunable.linears(layer, self.fam).values() for p in lin.parameters()}
        return [n for n, p in model.named_parameters() if id(p) in wanted]

    def after_backward(self, step: int, model: torch.nn.Module) -> None:
        if step > self.last or self.cfg.heads == self.cfg.ffn == 0:  # masks final or none: no importance needed
            return
        params = dict(model.named_parameters())
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        with torch.no_grad():
            for name in self.names:
                p = params[name]
                if p.grad is None:
                    continue
                sens = (p * p.grad).abs()
                if name in self.ibar and self.ibar[name].device != sens.device:  # after a resume (saved on CPU)
                    self.ibar[name], self.ubar[name] = self.ibar[name].to(sens.device), self.ubar[name].to(sens.device)
                if name not in self.ibar:
                    self.ibar[name], self.ubar[name] = sens.clone(), torch.zeros_like(sens)
                else:
                    self.ibar[name].mul_(b1).add_(sens, alpha=1 - b1)
                    self.ubar[name].mul_(b2).add_((sens - self.ibar[name]).abs(), alpha=1 - b2)

    def keep_counts(self, step: int) -> tuple[int, int]:
        r_h = remaining(step, 1 - self.cfg.heads, self.t_i, self.last)
        r_f = remaining(step, 1 - self.cfg.ffn, self.t_i, self.last)
        return prunable.keep_count(self.geo.kv_heads, 1 - r_h), prunable.keep_count(self.geo.ffn, 1 - r_f)

    def layers_dropped(self, step: int) -> int:
        """Layers gone by `step`: evenly spaced over the pruning phase, the last one at its end."""
        if step < self.t_i or not self.depth.remove:
            return 0
        progress = min(1.0, (step - self.t_i + 1) / max(1, self.last - self.t_i + 1))
        return int(self.depth.remove * progress + 1e-9)

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        self.depth.drop_to(model, self.layers_dropped(step))
        refresh = (step - self.t_i) % self.cfg.mask_every == 0 or step == self.last
        if self.t_i <= step <= self.last and refresh and self.ibar:
            params = dict(model.named_parameters())
            scores = {id(params[n]): self.ibar[n] * self.ubar[n] for n in self.ibar}
            magnitude = {id(params[n]): params[n].detach() ** 2 for n in self.ibar}
            heads, ffn = prunable.unit_scores(model, self.fam, self.geo, scores)
            # ties (a unit whose every score is 0) are broken by weight magnitude, never by index
            heads, ffn = [_tie_break(s, m) for s, m in zip((heads, ffn), prunable.unit_scores(model, self.fam, self.geo, magnitude))]
            self.masks = prunable.top_masks(heads, ffn, *self.keep_counts(step), previous=self.masks)
        prunable.apply_masks(model, self.fam, self.geo, self.masks)

    def head_keep(self) -> list[torch.Tensor]:
        return [m.repeat_interleave(self.geo.group) for m in self.masks.heads]

    def layer_pairs(self) -> list[tuple[int, int]] | None:
        return self.depth.pairs()

    def describe(self) -> str:
        return self.depth.describe() + f" heads {int(self.masks.heads[0].sum())}/{self.geo.kv_heads} ffn {int(self.masks.ffn[0].sum())}/{self.geo.ffn}"

    def state_dict(self) -> dict:
        return {"masks": self.masks.state(), "ibar": self.ibar, "ubar": self.ubar, "depth": self.depth.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.masks = prunable.Masks(state["masks"]["heads"], state["masks"]["ffn"])
        self.ibar, self.ubar = state["ibar"], state["ubar"]  # moved to the parameters' device on first use
        self.depth.load_state_dict(state["depth"])


def _tie_break(scores: list[torch.Tensor], magnitude: list[torch.Tensor]) -> list[torch.Tensor]:
    """Ranks by PLATON score, equal scores ordered by weight magnitude (lexicographic, exact)."""
    out = []
    for s, m in zip(scores, magnitude):
        by_magnitude = torch.argsort(m, stable=True)
        order = by_magnitude[torch.argsort(s[by_magnitude], stable=True)]  # ascending score, then magnitude
        ranks = torch.empty_like(s, dtype=torch.float32)
        ranks[order] = torch.arange(len(s), dtype=torch.float32, device=s.device)
        out.append(ranks)
    return out


def _drop_at_start(student: nn.Module, fam: prunable.Family, cfg: HomoDistil, calibration: dict, kind: Any) -> list[int]:
    """layer_schedule=start: the layers of lowest importance removed before training (original indices)."""
    if cfg.layer_schedule != "start":
        return []
    return depth.prune(student, fam, calibration, cfg.layers, cfg.layer_importance, kind.forward_kwargs())


def apply(model: nn.Module, teacher: nn.Module | None, tokenizer: Any, data: Any, cfg: HomoDistil | None = None, *,
          notes: dict | None = None, workdir: Path | str | None = None, progress: bool = True, pooling: str = "mean",
          kind: str | None = None, ctx: PassContext | None = None) -> nn.Module:
    """HomoDistil on a bare transformers model (BERT or Llama family): returns a new, pruned model in
    eval mode; `model` and `teacher` keep their weights (the teacher is put in eval mode).

    teacher: the model to distil from; None = an untouched copy of `model` (what the pipeline does
    when this is the first pass). tokenizer: the model's. data: a list of training strings, or a
    `compress.data.TextData` (its train part only). cfg: default `HomoDistil()`.
    notes: a dict to receive notes["pruning"] (shapes and parameters before / after, training
    stats), what the pipeline's report records. workdir: where checkpoints go while training
    (default: a temporary folder, removed). progress: False for no progress bar. pooling: encoders:
    "mean" or "cls", how the embedding the output loss compares is pooled. kind: "encoder",
    "classifier" or "causal-lm" (default: read from the model's config). ctx: the pipeline's
    context, given by run(); leave it None."""
    cfg = cfg or HomoDistil()
    kind = bare.prepare(cfg, model, data, ctx, kind)
    texts = bare.texts(data, cfg.pass_name)  # training part only, never held-out
    teacher = teacher if teacher is not None else copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    fam = prunable.family_of(student.config)
    before = sum(p.numel() for p in student.parameters())
    tokens = tokenized(tokenizer, texts, cfg.max_length, cfg.windows)
    calibration = {k: v[:32] for k, v in tokens.items()}  # where channels and the next layer to drop are measured
    width = student.config.hidden_size
    with bare.context(ctx, workdir, progress) as c:
        cfg, chosen = budget.solve(cfg, student, fam, kind, tokenizer, texts, c.console)
        if cfg.hidden:  # one shot before training, as Minitron does; distillation then recovers
            scores = hidden.hidden_scores(student, fam, calibration, forward_kwargs=kind.forward_kwargs())
            hidden.slice_hidden(student, fam, hidden.keep_channels(scores, cfg.hidden))
        removed = _drop_at_start(student, fam, cfg, calibration, kind)
        geo = prunable.Geometry.of(student.config)
        cfg = prunable.targets(cfg, student, fam, geo)
        callbacks = Platon(student, cfg, fam, geo, calibration, kind.forward_kwargs())
        # Before anything is pruned the student equals the teacher and the loss (so every gradient) is 0:
        # dropout during the warm-up gives PLATON a loss to measure sensitivity on (the paper fine-tunes
        # with dropout on throughout).
        settings = cfg.settings(dropout_steps=callbacks.t_i)
        stats = train(student, teacher, kind, tokens, settings, cfg.loss_weights(pooling), c.workdir, c.key,
                      c.console, callbacks, resume=c.resume, label="homodistil")
        (c.workdir / "checkpoint.pt").unlink(missing_ok=True)
    shape = prunable.slice_model(student, fam, geo, callbacks.masks)
    shape.update(callbacks.depth.finish(student))
    after = sum(p.numel() for p in student.parameters())
    if notes is not None:
        notes["pruning"] = {"before": {"layers": geo.layers + len(removed), "hidden": width, "heads": geo.heads, "kv_heads": geo.kv_heads,
                                       "ffn": geo.ffn, "params": before},
                            "after": {"layers": student.config.num_hidden_layers, "hidden": student.config.hidden_size,
                                      **shape, "params": after},
                            "train": stats, "fractions": {"layers": cfg.layers, "hidden": cfg.hidden, "heads": cfg.heads,
                                                          "ffn": cfg.ffn}, **({"budget": chosen} if chosen else {}),
                            **({"layers_removed": removed} if removed else {})}
    return student.eval()


def run(state: ModelState, cfg: HomoDistil, ctx: PassContext) -> ModelState:
    student = apply(state.model, state.teacher, state.tokenizer, state.data, cfg, notes=ctx.notes,
                    pooling=state.meta.get("pooling", "mean"), kind=state.kind, ctx=ctx)
    return state.with_torch(student)


def proxy(cfg: HomoDistil) -> PassConfig:
    """The stand-in `compress search` times and ranks first: the same targets cut in one shot by
    prune.structured (activation importance, layers by the same measure), no training. It leaves the
    architecture this pass would, so its latency and size are this pass's."""
    from compress.passes.prune_structured import PruneStructured

    return PruneStructured(heads=cfg.heads, ffn=cfg.ffn, layers=cfg.layers, layer_importance=cfg.layer_importance,
                           hidden=cfg.hidden, params=cfg.params, latency=cfg.latency, importance="activation")


PASS = PassSpec(name="prune.homodistil", config=HomoDistil, run=run, takes=("torch",), gives="torch",
                needs_data=lambda cfg: True, proxy=proxy,
                check=lambda cfg, info: prunable.check_supported(info) + prunable.budget_problems(cfg) + budget.problems(cfg)
                + (hidden.check_kind(info.kind) if cfg.hidden else []),
                summary="Iterative structured pruning of heads and FFN neurons while distilling from the input model (HomoDistil).")
