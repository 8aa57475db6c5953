"""From what the user named to a `ModelState`: cheap description first (for validation before any
work), then the real load."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress import images, kinds, models, runtime
from compress.config import Form
from compress.errors import ModelLoadError
from compress.kinds import ModelKind
from compress.kinds.image_classifier import KIND as IMAGE_CLASSIFIER
from compress.state import ModelState


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the input, read without loading weights."""

    form: Form
    kind: ModelKind  # compress.kinds (a name is looked up)
    architecture: str
    path: Path | None
    trust_remote_code: bool = False  # the user allowed the folder's own code: later reads (pass checks) may too

    def __post_init__(self):
        object.__setattr__(self, "kind", kinds.get(self.kind))


def describe(spec: Any, trust_remote_code: bool = False) -> ModelInfo:
    """The kind comes from compress.kinds' detection: a module without a transformers config, a
    built-in image alias, or a folder compress wrote for a CNN (shapes.json) is an image classifier
    (compress/images.py). A folder with its own Python code (auto_map) is refused here, before any
    work, unless `trust_remote_code`."""
    if _is_module(spec):
        return ModelInfo("torch", kinds.of_module(spec), type(spec).__name__, None)
    if isinstance(spec, str) and spec in models.IMAGE_ALIASES:
        return ModelInfo("torch", IMAGE_CLASSIFIER, spec, None)  # built in code by compress.images
    path = models.resolve(spec)
    if path.is_dir() and (path / "shapes.json").is_file():
        if not images.can_reload(path):
            raise ModelLoadError(f"'{path}' holds a CNN that is not a built-in model; load it in Python with "
                                 "compress.images.load_module(folder, model=YourClass(...)) and pass the module")
        return ModelInfo("torch", IMAGE_CLASSIFIER, "cnn", path)
    if path.is_file():
        if path.suffix not in models.ONNX_SUFFIXES:
            raise ModelLoadError(f"'{path}' is a file of an unsupported type; give an .onnx / .ort file or a transformers folder")
        models.check_onnx(path)
        form: Form = "ort" if path.suffix == ".ort" else "onnx"
        kind, inputs = models.onnx_signature(path)
        unknown = [name for name in inputs if name not in runtime.SESSION_INPUTS and not runtime.is_past(name)]
        if unknown:
            raise ModelLoadError(f"'{path}' has graph inputs this tool can't feed: {unknown} (supported: "
                                 f"{', '.join(runtime.SESSION_INPUTS)}, {runtime.PAST_PREFIX}{{i}}.key / .value); "
                                 "export the model with compress's export.onnx")
        if not kind.is_generative and any(runtime.is_past(name) for name in inputs):
            raise ModelLoadError(f"'{path}' has KV cache inputs ({runtime.PAST_PREFIX}*) but no (batch, sequence, "
                                 "vocab) logits as its first output; export the model with compress's export.onnx")
        return ModelInfo(form, kind, "", path)
    cfg = models.read_hf_config(path, trust_remote_code)
    archs = getattr(cfg, "architectures", None) or [getattr(cfg, "model_type", "")]
    return ModelInfo("torch", models.kind_of(cfg), archs[0], path, trust_remote_code)


def _is_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, torch.nn.Module)


def _require(tokenizer: Any, where: Any) -> Any:
    if tokenizer is None:
        raise ModelLoadError(f"no tokenizer beside '{where}' to turn text into inputs: save the tokenizer files "
                             "next to it, or give --tokenizer FOLDER (a transformers tokenizer folder or alias)")
    return tokenizer


def load(spec: Any, info: ModelInfo, data: Any, tokenizer: Any = None, trust_remote_code: bool = False) -> ModelState:
    """The input becomes the teacher, untouched; the state's model is a copy passes may change.
    `trust_remote_code` is kept in the state's meta: a resumed run reloads stage folders that
    save_pretrained wrote with the same custom code."""
    source = type(spec).__name__ if _is_module(spec) else str(spec if spec is not None else models.DEFAULT_MODEL)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = models.load_tokenizer(Path(tokenizer), trust_remote_code)
    kind = info.kind
    if info.form != "torch":
        tok = _require(tokenizer or models.find_tokenizer(info.path, trust_remote_code), info.path) \
            if kind.uses_tokenizer else None
        return ModelState(source=source, kind=kind, form=info.form, path=info.path, tokenizer=tok,
                          teacher=info.path, data=data, architecture=info.architecture)
    if _is_module(spec):  # the caller's module is left as it is (train/eval mode included)
        teacher, tok, meta = copy.deepcopy(spec).eval(), None, {}
    else:  # the kind's storage: a transformers folder, or a built-in / saved CNN
        teacher, tok, meta = kind.storage.load_input(spec, info.path, trust_remote_code)
    if kind.uses_tokenizer:
        tok = _require(tokenizer or tok, info.path if info.path is not None else "the given module")
        meta = {"pooling": meta.get("pooling", "mean"), "trust_remote_code": trust_remote_code}
    return ModelState(source=source, kind=kind, form="torch", model=copy.deepcopy(teacher), tokenizer=tok,
                      teacher=teacher, data=data, meta=meta,
                      architecture=info.architecture if kind.is_transformers else type(teacher).__name__)
