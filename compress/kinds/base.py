"""The model-kind protocol: one `ModelKind` object per kind of model owns everything that differs
between kinds, and the pipeline, measurement, runners, profiling, loading and the passes ask it
(`state.kind.is_generative`, `kind.fidelity.compare(...)`) instead of comparing kind names.

A kind is a frozen dataclass composed of three shared parts, plus a few flags; a kind's module
subclasses `ModelKind` once (never deeper) to override the methods where it differs:

  inputs    how data becomes model inputs: the data set (text corpus or images), evaluation
            batches, latency / parity / calibration feeds, the view a training batch is shown in
            (`TextInputs` here; `ImageInputs` in image_classifier.py)
  fidelity  one batch of outputs against the teacher's, and the batch's weight in the mean
            (`Cosine` of embeddings; `Logits`: KL + top-1, over real tokens for an LM)
  storage   how the input model is loaded and a torch stage is saved / reloaded
            (`Transformers`: save_pretrained; `TorchModule`: compress.images.save_module)

The methods (defaults: a transformers model fed token ids that returns `logits`):
  torch_output / onnx_output   what runtime.TorchRunner / OnnxRunner return for a feed
  output_rows                  outputs as rows compared by cosine (quant.riq's search)
  task_metrics                 task metrics of a stage (evaluate.task_metrics)
  cache_reference              True: teacher outputs computed once; False: re-run batch by batch
  onnx_outputs, export_forward, export_onnx    what export.onnx writes and how
  profile_prompt               a prompt for generation timing (TTFT, tokens/s), or None
  forward_kwargs, train_forward, output_loss, train_in_eval_mode    distillation / calibration
  recognise_config / _graph / _module    detection: NO, FALLBACK or YES (kinds.from_config / from_graph / of_module)

Nothing of compress is imported here at load time (only inside methods), so every module of
compress can import compress.kinds without an import cycle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

NO, FALLBACK, YES = 0, 1, 2  # how surely a kind recognises a model; the surest wins (ties: the latest registered)


# --- inputs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextInputs:
    """Token ids from a tokenizer: the data is a text corpus (compress.data), a feed is
    `input_ids` + `attention_mask` (int64)."""

    uses_tokenizer: ClassVar[bool] = True
    default_data: ClassVar[str] = "wiki"  # what the report names as the data when none was given

    def load(self, spec: Any, model_path: Any = None) -> Any:
        from compress import data

        return data.load(spec)

    def batches(self, tokenizer: Any, samples: Any, max_length: int, batch_size: int = 16):
        from compress.runtime import batches

        return batches(tokenizer, samples, max_length, batch_size)

    def latency_feed(self, tokenizer: Any, samples: Any, batch: int, seq: int) -> dict[str, np.ndarray]:
        from compress.profiling import text_feed

        return text_feed(tokenizer, samples, batch, seq)

    def parity_feeds(self, tokenizer: Any, samples: Any, max_length: int) -> list[dict]:
        from compress.exporters.parity import text_feeds

        return text_feeds(tokenizer, samples, max_length)

    def calibration_feeds(self, tokenizer: Any, samples: Any, max_length: int, graph_inputs: Any) -> list[dict]:
        """One sample per feed, padded to `max_length` (static int8's histogram calibrators need arrays
        of one shape), completed for the graph (`graph_inputs`: runtime.input_specs of its session)."""
        from compress.runtime import complete_feed, tokenize

        return [complete_feed(tokenize(tokenizer, [t], max_length, pad_to_max=True), graph_inputs) for t in samples]

    def training_view(self, batch: dict, seed: int) -> dict:
        """The batch a training step shows teacher and student: text as it is."""
        return batch


# --- fidelity ---------------------------------------------------------------------------------------

def _samples(feed: dict) -> int:
    return len(next(iter(feed.values())))


@dataclass(frozen=True)
class Cosine:
    """Mean and min cosine of per-sample output vectors (sentence embeddings); batches weighted by samples."""

    def compare(self, student: np.ndarray, teacher: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
        from compress.evaluate import cosine_fidelity

        return cosine_fidelity(student, teacher)

    def weight(self, feed: dict) -> float:
        return _samples(feed)


@dataclass(frozen=True)
class Logits:
    """Mean KL(teacher || student) of the output distributions and top-1 agreement. `per_token`
    (an LM's (batch, seq, vocab) logits): over the real, unpadded tokens, batches weighted by them."""

    per_token: bool = False

    def compare(self, student: np.ndarray, teacher: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
        from compress.evaluate import logit_fidelity

        return logit_fidelity(student, teacher, mask if self.per_token else None)

    def weight(self, feed: dict) -> float:
        return feed["attention_mask"].sum() if self.per_token else _samples(feed)


# --- storage ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transformers:
    """A transformers model: loaded from a folder with the Auto class `auto_class`
    (compress.models.load_hf), saved with save_pretrained (and its tokenizer beside it)."""

    auto_class: str = "AutoModel"
    is_transformers: ClassVar[bool] = True

    def load_input(self, spec: Any, path: Any, trust_remote_code: bool) -> tuple[Any, Any, dict]:
        """(model, the folder's tokenizer or None, meta) of the input model."""
        from compress import models, runtime

        model, tokenizer, _ = models.load_hf(path, trust_remote_code)
        return model, tokenizer, {"pooling": runtime.pooling_of(path)}

    def save(self, model: Any, tokenizer: Any, folder: Any) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    def reload(self, folder: Any, trust_remote_code: bool) -> Any:
        from compress import models

        return models.load_hf(folder, trust_remote_code)[0]  # saved by us, same code


@dataclass(frozen=True)
class TorchModule:
    """A plain torch module (no transformers config, e.g. a CNN): built-in models come from
    compress.images.build, a stage is saved as weights + layer widths (images.save_module) and
    reloaded when its builder is built in (else None: the pass runs again)."""

    is_transformers: ClassVar[bool] = False

    def load_input(self, spec: Any, path: Any, trust_remote_code: bool) -> tuple[Any, Any, dict]:
        from compress import images

        return (images.build(spec) if path is None else images.load_module(path)), None, {}

    def save(self, model: Any, tokenizer: Any, folder: Any) -> None:
        from compress import images

        images.save_module(model, folder)

    def reload(self, folder: Any, trust_remote_code: bool) -> Any:
        from compress import images

        return images.load_module(folder) if images.can_reload(folder) else None


@dataclass
class LogitsOutput:
    """A plain module's output in the shape the distillation losses read (no hidden states)."""

    logits: Any
    hidden_states: tuple = ()
    attentions: tuple = ()


# --- the kind ---------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ModelKind:
    """One kind of model. `str(kind)` is its name, which JSON, reports and messages carry; a kind
    also equals its name (`kind == "encoder"`), so code written against names keeps working, but
    compress itself asks the kind instead of comparing names."""

    name: str
    summary: str
    inputs: Any = field(default_factory=TextInputs)
    fidelity: Any = field(default_factory=Logits)
    storage: Any = field(default_factory=Transformers)
    onnx_outputs: tuple[str, ...] = ("logits",)  # export.onnx's output names
    is_generative: bool = False  # next-token LM: KV-cache export, generation timing, LM loss, self-data
    cache_reference: bool = True  # False: teacher outputs too large to keep; the teacher re-runs per batch
    train_in_eval_mode: bool = False  # distillation keeps the student in eval mode (frozen BatchNorm statistics)

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ModelKind):
            return self.name == other.name
        return self.name == other if isinstance(other, str) else NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def uses_tokenizer(self) -> bool:
        """Inputs are made by a tokenizer (a model without one cannot be fed text)."""
        return self.inputs.uses_tokenizer

    @property
    def is_transformers(self) -> bool:
        """The torch form is a transformers model (config, save_pretrained), not a plain module."""
        return self.storage.is_transformers

    def load_data(self, spec: Any, model_path: Any = None) -> Any:
        """The run's data (`--data`, None for the default) for a model at `model_path` (None: built in code)."""
        return self.inputs.load(spec, model_path)

    # --- running --------------------------------------------------------------------------------------

    def forward_kwargs(self) -> dict:
        """Extra keyword arguments of every transformers forward call (calibration, training, export)."""
        return {}

    def torch_output(self, model: Any, feed: dict[str, np.ndarray], pooling: str = "mean") -> np.ndarray:
        import torch

        ids, mask = torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, **self.forward_kwargs()).logits.float().numpy()

    def onnx_output(self, outputs: dict[str, np.ndarray], feed: dict[str, np.ndarray], pooling: str = "mean") -> np.ndarray:
        return outputs.get("logits", next(iter(outputs.values())))

    def output_rows(self, out: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Outputs as rows compared by cosine: one vector per sample."""
        return out.reshape(len(out), -1)

    # --- measuring ------------------------------------------------------------------------------------

    def task_metrics(self, run: Any, tokenizer: Any, quick: bool = False) -> dict[str, float]:
        """Task metrics of a stage; `quick`: only what stays meaningful on a cheap subset."""
        return {}

    def profile_prompt(self, tokenizer: Any, texts: Any, n: int) -> np.ndarray | None:
        """A (1, n) prompt whose generation a profile times (TTFT, tokens/s); None: no generation."""
        return None

    # --- export ---------------------------------------------------------------------------------------

    def export_forward(self, model: Any, input_ids: Any, attention_mask: Any, pooling: str) -> Any:
        """What export.onnx's traced wrapper returns: one tensor per name of `onnx_outputs`."""
        return model(input_ids=input_ids, attention_mask=attention_mask, **self.forward_kwargs()).logits

    def export_onnx(self, state: Any, cfg: Any, ctx: Any) -> Any:
        """export.onnx for this kind: token inputs -> `onnx_outputs`, checked against PyTorch."""
        from compress.exporters import onnx_export

        return onnx_export.export_tokens(state, cfg, ctx)

    # --- training -------------------------------------------------------------------------------------

    def train_forward(self, model: Any, batch: dict, attentions: bool) -> Any:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                     output_attentions=attentions, **self.forward_kwargs())

    def output_loss(self, s_out: Any, t_out: Any, mask: Any, weights: Any, taid_t: float | None = None) -> Any:
        """The distillation loss on the outputs (logit KL with temperature, or TAID's target)."""
        from compress.passes.lib.losses import logit_loss

        return logit_loss(s_out, t_out, mask, weights, taid_t)

    # --- detection ------------------------------------------------------------------------------------

    def recognise_config(self, config: Any) -> int:
        """How surely a transformers config is a model of this kind (NO, FALLBACK, YES)."""
        return NO

    def recognise_graph(self, inputs: list[str], outputs: list[tuple[str, tuple]]) -> int:
        """How surely an ONNX graph (input names; (output name, shape) in order) is of this kind."""
        return NO

    def recognise_module(self, module: Any) -> int:
        """How surely a torch module given in Python is of this kind; default: by its config."""
        config = getattr(module, "config", None)
        return self.recognise_config(config) if config is not None else NO
