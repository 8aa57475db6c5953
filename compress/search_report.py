"""Human-readable views of a `compress search` run: search.md and search.png, from the search.json dict
(objectives, constraints, reference, Optuna trials with state, stage "proxy" / "trained" / "full", recipe, metrics and
violations, the Pareto front and the chosen trial; written by compress/search.py). search.md says what was searched,
how the trials ended, the front (best first objective first) and why the chosen trial won, or which trial came
closest when none met every constraint; search.png plots the first objective against the constrained metric (else
the second objective, else latency / size). Any metric may be missing: tables show "–", plots skip the point."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.report import DASH, fmt, is_num, md_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LABELS = {
    "latency": "latency (x reference)", "latency_ms": "latency ms", "size_mb": "size MB", "params": "params",
    "memory_mb": "memory MB", "cosine": "cosine", "unseen": "unseen-domain cosine", "kl": "kl", "top1": "top1",
    "lee50": "lee50", "polarity": "polarity", "ppl": "perplexity",
}
FORMATS = {"latency": ".3f", "latency_ms": ".2f", "size_mb": ".1f", "memory_mb": ".1f", "cosine": ".4f",
           "unseen": ".4f", "kl": ".4f", "top1": ".4f", "lee50": ".3f", "polarity": ".3f", "ppl": ".2f"}
STATES = ("complete", "pruned", "infeasible", "failed", "running")
STATE_WORDS = {"pruned": "pruned by the pruner after the proxy"}
ERROR_CHARS = 100
STYLES = {"feasible": ("o", "C0", "complete, feasible"), "infeasible": ("X", "0.45", "infeasible"),  # marker, colour
          "pruned": ("o", "0.6", "pruned after the proxy")}


def _latency_unit(doc: dict) -> str:
    """The unit of the `latency` metric: "x" (ratio to the reference) unless a constraint says otherwise."""
    units = [c.get("unit") for c in doc.get("constraints") or [] if c.get("metric") == "latency" and c.get("unit")]
    return units[0] if units else "x"


def label(key: str, doc: dict | None = None) -> str:
    """Human label of a metric key, with its unit; unknown keys are shown as they are."""
    if key == "latency" and doc is not None and _latency_unit(doc) != "x":
        return f"latency {_latency_unit(doc)}"
    return LABELS.get(key, key)


def metric(key: str, value: Any) -> str:
    """A metric value formatted for its kind: ratios 3 decimals, ms 2, MB 1, cosine 4, params 15.2M."""
    if key == "params" and is_num(value):
        for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
            if abs(value) >= scale:
                return f"{value / scale:.1f}{suffix}"
        return f"{value:.0f}"
    return fmt(value, FORMATS.get(key, ".4g"))


def recipe_short(recipe: list[dict] | None) -> str:
    """`prune.structured(layers=0.5) -> distill.kd(steps=300) -> export.onnx`: each pass with the params given."""
    def one(step: dict) -> str:
        params = {k: v for k, v in step.items() if k != "pass"}
        if not params:
            return str(step.get("pass", "?"))
        shown = ", ".join(f"{k}={format(v, 'g') if isinstance(v, float) else v}" for k, v in params.items())
        return f"{step.get('pass', '?')}({shown})"
    return " -> ".join(one(s) for s in recipe or []) or DASH


def _objective_words(obj: dict, doc: dict) -> str:
    return f"{obj.get('direction', 'maximize')} {obj.get('label') or label(str(obj.get('metric')), doc)}"


def _constraint_words(con: dict) -> str:
    return con.get("text") or f"{con.get('metric')}{con.get('op', '?')}{con.get('value')}{con.get('unit', '')}"


def _columns(doc: dict, trials: list[dict]) -> list[str]:
    """Metric keys for the tables: the objectives', then the constraints', then any other present."""
    keys = [o.get("metric") for o in doc.get("objectives") or []]
    keys += [c.get("metric") for c in doc.get("constraints") or []]
    seen = {k for t in trials for k in (t.get("metrics") or {})}
    keys += [k for k in LABELS if k in seen] + sorted(seen - set(LABELS))
    return list(dict.fromkeys(k for k in keys if k))


def _sort_key(doc: dict):
    """Best first on the first objective; trials lacking it last."""
    objs = doc.get("objectives") or [{}]
    key, sign = objs[0].get("metric"), -1 if objs[0].get("direction", "maximize") == "maximize" else 1
    def order(trial: dict) -> tuple:
        value = (trial.get("metrics") or {}).get(key)
        return (not is_num(value), sign * value if is_num(value) else 0, trial.get("number", 0))
    return order


def _total_violation(trial: dict) -> float:
    return sum(v for v in (trial.get("violations") or {}).values() if is_num(v) and v > 0)


def closest(trials: list[dict]) -> dict | None:
    """The finished trial nearest to meeting every constraint (least total violation, then the lowest
    number); a pruned trial's violations come from its untrained proxy, so it does not count. None: no
    finished trial missed a constraint."""
    over = [t for t in trials if t.get("state") in ("complete", "infeasible") and t.get("violations")]
    return min(over, key=lambda t: (_total_violation(t), t.get("number", 0)), default=None)


def _violations(trial: dict) -> str:
    return "; ".join(f"{text} +{fmt(v, '.3g')}" for text, v in (trial.get("violations") or {}).items()) or DASH


def _header(doc: dict) -> list[str]:
    """Title, objectives, constraints, latency, reference and the trial count."""
    lines = [f"# Compression search: {doc.get('model', '?')} ({doc.get('kind', '?')}) on {doc.get('data', '?')}", ""]
    objs = doc.get("objectives") or []
    lines.append(f"- **Objectives**: {', '.join(_objective_words(o, doc) for o in objs) or DASH}")
    cons = doc.get("constraints") or []
    lines.append(f"- **Constraints**: {', '.join(_constraint_words(c) for c in cons) or 'none'}")
    how = (doc.get("latency") or {}).get("how")
    if how:
        ratio = " (latency x = ratio to the reference's latency)" if _latency_unit(doc) == "x" else ""
        lines.append(f"- **Latency** measured on {how}{ratio}")
    ref = doc.get("reference") or {}
    if ref:
        values = [f"latency {metric('latency_ms', ref.get('latency_ms'))} ms"] if ref.get("latency_ms") is not None else []
        values += [f"{label(k, doc)} {metric(k, v)}" for k, v in (ref.get("metrics") or {}).items()]
        lines.append(f"- **Reference**: `{recipe_short(ref.get('recipe'))}`: {', '.join(values) or DASH}")
    trials = doc.get("trials") or []
    counts = {s: sum(t.get("state") == s for t in trials) for s in dict.fromkeys([*STATES, *(t.get("state") for t in trials)])}
    states = ", ".join(f"{n} {STATE_WORDS.get(s, s)}" for s, n in counts.items() if n)
    proxy = sum(t.get("stage") == "proxy" for t in trials)
    trained = sum(t.get("stage") == "trained" for t in trials)
    lines.append(f"- **Trials**: {len(trials)} in {fmt(doc.get('seconds'), '.1f')} s: {states or 'none'}; "
                 f"{proxy} stopped at the proxy stage (no training), {trained} trained, "
                 f"{sum(t.get('stage') == 'full' for t in trials)} without training passes")
    return lines + [""]


def _row(trial: dict, keys: list[str]) -> list[str]:
    return [str(trial.get("number", "?")), recipe_short(trial.get("recipe")),
            *(metric(k, (trial.get("metrics") or {}).get(k)) for k in keys)]


def _front(doc: dict) -> list[str]:
    """The Pareto-front table, best first objective first, and why the chosen trial was chosen."""
    trials = doc.get("trials") or []
    by_number = {t.get("number"): t for t in trials}
    front = sorted((by_number[n] for n in doc.get("pareto") or [] if n in by_number), key=_sort_key(doc))
    chosen, cons, objs = doc.get("chosen"), doc.get("constraints") or [], doc.get("objectives") or [{}]
    lines = ["## Pareto front", ""]
    if front:
        keys = _columns(doc, front)
        rows = [["**chosen**" if t.get("number") == chosen else "", *_row(t, keys)] for t in front]
        lines += md_table(["chosen", "trial", "recipe", *(label(k, doc) for k in keys)], rows,
                          left=("chosen", "recipe")) + [""]
    feasible = any(_group(t) == "feasible" for t in trials)
    if not feasible:
        lines.append(_no_feasible(trials, bool(cons)))
    elif not front:
        lines.append("The Pareto front is empty.")
    if chosen is None:
        return lines + ["No trial was chosen: no model was exported.", ""]
    among = (f"among trials meeting every constraint ({', '.join(_constraint_words(c) for c in cons)})"
             if cons else "among complete trials")
    why = f"the best {objs[0].get('label') or label(str(objs[0].get('metric')), doc)} {among}" if feasible \
        else "although no trial met every constraint"
    recipe = recipe_short(by_number.get(chosen, {}).get("recipe"))
    return lines + [f"**Chosen**: trial {chosen} (`{recipe}`), {why}; its model was exported.", ""]


def _no_feasible(trials: list[dict], constrained: bool) -> str:
    """Say that no trial met the constraints and name the closest one (least total violation)."""
    if not constrained:
        return "No trial completed, so there is no Pareto front."
    best = closest(trials)
    if best is None:
        return "No trial met every constraint, and none was measured far enough to say which came closest."
    return (f"No trial met every constraint. Closest: trial {best.get('number', '?')} "
            f"(`{recipe_short(best.get('recipe'))}`), total violation {fmt(_total_violation(best), '.3g')}: "
            f"{_violations(best)}.")


def _all_trials(doc: dict) -> list[str]:
    """Every trial by number: state, stage, recipe, metrics, violations, seconds, error."""
    trials = sorted(doc.get("trials") or [], key=lambda t: t.get("number", 0))
    if not trials:
        return ["## All trials", "", "No trials ran.", ""]
    keys = _columns(doc, trials)
    errors = any(t.get("error") for t in trials)
    headers = ["trial", "state", "stage", "recipe", *(label(k, doc) for k in keys), "violations", "seconds"]
    rows = []
    for t in trials:
        number, recipe, *values = _row(t, keys)
        error = " ".join(str(t.get("error") or "").split())
        error = error if len(error) <= ERROR_CHARS else error[:ERROR_CHARS - 1] + "…"
        rows.append([number, str(t.get("state", DASH)), str(t.get("stage", DASH)), recipe, *values,
                     _violations(t), fmt(t.get("seconds"), ".1f"), *([error or DASH] if errors else [])])
    left = ("state", "stage", "recipe", "violations", "error")
    return ["## All trials", "", *md_table(headers + (["error"] if errors else []), rows, left=left), ""]


def markdown(doc: dict) -> str:
    """search.md: what was searched, the reference, the trial count, the Pareto front and every trial."""
    return "\n".join(_header(doc) + _front(doc) + _all_trials(doc))


def _axes_keys(doc: dict) -> tuple[str | None, str | None]:
    """(x, y): y the first objective; x the first constrained metric, else the second objective, else latency / size."""
    objs, cons = doc.get("objectives") or [], doc.get("constraints") or []
    y = objs[0].get("metric") if objs else None
    if cons:
        return cons[0].get("metric"), y
    if len(objs) > 1:
        return objs[1].get("metric"), y
    has_latency = any(is_num((t.get("metrics") or {}).get("latency")) for t in doc.get("trials") or [])
    return ("latency" if has_latency else "size_mb"), y


def _x_maximized(doc: dict, xkey: str | None) -> bool:
    """Whether more is better on the x axis: a maximized objective or a ">=" constraint (latency, size: less)."""
    return any(o.get("metric") == xkey and o.get("direction") == "maximize" for o in doc.get("objectives") or []) \
        or any(c.get("metric") == xkey and str(c.get("op", "")).startswith(">") for c in doc.get("constraints") or [])


def _group(trial: dict) -> str | None:
    """The trial's key in STYLES: feasible, infeasible or pruned; None when failed / running (nothing to plot)."""
    state = trial.get("state")
    if state == "complete":
        return "feasible" if trial.get("feasible") is not False else "infeasible"
    return state if state in ("pruned", "infeasible") else None


def _title(doc: dict) -> str:
    objs = ", ".join(_objective_words(o, doc) for o in doc.get("objectives") or []) or "search"
    cons = ", ".join(_constraint_words(c) for c in doc.get("constraints") or [])
    return f"{doc.get('model', '?')}: {objs}" + (f" subject to {cons}" if cons else "")


def _points(doc: dict, xkey: str | None, ykey: str | None) -> list[tuple[float, float, dict]]:
    """(x, y, trial) of every plottable trial (complete, infeasible or pruned) with both values."""
    pts = [((t.get("metrics") or {}).get(xkey), (t.get("metrics") or {}).get(ykey), t) for t in doc.get("trials") or []]
    return [(x, y, t) for x, y, t in pts if is_num(x) and is_num(y) and _group(t)]


def figure(doc: dict) -> Figure:
    """The search plot (see `plot`) as a matplotlib Figure: filled markers = trained, hollow = proxy stage only."""
    from matplotlib.figure import Figure

    xkey, ykey = _axes_keys(doc)
    pts = _points(doc, xkey, ykey)
    fig = Figure(figsize=(8, 5.5), dpi=110)
    ax = fig.subplots()
    ax.set(xlabel=label(xkey, doc) if xkey else DASH, ylabel=label(ykey, doc) if ykey else DASH)
    ax.grid(True, alpha=0.3)
    fig.suptitle(_title(doc), fontsize=10)
    if not pts:
        ax.text(0.5, 0.5, f"no trial has both {ax.get_xlabel()} and {ax.get_ylabel()}",
                ha="center", va="center", transform=ax.transAxes)
    for group, (marker, color, name) in STYLES.items():
        for proxy in (False, True):
            sel = [(x, y) for x, y, t in pts if _group(t) == group and (t.get("stage") == "proxy") == proxy]
            if sel:
                hollow, tag = proxy or group == "pruned", " (proxy only)" if proxy and group != "pruned" else ""
                ax.scatter(*zip(*sel), marker=marker, s=45, zorder=3, facecolors="none" if hollow else color,
                           edgecolors=color, label=name + tag)
    front = sorted((p for p in pts if p[2].get("number") in (doc.get("pareto") or [])), key=lambda p: (p[0], p[1]))
    if front:  # the boundary of what the front attains: flat towards the worse x
        ax.step([p[0] for p in front], [p[1] for p in front], where="pre" if _x_maximized(doc, xkey) else "post",
                color="C1", zorder=2, label="Pareto front")
    for x, y, t in (p for p in pts if p[2].get("number") == doc.get("chosen")):
        ax.scatter([x], [y], marker="*", s=260, color="C3", edgecolors="k", zorder=4, label="chosen")
        ax.annotate(f"#{t.get('number')}", (x, y), textcoords="offset points", xytext=(8, 6), fontsize=10)
    for con in (c for c in doc.get("constraints") or [] if is_num(c.get("value"))):
        if con.get("metric") in (xkey, ykey):  # the bound, where its metric is an axis
            line = ax.axvline if con.get("metric") == xkey else ax.axhline
            line(con["value"], ls="--", color="C3", alpha=0.7, label=_constraint_words(con))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot(doc: dict, path: Path) -> None:
    """Write search.png: the first objective against the first constrained metric (else the second objective,
    else latency, else size); the Pareto front as a step line, the chosen trial starred, the bound dashed."""
    import matplotlib
    matplotlib.use("Agg")
    figure(doc).savefig(Path(path), format="png")


def write(doc: dict, folder: Path) -> None:
    """Write folder/search.md and folder/search.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "search.md").write_text(markdown(doc), encoding="utf-8")
    plot(doc, folder / "search.png")
