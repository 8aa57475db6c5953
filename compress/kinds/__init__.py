"""Model kinds: one object per kind of model (encoder, classifier, causal LM, image classifier),
owning what differs between them (compress/kinds/base.py lists it). Lookup and registration:

    from compress import kinds
    kinds.get("causal-lm")            # the kind; a ModelKind given is returned as it is
    kinds.ALL                         # {name: kind}: the built-in kinds, then those register() added
    kinds.register(MY_KIND)           # a new kind for this process (README: "Add a model kind")
    kinds.of_module(module), kinds.from_config(config), kinds.from_graph(inputs, outputs)   # detection

Detection asks every registered kind how surely it recognises the model (NO, FALLBACK, YES); the
surest answer wins, and between equal answers the kind registered last, so a registered kind
can claim models a built-in one would otherwise take. A pass lists the kinds it works on as a
`Selection` (a rule, so kinds registered later are judged too)."""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from compress.errors import UserError
from compress.kinds import causal_lm, classifier, encoder, image_classifier
from compress.kinds.base import (FALLBACK, NO, YES, Cosine, Logits, LogitsOutput, ModelKind, TextInputs, TorchModule,
                                 Transformers)
from compress.kinds.image_classifier import ImageInputs

__all__ = ["ALL", "EVERY", "FALLBACK", "NO", "TEXT", "YES", "Cosine", "ImageInputs", "Logits", "LogitsOutput", "ModelKind",
           "Selection", "TextInputs", "TorchModule", "Transformers", "from_config", "from_graph", "get", "names",
           "of_module", "register", "unregister"]

ALL: dict[str, ModelKind] = {}
_BUILT_IN: set[str] = set()


def register(kind: ModelKind, replace: bool = False) -> ModelKind:
    """Make `kind` known by its name for this process: `get`, detection, and every pass whose
    `Selection` admits it. A built-in kind cannot be replaced; one you registered can, with
    `replace=True`. Returns the kind (so a module may write `KIND = kinds.register(MyKind(...))`)."""
    if not isinstance(kind, ModelKind):
        raise TypeError(f"register() takes a ModelKind, got {type(kind).__name__}")
    if not kind.name or kind.name != kind.name.strip():
        raise UserError(f"a model kind needs a name without surrounding spaces (got {kind.name!r})")
    if kind.name in ALL and (kind.name in _BUILT_IN or not replace):
        raise UserError(f"a model kind named '{kind.name}' is already registered: give yours another name"
                        + ("" if kind.name in _BUILT_IN else ", or register(kind, replace=True)"))
    ALL[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind `register` added (a test's teardown); the built-in kinds stay."""
    if name in _BUILT_IN:
        raise UserError(f"'{name}' is one of compress's own model kinds; only kinds added with register() can be removed")
    if ALL.pop(str(name), None) is None:
        raise UserError(f"no model kind named '{name}' was registered")


def names() -> list[str]:
    return list(ALL)


def get(kind: str | ModelKind) -> ModelKind:
    """The registered kind of that name (a ModelKind is returned as it is); an unknown name is a
    UserError naming the known ones."""
    if isinstance(kind, ModelKind):
        return kind
    found = ALL.get(kind) if isinstance(kind, str) else None
    if found is None:
        close = difflib.get_close_matches(str(kind), names(), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown model kind {kind!r}: {hint}the known kinds are {', '.join(names())} "
                        "(add one with compress.kinds.register)")
    return found


def _surest(answers: Callable[[ModelKind], int], what: str) -> ModelKind:
    best, best_score = None, NO
    for kind in ALL.values():  # registration order: on a tie the later kind wins
        score = answers(kind)
        if score and score >= best_score:
            best, best_score = kind, score
    if best is None:
        raise UserError(f"no model kind recognises {what} (known kinds: {', '.join(names())})")
    return best


def from_config(config: Any) -> ModelKind:
    """The kind of a transformers model with this config."""
    return _surest(lambda kind: kind.recognise_config(config), f"the config of a {type(config).__name__}")


def from_graph(inputs: list[str], outputs: list[tuple[str, tuple]]) -> ModelKind:
    """The kind of an ONNX graph: its input names, and its (output name, shape) in order."""
    return _surest(lambda kind: kind.recognise_graph(list(inputs), list(outputs)), "this ONNX graph")


def of_module(module: Any) -> ModelKind:
    """The kind of a torch module given in Python (a transformers model: by its config)."""
    return _surest(lambda kind: kind.recognise_module(module), f"a {type(module).__name__} module")


@dataclass(frozen=True)
class Selection:
    """The kinds a pass works on, as a rule over kinds: `kind in selection` takes a kind or a name
    (an unknown name is not in it); iterating gives the names of the registered kinds it admits."""

    description: str
    admits: Callable[[ModelKind], bool]

    def __contains__(self, kind: object) -> bool:
        try:
            return bool(self.admits(get(kind)))
        except UserError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, kind in ALL.items() if self.admits(kind)])

    def __repr__(self) -> str:
        return f"Selection({self.description}: {', '.join(self)})"


EVERY = Selection("every kind", lambda kind: True)
TEXT = Selection("kinds fed by a tokenizer", lambda kind: kind.uses_tokenizer)

# The built-in kinds, one line each: a new kind is its module plus a line here (or register() at run time).
for _kind in (encoder.KIND, classifier.KIND, causal_lm.KIND, image_classifier.KIND):
    register(_kind)
    _BUILT_IN.add(_kind.name)
