"""`ModelState`: what flows from pass to pass (see docs/architecture.md).

It holds exactly one live form of the model: a torch module (`form == "torch"`) or a path to an
ONNX / ORT file (`form in ("onnx", "ort")`). Beside it: the teacher (the untouched input model, for
distillation and for measuring fidelity), the tokenizer, the data and the history of stages."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from compress import kinds
from compress.config import Form
from compress.data import TextData
from compress.kinds import ModelKind


@dataclass(frozen=True)
class ModelState:
    source: str  # how the user named the input model ("minilm", a folder, a file)
    kind: ModelKind  # compress.kinds: owns the inputs, outputs compared, metrics, export, saving (a name is looked up)
    form: Form
    model: Any = None  # torch.nn.Module when form == "torch"
    path: Path | None = None  # .onnx / .ort file when form != "torch"
    tokenizer: Any = None
    teacher: Any = None  # untouched input: an nn.Module, or a Path for an ONNX input
    data: TextData | None = None
    architecture: str = ""  # e.g. "BertModel", "LlamaForCausalLM"; "" for a bare ONNX file
    history: tuple[dict, ...] = ()
    meta: dict = field(default_factory=dict)  # facts passes hand on (export options, pooling, ...)

    def __post_init__(self):
        object.__setattr__(self, "kind", kinds.get(self.kind))  # ModelState(kind="causal-lm", ...) works too

    def with_torch(self, model: Any, **meta: Any) -> "ModelState":
        return replace(self, form="torch", model=model, path=None, meta={**self.meta, **meta})

    def with_file(self, path: Path, form: Form = "onnx", **meta: Any) -> "ModelState":
        return replace(self, form=form, model=None, path=Path(path), meta={**self.meta, **meta})

    def with_record(self, record: dict) -> "ModelState":
        return replace(self, history=self.history + (record,))

    @property
    def hf_config(self) -> Any:
        """The transformers config of the model or of its teacher (ONNX forms keep the teacher's)."""
        if self.form == "torch" and getattr(self.model, "config", None) is not None:
            return self.model.config
        return self.meta.get("hf_config", getattr(self.teacher, "config", None))
