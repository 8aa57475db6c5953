"""The one registry of passes: dotted name -> module that defines it, imported lazily.

`compress/` never imports an algorithm module directly; it asks the registry, which imports the
module only when the pass is used (so `compress passes` or a recipe check stays cheap, and heavy
dependencies load only for the passes that need them). A pass defined outside the package (a
user's module, a test) joins with `register(spec)` instead of a line in `_MODULES`."""
from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass
from typing import Callable

from compress.config import Form, PassConfig
from compress.errors import UserError
from compress.kinds import EVERY, TEXT, Selection

ALL_KINDS = EVERY  # a pass that works on every kind of model, image classifiers included
TEXT_KINDS = TEXT  # the default: kinds fed by a tokenizer (every kind but image classifiers)

# name -> module. Adding a pass to the package = writing its module and one line here (README "Add a pass").
_MODULES: dict[str, str] = {
    "export.onnx": "compress.exporters.onnx_export",
    "optimize.ort": "compress.exporters.ort_optimize",
    "export.ort": "compress.exporters.ort_mobile",
    "export.executorch": "compress.exporters.executorch_export",
    "quant.int8": "compress.passes.quant_int8",
    "quant.int4": "compress.passes.quant_int4",
    "quant.riq": "compress.passes.riq",
    "quant.weight_only": "compress.passes.quant_weight_only",
    "export.riq": "compress.exporters.riq_export",
    "profile": "compress.passes.profile",
    "prune.homodistil": "compress.passes.prune_homodistil",
    "prune.structured": "compress.passes.prune_structured",
    "prune.experts": "compress.passes.prune_experts",
    "prune.sparse": "compress.passes.prune_sparse",
    "distill.kd": "compress.passes.distill_kd",
}
# name -> spec of the passes `register` added in this process (already imported: they come from the caller)
_REGISTERED: dict[str, PassSpec] = {}
# what `--pass NAME:k=v` and recipes can carry: lowercase dotted words, no ':' ',' or spaces
_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")


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
    # model kinds the pass works on (a compress.kinds.Selection: `kind in spec.kinds`); image classifiers only
    # where a pass says so
    kinds: Selection = TEXT_KINDS
    # report(stage record) -> this pass's markdown lines in report.md (a "## " heading, then bullets or a table;
    # [] when there is nothing to say). The record holds the pass's ctx.notes, and the pass that wrote them is
    # the one that knows how to show them: report.py only lays the sections out (compress.report has helpers)
    report: Callable[[dict], list[str]] | None = None
    # a heading several passes share because they describe one thing (quant.weight_only and quant.int4): their
    # stages' lines (`report` then returns no heading) are gathered under it once, after the per-stage sections
    report_group: str | None = None
    # proxy(config) -> the cheap stand-in `compress search` runs first to time and rank a candidate before paying for
    # this pass (a config that leaves the same architecture without training, or None: skip it); None: the pass is
    # cheap and runs as it is
    proxy: Callable[[PassConfig], PassConfig | None] | None = None

    def changes(self, cfg: PassConfig) -> bool:
        return self.changes_model(cfg) if callable(self.changes_model) else self.changes_model


def names() -> list[str]:
    return sorted([*_MODULES, *_REGISTERED])


def suggest(name: str) -> str:
    close = difflib.get_close_matches(name, names(), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else "run `compress passes` to list them"


def get(name: str) -> PassSpec:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _MODULES:
        raise UserError(f"unknown pass '{name}': {suggest(name)}")
    module = importlib.import_module(_MODULES[name])
    spec = getattr(module, "PASS")
    if spec.name != name or spec.config.pass_name != name:
        raise RuntimeError(f"registry entry '{name}' points at a module defining '{spec.name}'")
    return spec


def spec_for(config: PassConfig) -> PassSpec:
    return get(config.pass_name)


def find(name: str) -> PassSpec | None:
    """The spec of a registered pass, None for any other name: stage records name stage 0 "input", and a
    report may hold a pass registered only in the process that ran it."""
    return get(name) if name in _REGISTERED or name in _MODULES else None


def register(spec: PassSpec | str) -> PassSpec:
    """Make a pass defined outside this package usable by name (Pipeline, recipes, `--pass`, `compress
    passes`) without editing `_MODULES`: give its `PassSpec`, or the name of a module defining one as `PASS`
    (imported now, so a mistake shows here, not in the middle of a run). Lasts for this process; `unregister`
    undoes it. Returns the spec, so a module may write `PASS = registry.register(PassSpec(...))`."""
    if isinstance(spec, str):
        spec = getattr(importlib.import_module(spec), "PASS", spec)
    if not isinstance(spec, PassSpec):
        raise TypeError(f"register() takes a PassSpec or the name of a module defining PASS = PassSpec(...), got {spec!r}")
    if not _NAME.fullmatch(spec.name):
        raise UserError(f"pass name '{spec.name}' must be lowercase dotted words, like 'mylab.scale_norms'")
    if spec.config.pass_name != spec.name:
        raise UserError(f"pass '{spec.name}': its config {spec.config.__name__} has pass_name "
                        f"'{spec.config.pass_name}'; set pass_name = '{spec.name}'")
    if spec.name in _MODULES or spec.name in _REGISTERED:
        owner = _MODULES.get(spec.name) or _REGISTERED[spec.name].run.__module__
        raise UserError(f"a pass named '{spec.name}' is already registered (by {owner}): give yours another name, "
                        f"or unregister('{spec.name}') first if it replaces one you registered")
    _REGISTERED[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a pass `register` added (a test's teardown, a notebook redefining it); compress's own stay."""
    if name in _MODULES:
        raise UserError(f"'{name}' is one of compress's own passes; only passes added with register() can be removed")
    if _REGISTERED.pop(name, None) is None:
        raise UserError(f"no pass named '{name}' was registered")


def config_class(class_name: str, package: str) -> type[PassConfig] | None:
    """`from compress.passes import QuantInt8`: the config class of a registered pass in `package`."""
    for name in sorted(_MODULES):  # passes added with register() live outside the package
        module_name = _MODULES[name]
        if module_name.startswith(package + "."):
            config = get(name).config
            if config.__name__ == class_name:
                return config
    return None
