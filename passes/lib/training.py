"""The training fields every training pass shares (steps, batch, optimizer, checkpoints, loss
weights), in one place so that no pass imports another pass's config."""
from __future__ import annotations

from pydantic import Field

from compress.config import PassConfig
from compress.passes.lib.losses import LossWeights
from compress.passes.lib.trainer import TrainSettings


class TrainingFields(PassConfig):
    """Training fields shared by the passes that train (prune.homodistil, distill.kd): a base config, not a pass."""

    steps: int = Field(600, ge=1, le=1_000_000, description="optimizer steps")
    batch_size: int = Field(16, ge=1, le=4096, description="samples per step (split across processes under accelerate)")
    lr: float = Field(3e-4, gt=0, le=1.0, description="peak AdamW learning rate")
    warmup: float = Field(0.06, ge=0, lt=1, description="fraction of steps of linear learning-rate warm-up")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay (matrices only)")
    max_grad_norm: float = Field(1.0, gt=0, le=1000, description="gradient clipping norm")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per training sample")
    windows: bool = Field(True, description=(
        "a training text longer than max_length becomes consecutive windows of it (all of the text is used) "
        "instead of being cut at max_length"))
    seed: int = Field(0, ge=0, description="seed for initialisation order and batch order")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (resume after interruption)")
    dropout: bool = Field(False, description="keep the model's dropout for the whole training (default: off, so the student can match the eval-mode teacher)")
    freeze_embeddings: bool = Field(False, description=(
        "keep the input token embeddings as they are (not trained): faster steps; untied embeddings only"))
    w_output: float = Field(1.0, ge=0, le=1000, description="weight of the output loss (embedding cosine / logit KL)")
    w_hidden: float = Field(1.0, ge=0, le=1000, description="weight of the per-layer hidden-state MSE")
    w_attention: float = Field(0.0, ge=0, le=1000, description="weight of the attention-map MSE (training then runs with eager attention, slower)")
    temperature: float = Field(2.0, gt=0, le=100, description="softmax temperature of the logit KL")
    w_lm: float = Field(0.0, ge=0, le=1000, description="causal LMs: weight of the next-token cross-entropy on the training text")

    def settings(self, dropout_steps: int = 0) -> TrainSettings:
        return TrainSettings(self.steps, self.batch_size, self.lr, self.warmup, self.weight_decay, self.max_grad_norm,
                             self.seed, self.checkpoint_every, self.steps if self.dropout else dropout_steps,
                             self.freeze_embeddings)

    def loss_weights(self, pooling: str = "mean") -> LossWeights:
        return LossWeights(output=self.w_output, hidden=self.w_hidden, attention=self.w_attention,
                           temperature=self.temperature, lm=self.w_lm, pooling=pooling)
