"""The training loop behind prune.homodistil and distill.kd: a student learns from a frozen teacher.

AdamW, linear warm-up then linear decay, gradient clipping, fixed seeds, a progress bar with the
loss, a checkpoint every N steps (atomic, loaded with weights_only=True) and resume from it after an
interruption. Batches are a deterministic function of (seed, step), so a resumed run sees the same
data as an uninterrupted one. It runs unchanged under `accelerate launch`: each process takes its
share of every batch and gradients are averaged across processes."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from compress import kinds
from compress.kinds import ModelKind
from compress.passes.lib.losses import LossWeights, Taid, distill_loss


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    warmup: float  # fraction of steps
    weight_decay: float
    max_grad_norm: float
    seed: int
    checkpoint_every: int
    dropout_steps: int = 0  # the model's own dropout is active for the first `dropout_steps` steps, then off
    freeze_embeddings: bool = False  # the input token embeddings keep the teacher's values (no gradient, no AdamW state)


class Callbacks:
    """Hooks a pass plugs into the loop (pruning does; plain distillation doesn't)."""

    def after_backward(self, step: int, model: torch.nn.Module) -> None: ...

    def after_step(self, step: int, model: torch.nn.Module) -> None: ...

    def head_keep(self) -> list[torch.Tensor] | None:
        return None

    def layer_pairs(self) -> list[tuple[int, int]] | None:
        """(student, teacher) hidden_states indices the hidden-state loss compares; None: the default."""
        return None

    def describe(self) -> str:
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class KeepZeros(Callbacks):
    """Weights that are exactly 0 when training starts (prune.sparse's) stay 0: their gradients are cleared after
    the backward and the weights after each step (AdamW's momentum and decay would move them). Only matrices
    with at least `min_fraction` zeros are tracked (a dense model has none)."""

    def __init__(self, model: torch.nn.Module, min_fraction: float = 0.01):
        zeros = {name: p.detach() == 0 for name, p in model.named_parameters() if p.dim() > 1}
        self.masks = {name: z for name, z in zeros.items() if float(z.float().mean()) >= min_fraction}

    def __bool__(self) -> bool:
        return bool(self.masks)

    def _tracked(self, model: torch.nn.Module):
        for name, p in model.named_parameters():
            if name in self.masks:
                yield p, self.masks[name].to(p.device)

    def after_backward(self, step: int, model: torch.nn.Module) -> None:
        for p, mask in self._tracked(model):
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0.0)

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for p, mask in self._tracked(model):
                p.masked_fill_(mask, 0.0)


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Rows of step `step`: epoch e is a seeded permutation; each process takes every world-th row."""
    bs = min(batch_size, n)
    if bs < world:
        raise ValueError(f"batch_size {bs} is smaller than the {world} processes: every process needs a sample")
    per_epoch = n // bs
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[b * bs:(b + 1) * bs][rank::world]


def _schedule(settings: TrainSettings):
    warm = max(1, int(settings.steps * settings.warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warm))

    return factor


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, key: str, parts: dict[str, Any]) -> int:
    """Restore every part from a checkpoint of this exact pass (same key); the step to start at."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("key") != key:
        return 0
    for name, obj in parts.items():
        obj.load_state_dict(state[name])
    torch.set_rng_state(state["rng"])  # dropout continues exactly as in an uninterrupted run
    return state["step"] + 1


def _forward(model: torch.nn.Module, batch: dict, kind: ModelKind, attentions: bool):
    """As the kind calls it: hidden states (and attention maps) for the losses; a CNN's logits alone."""
    return kind.train_forward(model, batch, attentions)


@contextlib.contextmanager
def attention_for_training(models: list[torch.nn.Module], need_maps: bool):
    """Train with SDPA attention (faster) unless attention maps are needed for the loss; the models
    go back to their own implementation (eager, which ORT's fusion needs) afterwards."""
    saved = [getattr(getattr(m, "config", None), "_attn_implementation", None) for m in models]
    wanted = "eager" if need_maps else "sdpa"  # SDPA returns no attention maps
    switched = []
    for m, impl in zip(models, saved):
        if impl != wanted and hasattr(m, "set_attn_implementation"):
            try:
                m.set_attn_implementation(wanted)
                switched.append((m, impl))
            except (ValueError, ImportError):  # an architecture without SDPA keeps its own
                pass
    try:
        yield
    finally:
        for m, impl in switched:
            m.set_attn_implementation(impl or "eager")


class DropoutSchedule:
    """Distillation wants the student to reproduce the (eval-mode) teacher, so dropout only adds a
    loss floor: it is off, except for the first `steps` steps (pruning needs a non-zero loss to rank
    units while the student still equals the teacher). Attention modules read `dropout.p` directly,
    so the probabilities are set, not the modules' train/eval mode; `restore()` puts them back."""

    def __init__(self, model: torch.nn.Module, steps: int):
        self.saved = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        self.steps = steps

    def at(self, step: int) -> None:
        for m, p in self.saved:
            m.p = p if step < self.steps else 0.0

    def restore(self) -> None:
        for m, p in self.saved:
            m.p = p


def train(student: torch.nn.Module, teacher: torch.nn.Module, kind: str | ModelKind, data: dict[str, torch.Tensor],
          settings: TrainSettings, weights: LossWeights, workdir: Path, key: str, console: Console,
          callbacks: Callbacks | None = None, taid: Taid | None = None, resume: bool = False, label: str = "training") -> dict:
    """Train `student` in place against `teacher` on `data` (tokenized: input_ids, attention_mask; images:
    pixel_values). `kind` (a ModelKind or its name) says how the models are called, which output loss
    applies and how a batch is shown to them."""
    kind = kinds.get(kind)
    dropout = DropoutSchedule(student, settings.dropout_steps)
    devices = [next(m.parameters()).device for m in (student, teacher)]
    frozen = frozen_embeddings(student) if settings.freeze_embeddings else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        with attention_for_training([student, teacher], weights.attention > 0):
            return _train(student, teacher, kind, data, settings, weights, workdir, key, console,
                          callbacks or Callbacks(), taid, resume, label, dropout)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        dropout.restore()
        student.to(devices[0])  # measurement and export run where the models came from (CPU)
        teacher.to(devices[1])


def _prepare(student: torch.nn.Module, teacher: torch.nn.Module, settings: TrainSettings):
    """Accelerator, wrapped student, AdamW (no decay on biases / norms) and its schedule."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # cpu=True without a GPU: under torchrun / accelerate launch this is what makes it MULTI_CPU (gloo).
    # Some parameters (a BERT pooler) take no part in the distillation loss: DDP must allow that.
    # The loop shards each batch itself, so the scheduler must step once per optimizer step (accelerate
    # would otherwise step it once per process).
    acc = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False,
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(settings.seed)
    teacher.to(acc.device).eval()
    student.train()
    decay = [p for p in student.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(settings))
    model, opt, sched = acc.prepare(student, opt, sched)
    return acc, model, opt, sched


def _train(student, teacher, kind, data, settings, weights, workdir, key, console, callbacks, taid, resume, label,
           dropout) -> dict:
    acc, model, opt, sched = _prepare(student, teacher, settings)
    ckpt = workdir / "checkpoint.pt"
    saved = {"model": acc.unwrap_model(model), "optimizer": opt, "scheduler": sched, "callbacks": callbacks,
             **({"taid": taid} if taid is not None else {})}
    start = _load_checkpoint(ckpt, key, saved) if resume else 0
    if start:
        console.print(f"    resumed {label} from the checkpoint of step {start}/{settings.steps}")
    if kind.train_in_eval_mode:  # CNNs: BatchNorm statistics frozen, no dropout / drop-connect: match the eval teacher
        model.eval()
    n = next(iter(data.values())).shape[0]
    pairs, channels = hidden_map(student, teacher)
    t0, avg, first, parts, tokens = time.perf_counter(), None, None, {}, 0
    columns = (TextColumn("    {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not acc.is_main_process, transient=False) as bar:
        task = bar.add_task(label, total=settings.steps, completed=start, info="")
        for step in range(start, settings.steps):
            idx = batch_indices(step, n, settings.batch_size, settings.seed, acc.process_index, acc.num_processes)
            batch = trim_padding({k: v[idx] for k, v in data.items()})
            batch = kind.inputs.training_view(batch, settings.seed * 1_000_003 + step)  # images: a fresh random view
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum()) * acc.num_processes if "attention_mask" in batch else 0
            dropout.at(step)
            with torch.no_grad():
                t_out = _forward(teacher, batch, kind, weights.attention > 0)
            s_out = _forward(model, batch, kind, weights.attention > 0)
            loss, parts = distill_loss(kind, s_out, t_out, batch.get("attention_mask"), weights, callbacks.head_keep(),
                                       taid.t if taid is not None else None, batch.get("input_ids"),
                                       callbacks.layer_pairs() or pairs, channels)
            acc.backward(loss)
            callbacks.after_backward(step, acc.unwrap_model(model))
            acc.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            callbacks.after_step(step, acc.unwrap_model(model))
            value = float(acc.reduce(loss.detach(), "mean"))  # the same on every rank (TAID, logs)
            first, avg = (value, value) if avg is None else (first, 0.95 * avg + 0.05 * value)
            if taid is not None:
                taid.update(value, (step + 1) / settings.steps)
            extra = callbacks.describe() + (f" taid_t={taid.t:.2f}" if taid is not None else "")
            bar.update(task, advance=1, info=f"loss {avg:.4f}{extra}")
            if acc.is_main_process and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
                _save(ckpt, {"key": key, "step": step, "rng": torch.get_rng_state(),
                             **{name: obj.state_dict() for name, obj in saved.items()}})
            acc.wait_for_everyone()
    acc.unwrap_model(model).eval()
    return {"steps": settings.steps, "resumed_from": start, "first_loss": first, "final_loss": avg, "final_parts": parts,
            "samples": n, **({"tokens_seen": tokens} if tokens else {}),
            "seconds": round(time.perf_counter() - t0, 1), "processes": acc.num_processes}


def frozen_embeddings(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The token-embedding table to freeze (a third to a half of a small encoder's parameters, and of
    every optimizer step's work); none when it is tied to the output head, which must keep learning."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if get_in else None
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.nn.Parameter):
        return []
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is emb.weight:
        return []
    return [emb.weight]


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns that are padding in every row of the batch (either padding side): a batch of
    short texts costs what its longest text needs, not max_length. Other inputs stay as they are."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    cols = torch.nonzero(mask.any(0)).flatten()
    if not len(cols) or (cols[0] == 0 and cols[-1] == mask.shape[1] - 1):
        return batch
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    return {k: v[:, lo:hi] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v for k, v in batch.items()}


def hidden_map(student: torch.nn.Module, teacher: torch.nn.Module) -> tuple[list | None, list | None]:
    """What the hidden-state loss compares for a depth- or hidden-pruned student: the (student, teacher)
    layer pairs (depth.layer_pairs) and the teacher channels the student kept (hidden.channel_map);
    None, None when both have the same layers and channels (or no transformers config: a CNN)."""
    from compress.passes.lib import depth, hidden

    s_cfg, t_cfg = getattr(student, "config", None), getattr(teacher, "config", None)
    if not all(hasattr(c, "num_hidden_layers") and hasattr(c, "hidden_size") for c in (s_cfg, t_cfg)):
        return None, None
    same_layers = s_cfg.num_hidden_layers == t_cfg.num_hidden_layers and depth.kept_layers(s_cfg) == depth.kept_layers(t_cfg)
    return (None if same_layers else depth.layer_pairs(s_cfg, t_cfg)), hidden.channel_map(s_cfg, t_cfg)


def tokenized(tokenizer: Any, texts: list[str], max_length: int, windows: bool = False) -> dict[str, torch.Tensor]:
    """All training texts, padded to `max_length` (fixed shapes keep step times even). `windows`: a
    text longer than max_length becomes consecutive windows of it (each with the model's special
    tokens) instead of being cut off, so all of the text is used; windows under 8 real tokens are
    dropped (only a long text's tail can be that short)."""
    if not windows:
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt",
                    return_overflowing_tokens=True)
    ids, mask, text = enc["input_ids"].long(), enc["attention_mask"].long(), enc["overflow_to_sample_mapping"]
    first = torch.ones_like(text, dtype=torch.bool)
    first[1:] = text[1:] != text[:-1]
    keep = (mask.sum(1) >= 8) | first  # a text's first window always stays, however short the text
    return {"input_ids": ids[keep], "attention_mask": mask[keep]}
