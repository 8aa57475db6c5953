"""What `compress search` searches over and for: the space of pipelines, the objectives, the constraints.

A space is a list of slots, one per position in the pipeline. A slot holds one pass, or a choice
between passes (`choose:`), and may be skipped (`optional: true`, or `none` among the choices);
`when: NAME` keeps a slot only in pipelines where the pass NAME was chosen earlier. Each parameter
of a pass is fixed (a scalar), a choice (a list, or `{choices: [...]}`) or a range
(`{low: 0, high: 0.5, step: 0.25}`, `log: true` for a log scale); `{value: [...]}` fixes a list.

    - pass: prune.structured
      optional: true
      layers: [0.0, 0.25, 0.5]
      heads: {low: 0.0, high: 0.5, step: 0.25}
    - pass: distill.kd
      when: prune.structured
      steps: [300, 600]
    - pass: export.onnx
    - choose:
        - {pass: quant.int8, per_channel: [true, false]}
        - {pass: quant.int4}

Goals are metrics of the final model: `--objective cosine` (or `max:cosine`, `min:latency`) and
`--constraint "latency<=0.5x"` (`size<=15MB`, `params<=10M`, `cosine>=0.95`, `latency<=4ms`).
Nothing here runs a model: the search (compress/search.py) samples a pass list with Optuna and
runs it as a pipeline."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from compress.errors import ConfigError, short

# metric -> (direction, unit it is reported in, what it is)
METRICS: dict[str, tuple[str, str, str]] = {
    "fidelity": ("maximize", "", "held-out fidelity as the model kind measures it: cosine for encoders, top-1 otherwise"),
    "cosine": ("maximize", "", "held-out cosine of the outputs against the input model (encoders)"),
    "unseen": ("maximize", "", "the same fidelity on text of a domain no training sample came from (encoders, classifiers)"),
    "top1": ("maximize", "", "held-out top-1 agreement with the input model (classifiers, LMs, image classifiers)"),
    "kl": ("minimize", "", "held-out KL divergence from the input model's outputs"),
    "lee50": ("maximize", "", "Lee-50 document similarity, Spearman (encoders)"),
    "polarity": ("maximize", "", "Pang-Lee polarity accuracy of a logistic regression on the embeddings (encoders)"),
    "ppl": ("minimize", "", "perplexity on 100 lee_background paragraphs (causal LMs)"),
    "latency": ("minimize", "x", "forward latency as a ratio to the reference model, timed interleaved with it"),
    "latency_ms": ("minimize", "ms", "forward latency p50 in milliseconds"),
    "size_mb": ("minimize", "MB", "size of the model file(s)"),
    "params": ("minimize", "", "parameters of the model"),
    "memory_mb": ("minimize", "MB", "peak memory of a process running the model once"),
}
ALIASES = {"size": "size_mb", "memory": "memory_mb", "perplexity": "ppl", "ppl_lee": "ppl", "file": "size_mb"}
TASK_METRICS = ("lee50", "polarity", "ppl")  # need the kind's task metrics measured
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9}  # params suffixes (case-insensitive; M = millions)
_BYTES = {"kb": 1e-3, "mb": 1.0, "gb": 1e3}  # to MB
_CONSTRAINT = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z%]*)\s*$", re.I)


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # "maximize" | "minimize"

    @property
    def text(self) -> str:
        return f"{'max' if self.direction == 'maximize' else 'min'}:{self.metric}"


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str
    value: float
    unit: str
    text: str

    def slack(self, value: float) -> float:
        """How far over the bound `value` is, relative to the bound (<= 0: met), as Optuna's
        constraints take it; comparable across constraints of different units."""
        scale = abs(self.value) or 1.0
        over = value - self.value if self.op in ("<=", "<") else self.value - value
        return over / scale

    def met(self, value: float | None) -> bool:
        if value is None:
            return False
        return {"<=": value <= self.value, "<": value < self.value, ">=": value >= self.value, ">": value > self.value}[self.op]


def metric_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in METRICS:
        raise ValueError(f"unknown metric {short(name, 40)}: one of {', '.join(METRICS)}")
    return key


def parse_objective(text: str) -> Objective:
    """`cosine`, `max:cosine`, `min:latency` -> Objective (a bare metric takes its natural direction)."""
    how, _, name = text.strip().rpartition(":")
    key = metric_name(name.strip())
    if how.strip().lower() in ("max", "maximize"):
        return Objective(key, "maximize")
    if how.strip().lower() in ("min", "minimize"):
        return Objective(key, "minimize")
    if how.strip():
        raise ValueError(f"objective {short(text, 60)}: write max:METRIC, min:METRIC or METRIC")
    return Objective(key, METRICS[key][0])


def parse_constraint(text: str) -> Constraint:
    """`latency<=0.5x`, `latency<=4ms`, `size<=15MB`, `params<=10M`, `cosine>=0.95` -> Constraint."""
    m = _CONSTRAINT.match(str(text))
    if not m:
        raise ValueError(f"constraint {short(text, 60)}: write METRIC<=VALUE or METRIC>=VALUE, e.g. latency<=0.5x, "
                         "size<=15MB, cosine>=0.95")
    name, op, number, unit = m.group(1), m.group(2), float(m.group(3)), m.group(4).lower()
    key = metric_name(name)
    if key in ("latency", "latency_ms"):
        if unit not in ("x", "ms", ""):
            raise ValueError(f"constraint {short(text, 60)}: latency is a ratio to the reference (x) or milliseconds (ms)")
        key = "latency_ms" if unit == "ms" or (key == "latency_ms" and unit == "") else "latency"
        unit = "ms" if key == "latency_ms" else "x"
    elif key in ("size_mb", "memory_mb"):
        if unit not in (*_BYTES, ""):
            raise ValueError(f"constraint {short(text, 60)}: give the size in KB, MB or GB")
        number, unit = number * _BYTES.get(unit or "mb", 1.0), "MB"
    elif key == "params":
        if unit not in _SCALE:
            raise ValueError(f"constraint {short(text, 60)}: give parameters as a number, or with k, M or B")
        number, unit = number * _SCALE[unit], ""
    elif unit not in ("", "%"):
        raise ValueError(f"constraint {short(text, 60)}: {key} takes no unit (got {unit})")
    elif unit == "%":
        number, unit = number / 100, ""
    return Constraint(key, op, number, unit, text.strip())


# ---- the space ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def suggest(self, trial: Any, key: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(key, list(self.choices))
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))
        if whole:
            return trial.suggest_int(key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        value = trial.suggest_float(key, float(self.low), float(self.high), step=self.step, log=self.log)
        return round(value, 6)  # 0.30000000000000004 -> 0.3: the recipe shows what was meant

    def extremes(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass(frozen=True)
class Option:
    """One pass with its fixed values and searched parameters."""

    name: str
    fixed: dict
    params: tuple[Param, ...]

    def entry(self, values: dict | None = None) -> dict:
        """The pass as a recipe entry; `values` for the searched parameters (default: each one's first value)."""
        values = values or {p.name: p.extremes()[0] for p in self.params}
        return {"pass": self.name, **self.fixed, **values}


@dataclass(frozen=True)
class Slot:
    options: tuple[Option | None, ...]  # None: the slot is skipped
    when: str | None = None  # kept only when this pass was chosen earlier

    def labels(self) -> list[str]:
        out = []
        for opt in self.options:
            label = "none" if opt is None else opt.name
            n = sum(1 for x in out if x.split("#")[0] == label)
            out.append(f"{label}#{n + 1}" if n else label)
        return out


@dataclass(frozen=True)
class Space:
    slots: tuple[Slot, ...]

    def sample(self, trial: Any) -> list[dict]:
        """One pass list, drawn by an Optuna trial (define-by-run: a skipped pass draws nothing)."""
        entries: list[dict] = []
        for i, slot in enumerate(self.slots):
            if slot.when and slot.when not in [e["pass"] for e in entries]:
                continue
            labels = slot.labels()
            label = trial.suggest_categorical(f"{i}", labels) if len(labels) > 1 else labels[0]
            opt = slot.options[labels.index(label)]
            if opt is None:
                continue
            entries.append(opt.entry({p.name: p.suggest(trial, f"{i}.{label}.{p.name}") for p in opt.params}))
        return entries

    def largest(self) -> list[dict]:
        """Every slot at its first pass option (skips only where a slot offers nothing else)."""
        out: list[dict] = []
        for slot in self.slots:
            opt = next((o for o in slot.options if o is not None), None)
            if opt is not None and (not slot.when or slot.when in [e["pass"] for e in out]):
                out.append(opt.entry())
        return out

    def variants(self) -> list[list[dict]]:
        """Pass lists that together try every option and every extreme value of every parameter once
        (what `check` validates against the model before a trial runs)."""
        base = self.largest()
        names = [e["pass"] for e in base]
        out = [base]
        for slot in self.slots:
            first = next((o for o in slot.options if o is not None), None)
            for opt in slot.options:
                if opt is None:
                    continue
                values = [{p.name: v} for p in opt.params for v in p.extremes()] or [{}]
                for v in values:
                    entry = opt.entry({**{p.name: p.extremes()[0] for p in opt.params}, **v})
                    if first is not None and first.name in names:
                        at = names.index(first.name)
                        out.append([*base[:at], entry, *base[at + 1:]])
        return out

    def as_list(self) -> list[dict]:
        """The space as YAML-ready data (for search.json and the study's record)."""
        def opt_doc(opt: Option | None) -> Any:
            if opt is None:
                return "none"
            params = {p.name: list(p.choices) if p.choices is not None else
                      {k: v for k, v in (("low", p.low), ("high", p.high), ("step", p.step), ("log", p.log))
                       if v is not None and v is not False}
                      for p in opt.params}
            return {"pass": opt.name, **opt.fixed, **params}
        out = []
        for slot in self.slots:
            doc = {"choose": [opt_doc(o) for o in slot.options]}
            if len(slot.options) == 2 and slot.options[0] is None and slot.options[1] is not None:
                doc = {**opt_doc(slot.options[1]), "optional": True}
            elif len(slot.options) == 1:
                doc = opt_doc(slot.options[0])
            if slot.when:
                doc["when"] = slot.when
            out.append(doc)
        return out


RANGE_KEYS = {"low", "high", "step", "log"}


def _param(name: str, value: Any, where: str) -> tuple[Param | None, Any, list[str]]:
    """-> (a searched parameter, or None and the fixed value), problems."""
    if isinstance(value, list):
        if not value:
            return None, None, [f"{where}.{name}: an empty list of choices"]
        return Param(name, choices=tuple(value)), None, []
    if isinstance(value, dict):
        if set(value) == {"value"}:
            return None, value["value"], []
        if set(value) == {"choices"} and isinstance(value["choices"], list) and value["choices"]:
            return Param(name, choices=tuple(value["choices"])), None, []
        if {"low", "high"} <= set(value) <= RANGE_KEYS:
            low, high, step = value["low"], value["high"], value.get("step")
            nums = [v for v in (low, high, step) if v is not None]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums):
                return None, None, [f"{where}.{name}: low, high and step must be numbers (got {short(value)})"]
            if low > high or (step is not None and step <= 0):
                return None, None, [f"{where}.{name}: needs low <= high and step > 0 (got {short(value)})"]
            if value.get("log") and (low <= 0 or step is not None):
                return None, None, [f"{where}.{name}: a log range needs low > 0 and no step"]
            return Param(name, low=low, high=high, step=step, log=bool(value.get("log"))), None, []
        return None, None, [f"{where}.{name}: a searched parameter is a list of choices, {{choices: [...]}}, "
                            f"{{low: A, high: B, step: S}} or {{value: FIXED}} (got {short(value)})"]
    return None, value, []


def _option(doc: Any, where: str) -> tuple[Option | None, list[str]]:
    if doc is None or doc == "none":
        return None, []
    if isinstance(doc, str):
        doc = {"pass": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("pass"), str):
        return None, [f"{where}: expected {{pass: NAME, ...}}, a pass name or none (got {short(doc)})"]
    fixed, params, problems = {}, [], []
    for key, value in doc.items():
        if key in ("pass", "optional", "when", "choose"):
            continue
        param, value, found = _param(str(key), value, where)
        problems += found
        if param is not None:
            params.append(param)
        elif not found:
            fixed[key] = value
    return Option(doc["pass"], fixed, tuple(params)), problems


def parse_space(doc: Any, source: str = "search space") -> Space:
    """A YAML list of slots -> Space; every problem at once as a ConfigError."""
    if not isinstance(doc, list) or not doc:
        raise ConfigError([f"'space' must be a non-empty list of passes (got {short(doc)})"], source)
    slots, problems = [], []
    for i, item in enumerate(doc):
        where = f"space[{i}]"
        if isinstance(item, dict) and "choose" in item:
            extra = set(item) - {"choose", "when"}
            if extra:
                problems.append(f"{where}: a 'choose' slot takes only 'choose' and 'when' (got {', '.join(map(str, extra))}); "
                                "put parameters on each choice")
            choices = item["choose"]
            if not isinstance(choices, list) or not choices:
                problems.append(f"{where}.choose: a non-empty list of passes (or none)")
                continue
            options = []
            for j, c in enumerate(choices):
                opt, found = _option(c, f"{where}.choose[{j}]")
                options.append(opt)
                problems += found
        else:
            opt, found = _option(item, where)
            problems += found
            if opt is None and not found:
                problems.append(f"{where}: 'none' alone is not a pass")
            options = [None, opt] if isinstance(item, dict) and item.get("optional") is True else [opt]
        when = item.get("when") if isinstance(item, dict) else None
        if when is not None and not isinstance(when, str):
            problems.append(f"{where}.when: a pass name (got {short(when)})")
            when = None
        slots.append(Slot(tuple(options), when))
    if problems:
        raise ConfigError(problems, source)
    return Space(tuple(slots))


# ---- built-in spaces --------------------------------------------------------------------------

def builtin(kind: str, prunable: bool) -> list[dict]:
    """The space `compress search MODEL` uses when none is given, by model kind. `prunable`: the
    architecture is one prune.structured can cut (BERT / Llama families, CNNs)."""
    if kind == "causal-lm":  # the int4 settings (README: block offsets, 8-bit lm_head, 4-bit embeddings)
        return [{"pass": "export.onnx"},
                {"pass": "quant.int4", "block_size": [32, 64, 128], "symmetric": [True, False],
                 "block_offsets": [False, True], "lm_head_bits": [4, 8], "embeddings": [False, True]}]
    if kind == "image-classifier":
        prune = [{"pass": "prune.structured", "optional": True, "channels": [0.1, 0.25, 0.4]},
                 {"pass": "distill.kd", "when": "prune.structured", "steps": [150, 300]}] if prunable else []
        # static int8 calibrates the exported graph before any fusion (optimize.ort's FusedConv can't be calibrated;
        # onnxruntime fuses the quantized graph when it loads it); float stays a candidate
        return [*prune, {"pass": "export.onnx"},
                {"choose": [{"pass": "quant.int8", "mode": "static", "per_channel": [True, False]},
                            {"pass": "quant.int8", "mode": "dynamic"}, "none"]}]
    prune = [{"pass": "prune.structured", "optional": True, "importance": "activation", "layers": [0.0, 0.25, 0.5],
              "heads": [0.0, 0.25, 0.5], "ffn": [0.0, 0.25, 0.5]},
             {"pass": "distill.kd", "when": "prune.structured", "steps": [300, 600], "freeze_embeddings": True}] if prunable else []
    return [*prune, {"pass": "export.onnx"}, {"pass": "optimize.ort"}, {"pass": "quant.int8", "per_channel": [True, False]}]


def default_objective(kind: str) -> str:
    return {"encoder": "cosine", "causal-lm": "ppl"}.get(kind, "top1")
