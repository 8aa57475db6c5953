"""distill.kd: recovery training of the current torch model against the teacher (the untouched input).

Losses as in prune.homodistil (output cosine / logit KL with temperature, per-layer hidden MSE,
attention MSE): Hinton et al. 2015 (arXiv 1503.02531), TinyBERT (arXiv 1909.10351). Options:
- `taid`: TAID (arXiv 2501.16937), an adaptive target interpolated from the student's own output
  towards the teacher's, which helps when the gap is large (after aggressive pruning);
- `self_data` (causal LMs): self-data distillation (arXiv 2410.09982): the teacher first
  regenerates the continuation of each training prompt; the student trains on those texts.
Image classifiers (compress/images.py): KL of the logits on random views of the training images
(crop, mirror, mixup; teacher and student see the same view: "function matching", arXiv 2106.05237),
the model kept in eval mode (BatchNorm statistics frozen, no dropout / drop-connect).
When to use: after any pass that hurt fidelity (one-shot pruning, expert pruning, fake-quant)."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from torch import nn

from compress.context import PassContext
from compress.passes.lib import bare
from compress.passes.lib.losses import LossWeights, Taid
from compress.passes.lib.trainer import KeepZeros, tokenized, train
from compress.passes.lib.training import TrainingFields
from compress.registry import ALL_KINDS, PassSpec
from compress.state import ModelState


class DistillKD(TrainingFields):
    pass_name = "distill.kd"
    taid: bool = Field(False, description="TAID: interpolated, adaptively sharpening target instead of the teacher's")
    taid_start: float = Field(0.4, ge=0, le=1, description="TAID: initial interpolation weight t")
    self_data: bool = Field(False, description="causal LMs: train on the teacher's regenerations of the training text")
    prompt_tokens: int = Field(32, ge=1, le=4096, description="self_data: tokens of each training text kept as the prompt")
    keep_zeros: bool | None = Field(None, description=(
        "weights that are exactly 0 at the start stay 0 while training (matrices with at least 1% zeros); default: "
        "when prune.sparse ran earlier in the pipeline"))

    @model_validator(mode="after")
    def _lengths(self) -> "DistillKD":
        if self.self_data and self.prompt_tokens >= self.max_length:
            raise ValueError(f"prompt_tokens ({self.prompt_tokens}) must be < max_length ({self.max_length})")
        return self


def regenerate(teacher, tokenizer, texts: list[str], cfg: DistillKD, console) -> list[str]:
    """Self-data distillation: the teacher continues the first `prompt_tokens` of each text."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end
    out: list[str] = []
    try:
        with console.status(f"teacher regenerating {len(texts)} training texts"), torch.inference_mode():
            for i in range(0, len(texts), 16):
                enc = tokenizer(texts[i:i + 16], return_tensors="pt", padding=True, truncation=True,
                                max_length=cfg.prompt_tokens)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                gen = teacher.generate(input_ids=enc["input_ids"].to(teacher.device),
                                       attention_mask=enc["attention_mask"].to(teacher.device),
                                       max_new_tokens=cfg.max_length - cfg.prompt_tokens, do_sample=False, pad_token_id=pad)
                out.extend(tokenizer.batch_decode(gen, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


TEXT_ONLY = ("w_hidden", "w_attention", "w_lm", "self_data", "prompt_tokens", "max_length")


def _check(cfg: DistillKD, info) -> list[str]:
    if not info.kind.uses_tokenizer:  # an image classifier
        text_only = sorted(cfg.model_fields_set & set(TEXT_ONLY))
        return [f"{', '.join(text_only)}: for transformers only; an image classifier distils its logits "
                "(w_output, temperature, taid)"] if text_only else []
    if cfg.self_data and not info.kind.is_generative:
        return [f"self_data needs a causal LM (the input is a {info.kind})"]
    return []


def _image_data(images, cfg: DistillKD) -> tuple[dict, LossWeights, dict]:
    """Logit KD on the training images (seeded batches of them; never the held-out photos)."""
    import torch

    weights = dataclasses.replace(cfg.loss_weights(), hidden=0.0, attention=0.0, lm=0.0)
    return {"pixel_values": torch.from_numpy(images)}, weights, {"images": len(images)}


def _text_data(teacher, tokenizer, texts: list[str], pooling: str, cfg: DistillKD, student,
               console) -> tuple[dict, LossWeights, dict]:
    t_heads = teacher.config.num_attention_heads
    if cfg.w_attention > 0 and student.config.num_attention_heads != t_heads:
        raise ValueError(f"w_attention needs the teacher's head count ({t_heads}); the student has "
                         f"{student.config.num_attention_heads} heads: set w_attention=0")
    texts = texts[: cfg.steps * cfg.batch_size]
    if cfg.self_data:
        texts = regenerate(teacher, tokenizer, texts, cfg, console)
    return (tokenized(tokenizer, texts, cfg.max_length, cfg.windows), cfg.loss_weights(pooling),
            {"texts": len(texts), "self_data": cfg.self_data})


def apply(model: nn.Module, teacher: nn.Module, tokenizer: Any, data: Any, cfg: DistillKD | None = None, *,
          notes: dict | None = None, workdir: Path | str | None = None, progress: bool = True, pooling: str = "mean",
          kind: str | None = None, sparse: bool = False, ctx: PassContext | None = None) -> nn.Module:
    """Distil `teacher` into a copy of `model` (e.g. a pruned one): returns the trained copy in eval
    mode; `model` and `teacher` keep their weights (the teacher is put in eval mode).

    A transformers model: tokenizer, the model's; data: a list of training strings or a
    `compress.data.TextData` (its train part only; the first steps x batch_size samples are used).
    A CNN (no transformers config): tokenizer None; data: training images, a (N, channels, H, W)
    float32 array or tensor preprocessed for it, or a `compress.images.ImageData`. cfg: default
    `DistillKD()`. notes: a dict to receive notes["distill"] (losses, steps, seconds), what the
    pipeline's report records. workdir: where checkpoints go while training (default: a temporary
    folder, removed). progress: False for no progress bar. pooling: encoders: "mean" or "cls".
    kind: default read from the model. sparse: the model was made sparse (prune.sparse): its zeros stay zeros
    unless cfg.keep_zeros says otherwise. ctx: the pipeline's context, given by run(); leave it None."""
    cfg = cfg or DistillKD()
    keep_zeros = sparse if cfg.keep_zeros is None else cfg.keep_zeros
    kind = bare.prepare(cfg, model, data, ctx, kind)
    student = copy.deepcopy(model)
    with bare.context(ctx, workdir, progress) as c:
        if not kind.uses_tokenizer:  # an image classifier
            tensors, weights, what = _image_data(bare.images(data, cfg.pass_name), cfg)
        else:  # training part only, never held-out
            texts = bare.texts(data, cfg.pass_name)
            tensors, weights, what = _text_data(teacher, tokenizer, texts, pooling, cfg, student, c.console)
        taid = Taid(cfg.taid_start) if cfg.taid else None
        zeros = KeepZeros(student) if keep_zeros else None
        if zeros:
            c.console.print(f"    distill.kd keeps the zeros of {len(zeros.masks)} sparse weight matrices")
        stats = train(student, teacher, kind, tensors, cfg.settings(), weights, c.workdir, c.key,
                      c.console, callbacks=zeros or None, taid=taid, resume=c.resume, label="distill")
        (c.workdir / "checkpoint.pt").unlink(missing_ok=True)
    if notes is not None:
        notes["distill"] = {**stats, **what, "taid": cfg.taid}
    return student.eval()


def run(state: ModelState, cfg: DistillKD, ctx: PassContext) -> ModelState:
    student = apply(state.model, state.teacher, state.tokenizer, state.data, cfg, notes=ctx.notes,
                    pooling=state.meta.get("pooling", "mean"), kind=state.kind, sparse=bool(state.meta.get("sparse")),
                    ctx=ctx)
    return state.with_torch(student)


PASS = PassSpec(name="distill.kd", config=DistillKD, run=run, takes=("torch",), gives="torch", kinds=ALL_KINDS,
                needs_data=lambda cfg: True, check=_check, proxy=lambda cfg: None,  # a search ranks candidates untrained
                summary="Knowledge-distillation recovery training against the input model (KD, TAID, self-data).")
