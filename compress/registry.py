"""The one registry of passes: dotted name -> module that defines it, imported lazily.

`compress/` never imports an algorithm module directly; it asks the registry, which imports the
module only when the pass is used (so `compress passes` or a recipe check stays cheap, and heavy
dependencies load only for the passes that need them)."""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Callable

from compress.config import Form, PassConfig
from compress.errors import UserError
from compress.state import KINDS

ALL_KINDS = KINDS  # a pass that works on every kind of model, image classifiers included
TEXT_KINDS = tuple(k for k in KINDS if k != "image-classifier")  # the default

# name -> module. Adding a pass = writing its module and one line here.
_MODULES: dict[str, str] = {
    "export.onnx": "compress.exporters.onnx_export",
    "optimize.ort": "compress.exporters.ort_optimize",
    "export.ort": "compress.exporters.ort_mobile",
    "quant.int8": "compress.passes.quant_int8",
    "quant.int4": "compress.passes.quant_int4",
    "quant.riq": "compress.passes.riq",
    "quant.weight_only": "compress.passes.quant_weight_only",
    "export.riq": "compress.exporters.riq_export",
    "profile": "compress.passes.profile",
    "prune.homodistil": "compress.passes.prune_homodistil",
    "prune.structured": "compress.passes.prune_structured",
    "prune.experts": "compress.passes.prune_experts",
    "distill.kd": "compress.passes.distill_kd",
}


@dataclass(frozen=True)
class PassSpec:
    """What the pipeline needs to know about a pass before and while running it."""

    name: str
    config: type[PassConfig]
    run: Callable  # run(state, config, ctx) -> state
    takes: tuple[Form, ...]  # forms the pass accepts
    gives: Form | None  # form it produces; None = the form it was given
    summary: str
    needs_data: Callable[[PassConfig], bool] = lambda cfg: False
    # check(config, model_info) -> problems found before any work starts (architecture support...)
    check: Callable[[PassConfig, object], list[str]] = lambda cfg, info: []
    # False (or a function of the config saying False): measurements of the previous stage carry over
    changes_model: bool | Callable[[PassConfig], bool] = True
    # check_order(config, form it gets or None if unknown, earlier configs) -> problems with its place in the list
    check_order: Callable[[PassConfig, Form | None, list], list[str]] = lambda cfg, form, earlier: []
    # model kinds the pass works on (state.KINDS); image classifiers only where a pass says so
    kinds: tuple[str, ...] = TEXT_KINDS

    def changes(self, cfg: PassConfig) -> bool:
        return self.changes_model(cfg) if callable(self.changes_model) else self.changes_model


def names() -> list[str]:
    return sorted(_MODULES)


def suggest(name: str) -> str:
    close = difflib.get_close_matches(name, names(), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else "run `compress passes` to list them"


def get(name: str) -> PassSpec:
    if name not in _MODULES:
        raise UserError(f"unknown pass '{name}': {suggest(name)}")
    module = importlib.import_module(_MODULES[name])
    spec = getattr(module, "PASS")
    if spec.name != name or spec.config.pass_name != name:
        raise RuntimeError(f"registry entry '{name}' points at a module defining '{spec.name}'")
    return spec


def spec_for(config: PassConfig) -> PassSpec:
    return get(config.pass_name)


def config_class(class_name: str, package: str) -> type[PassConfig] | None:
    """`from compress.passes import QuantInt8`: the config class of a registered pass in `package`."""
    for name in names():
        module_name = _MODULES[name]
        if module_name.startswith(package + "."):
            config = get(name).config
            if config.__name__ == class_name:
                return config
    return None
