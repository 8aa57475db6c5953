"""prune.sparse: unstructured or n:m sparsity of a transformers model's Linear layers (magnitude, Wanda,
SparseGPT; passes/lib/sparse.py).

Every Linear of every encoder / decoder layer (attention q/k/v/o, FFN) gets `sparsity` of its weights set to
exactly 0, or n of every m consecutive input weights of each row (`pattern=2:4`); the embeddings, norms and
lm_head stay dense (a Gather and the output layer: pruning them costs the most, as SparseGPT and Wanda leave
them too). Wanda and SparseGPT calibrate layer by layer on `samples` windows of `max_length` training tokens,
each layer measured with the layers before it already pruned (passes/lib/sequential.py).

The model keeps its architecture and its dense tensors: the zeros are the deliverable, for coders that
compress them (export.riq: RIQ's entropy coder spends about 1 bit a weight on a 50% mask and nothing on a
zero's value) and for runtimes with sparse kernels. onnxruntime's CPU MatMul has none, so a sparse model
runs at the dense model's speed there (measured in README). distill.kd later in the pipeline keeps the zeros (its
`keep_zeros`), and quant.riq's rounding keeps them exactly 0.
When to use: before quant.riq / export.riq for the smallest file; before distill.kd at high sparsity."""
from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from compress.context import PassContext
from compress.config import PassConfig
from compress.errors import UserError
from compress.passes.lib import bare, prunable, sequential, sparse
from compress.passes.lib.gptq import output_error
from compress.registry import PassSpec
from compress.report import md_table, stage_label
from compress.state import ModelState


class PruneSparse(PassConfig):
    pass_name = "prune.sparse"
    method: Literal["magnitude", "wanda", "sparsegpt"] = Field("sparsegpt", description=(
        "magnitude: smallest |w| of each matrix; wanda: |w| x input activation norm, per output row; sparsegpt: "
        "chosen and compensated with the inverse input Hessian (best at 50% and above)"))
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of the weights of every pruned Linear set to 0")
    pattern: str | None = Field(None, description=(
        "n:m sparsity instead (e.g. 2:4: two of every four consecutive input weights of each row are 0); "
        "the sparsity is then n / m"))
    samples: int = Field(32, ge=1, le=4096, description="wanda / sparsegpt: calibration windows of max_length tokens")
    max_length: int = Field(128, ge=16, le=8192, description="wanda / sparsegpt: tokens per calibration window")
    percdamp: float = Field(0.01, gt=0, lt=1, description="sparsegpt: dampening added to the Hessian diagonal")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        sparse.parse_nm(v)  # raises naming the expected form
        return v or None

    @property
    def nm(self) -> tuple[int, int] | None:
        return sparse.parse_nm(self.pattern)

    @property
    def target(self) -> float:
        return self.nm[0] / self.nm[1] if self.nm else self.sparsity


def _prune_layer(name: str, lin: nn.Linear, h: torch.Tensor | None, cfg: PruneSparse, out: dict) -> None:
    w = lin.weight.data.float()
    if cfg.method == "sparsegpt":
        new = sparse.sparsegpt(w, h, cfg.sparsity, cfg.nm, cfg.percdamp)
    else:
        new = w.masked_fill(sparse.mask(w, cfg.method, cfg.sparsity, cfg.nm, h), 0.0)
    out[name] = {"zeros": float((new == 0).float().mean()),
                 **({"output_error": output_error(w, new, h)} if h is not None else {})}
    lin.weight.data.copy_(new.to(lin.weight.dtype))


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    fam = prunable.family_of(model.config)
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(lin)]: lin for layer in prunable.layers(model, fam) for lin in prunable.linears(layer, fam).values()}


def apply(model: nn.Module, tokenizer: Any = None, data: Any = None, cfg: PruneSparse | None = None, *,
          notes: dict | None = None, progress: bool = True, kind: str | None = None,
          ctx: PassContext | None = None) -> nn.Module:
    """Sparsity of a bare transformers model (BERT or Llama family): returns a new model in eval mode whose
    layers' Linear weights hold cfg.sparsity (or cfg.pattern) exact zeros; `model` is left as it is.
    tokenizer and data (training text: a list of strings or a `compress.data.TextData`, its train part) are
    needed for wanda and sparsegpt. notes: a dict to receive notes["sparse"] (what the pipeline's report
    records). progress: False for no progress bar. kind: default read from the model. ctx: the pipeline's
    context, given by run(); leave it None."""
    cfg = cfg or PruneSparse()
    kind = bare.prepare(cfg, model, data, ctx, kind)
    _dims(model.config, cfg)
    pruned = copy.deepcopy(model).float().eval()
    layers: dict[str, dict] = {}
    windows = None
    linears = _linears(pruned)
    with bare.context(ctx, None, progress) as c:
        if cfg.method == "magnitude":
            with torch.no_grad():
                for name, lin in linears.items():
                    _prune_layer(name, lin, None, cfg, layers)
        else:
            windows = sequential.calibration_windows(tokenizer, bare.texts(data, cfg.pass_name), cfg.samples,
                                                     cfg.max_length)
            columns = (TextColumn("    {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=c.console, transient=True, disable=not progress) as bar:
                task = bar.add_task(f"prune.sparse {cfg.method}", total=sequential.stage_count(pruned, False))
                sequential.each_layer(
                    pruned, windows, lambda name, lin, h: _prune_layer(name, lin, h, cfg, layers),
                    forward_kwargs={"use_cache": False} if kind.is_generative else {},
                    progress=lambda done, label: bar.update(task, completed=done,
                                                            description=f"prune.sparse {cfg.method}: {label}"))
        zeros = sum(float((p == 0).sum()) for p in pruned.parameters())
        total = sum(p.numel() for p in pruned.parameters())
        in_layers = sum(lin.weight.numel() for lin in linears.values())
        c.console.print(f"prune.sparse: {cfg.method} {cfg.pattern or f'{cfg.sparsity:.0%}'} of {len(layers)} Linear "
                        f"layers ({in_layers:,} weights); {zeros / total:.1%} of all parameters are now 0")
    if notes is not None:
        notes["sparse"] = {"method": cfg.method, "pattern": cfg.pattern, "sparsity": cfg.target,
                           "linears": len(layers), "weights": in_layers, "zeros_of_model": round(zeros / total, 4),
                           "calibration_tokens": 0 if windows is None else windows.numel(), "layers": layers}
    return pruned


def run(state: ModelState, cfg: PruneSparse, ctx: PassContext) -> ModelState:
    model = apply(state.model, state.tokenizer, state.data, cfg, notes=ctx.notes, kind=state.kind, ctx=ctx)
    return state.with_torch(model, sparse={"method": cfg.method, "sparsity": cfg.target, "pattern": cfg.pattern})


def _dims(config: Any, cfg: PruneSparse) -> prunable.Family:
    """The model's family; with a pattern n:m, every pruned Linear's input width must be a multiple of m."""
    fam = prunable.by_model_type(config, prunable.FAMILIES, "prune.sparse supports {supported}, not model_type "
                                 "'{model_type}' (for a CNN, prune.structured removes whole channels)")
    if cfg.nm:
        geo = prunable.Geometry.of(config)
        widths = {"hidden_size": config.hidden_size, "FFN width": geo.ffn, "attention width": geo.heads * geo.head_dim}
        odd = [f"{what} {w}" for what, w in widths.items() if w % cfg.nm[1]]
        if odd:
            raise UserError(f"prune.sparse pattern={cfg.pattern}: {', '.join(odd)} not a multiple of {cfg.nm[1]}; "
                            "use unstructured sparsity (sparsity=...) or a pattern whose m divides them")
    return fam


def _check(cfg: PruneSparse, info) -> list[str]:
    problems = prunable.supported_problems(info, lambda config: _dims(config, cfg))
    if cfg.pattern and "sparsity" in cfg.model_fields_set:
        problems.append(f"give sparsity or pattern, not both (pattern={cfg.pattern} prunes "
                        f"{cfg.target:.0%} by itself)")
    return problems


def _report(stage: dict) -> list[str]:
    s = stage.get("sparse")
    if not s:
        return []
    calib = f", calibrated on {s['calibration_tokens']:,} training tokens" if s.get("calibration_tokens") else ""
    lines = [f"- {stage_label(stage)}: {s['method']}, {s['pattern'] or format(s['sparsity'], '.0%')} of each of "
             f"{s['linears']} Linear layers ({s['weights']:,} weights){calib}; {s['zeros_of_model']:.1%} of all "
             "parameters are 0 (onnxruntime's CPU kernels run them at dense speed)"]
    errors = [(n, r) for n, r in s["layers"].items() if "output_error" in r]
    if errors:
        worst = sorted(errors, key=lambda e: -e[1]["output_error"])[:5]
        lines += ["", *md_table(["layer (largest output error)", "zeros", "relative output error"],
                                [[n, f"{r['zeros']:.1%}", f"{r['output_error']:.2e}"] for n, r in worst])]
    return lines


PASS = PassSpec(name="prune.sparse", config=PruneSparse, run=run, takes=("torch",), gives="torch",
                needs_data=lambda cfg: cfg.method != "magnitude", check=_check, report=_report,
                report_group="Sparsity",
                summary="Unstructured or n:m sparsity of the layers' Linear weights (magnitude, Wanda, SparseGPT): exact zeros for export.riq's coder.")
