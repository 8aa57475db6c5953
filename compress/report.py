"""Human-readable views of a pipeline report: report.md, report.png and a rich terminal table.

The report dict (see `write_all`) lists stage 0 (the input model) and then one stage per pass,
each with params, bytes, fidelity to the input (`cosine` for encoders, `kl`/`top1` for
classifiers and causal LMs), for encoders and classifiers the same fidelity on an unseen domain
(`fidelity_unseen`: technical documentation never trained on, columns "unseen-domain cosine" /
"unseen-domain kl" / "unseen-domain top1"), task metrics, latency percentiles (causal LMs with a KV cache also
`ttft_ms` and `tokens_per_s` in `latency_ms`: columns "TTFT ms" and "tok/s"), plus whatever its pass
noted (ctx.notes). Any numeric field may be None (not measured): tables show "–" and plots skip the point.
Sizes are decimal megabytes (bytes / 1e6).

This module knows no pass: a pass's notes are shown by its own `PassSpec.report`, found through the registry
(`write_markdown` only lays the sections out), with the helpers below (`fmt`, `mb`, `md_table`,
`stage_label`), so every section formats numbers alike."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress import registry

if TYPE_CHECKING:
    from rich.table import Table

DASH = "–"
FIDELITY_KEYS = ("cosine", "kl", "top1")
UNSEEN = "unseen-domain"  # column prefix of `fidelity_unseen` (compress/measure.py)
LATENCY_KEYS = ("p50", "p90", "p99")
GENERATION_COLUMNS = (("ttft_ms", "TTFT ms", ".1f"), ("tokens_per_s", "tok/s", ".1f"))  # causal LMs with a KV cache


def is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any, spec: str) -> str:
    """Format a number with `spec`, "–" for None, str() for anything non-numeric."""
    if value is None:
        return DASH
    return format(value, spec) if is_num(value) else str(value)


def mb(nbytes: Any) -> float | None:
    return nbytes / 1e6 if is_num(nbytes) else None


def _fidelity_keys(stages: list[dict]) -> list[str]:
    """Fidelity keys present in any stage: cosine, kl, top1 first, then any others."""
    seen = {k for s in stages for k in (s.get("fidelity") or {})}
    return [k for k in FIDELITY_KEYS if k in seen] + sorted(seen - set(FIDELITY_KEYS))


def _unseen_keys(stages: list[dict]) -> list[str]:
    """Fidelity keys measured on the unseen domain in any stage (the main ones: cosine, kl, top1)."""
    seen = {k for s in stages for k in (s.get("fidelity_unseen") or {})}
    return [k for k in FIDELITY_KEYS if k in seen]


def _metric_keys(stages: list[dict]) -> list[str]:
    """Metric names over all stages, in order of first appearance."""
    keys: list[str] = []
    for stage in stages:
        keys += [k for k in (stage.get("metrics") or {}) if k not in keys]
    return keys


def _has_generation(stages: list[dict]) -> bool:
    """Whether any stage measured generation (TTFT / tokens/s): only causal LMs with a KV cache do."""
    return any(is_num((s.get("latency_ms") or {}).get(key)) for s in stages for key, _, _ in GENERATION_COLUMNS)


def _stage_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows of the stage table, shared by markdown and rich."""
    stages = report.get("stages") or []
    fid_keys, met_keys, unseen_keys = _fidelity_keys(stages), _metric_keys(stages), _unseen_keys(stages)
    gen = GENERATION_COLUMNS if _has_generation(stages) else ()
    headers = ["#", "stage", "form", "params", "MB", *fid_keys, *(f"{UNSEEN} {k}" for k in unseen_keys), *met_keys,
               *(f"{k} ms" for k in LATENCY_KEYS), *(title for _, title, _ in gen), "seconds"]
    rows = []
    for stage in stages:
        fid, met = stage.get("fidelity") or {}, stage.get("metrics") or {}
        unseen, lat = stage.get("fidelity_unseen") or {}, stage.get("latency_ms") or {}
        rows.append([
            fmt(stage.get("index"), "d"), str(stage.get("name", DASH)), str(stage.get("form", DASH)),
            fmt(stage.get("params"), ",d"), fmt(mb(stage.get("bytes")), ".1f"),
            *(fmt(fid.get(k), ".4f") for k in fid_keys),
            *(fmt(unseen.get(k), ".4f") for k in unseen_keys),
            *(fmt(met.get(k), ".3f") for k in met_keys),
            *(fmt(lat.get(k), ".2f") for k in LATENCY_KEYS),
            *(fmt(lat.get(key), spec) for key, _, spec in gen),
            fmt(stage.get("seconds"), ".1f"),
        ])
    return headers, rows


def md_table(headers: list[str], rows: list[list[str]], left: tuple[str, ...] = ()) -> list[str]:
    """A markdown table; the columns named in `left` hold text (left-aligned), the others numbers."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    align = ["---" if h in left else "---:" for h in headers]
    return [line(headers), line(align), *(line(r) for r in rows)]


def stage_label(stage: dict) -> str:
    """How a section names the stage it describes: "stage 3 quant.int4"."""
    return f"stage {stage.get('index', '?')} {stage.get('name', '?')}"


def _title_lines(report: dict) -> list[str]:
    """Title plus model, data and latency-settings bullets."""
    lines = [f"# Compression report: {report.get('model', '?')} ({report.get('kind', '?')})", ""]
    data = report.get("data") or {}
    if data:
        lines.append(f"- **Data**: {data.get('source', '?')}: {fmt(data.get('train'), ',d')} train"
                     f" / {fmt(data.get('eval'), ',d')} eval samples")
    if isinstance(data.get("sources"), dict):  # a corpus of several sources (`mix`)
        parts = [f"{name} {fmt(n.get('train'), ',d')} / {fmt(n.get('eval'), ',d')}"
                 for name, n in data["sources"].items() if isinstance(n, dict)]
        lines.append(f"- **Data sources** (train / eval): {', '.join(parts)}")
    unseen = report.get("unseen_domain") or {}
    if unseen:
        lines.append(f"- **Unseen domain** (\"{UNSEEN}\" columns): fidelity on {fmt(unseen.get('samples'), 'd')} "
                     f"samples of {unseen.get('source', '?')}, a domain no built-in training corpus holds"
                     + (" (though `wide`'s docstrings are technical documentation too: a near domain, no shared "
                        "passage)" if "docstrings" in (data.get("sources") or {}) else ""))
    lat = (report.get("settings") or {}).get("latency") or {}
    if lat:
        shape = (f"images of {'x'.join(str(d) for d in data['shape'][1:])}" if data.get("shape")
                 else f"seq {fmt(lat.get('seq'), 'd')}")
        lines.append(f"- **Latency**: batch {fmt(lat.get('batch'), 'd')}, {shape}, "
                     f"{fmt(lat.get('threads'), 'd')} threads, {fmt(lat.get('warmup'), 'd')} warmup, "
                     f"{fmt(lat.get('runs'), 'd')} runs")
    if lat and _has_generation(report.get("stages") or []):
        lines.append(f"- **Generation** (KV cache, greedy): prompt {fmt(lat.get('prompt_tokens'), 'd')} real tokens, "
                     f"{fmt(lat.get('new_tokens'), 'd')} new tokens, median of {fmt(lat.get('generate_runs'), 'd')} runs; "
                     f"TTFT = prompt step + first token, tok/s = decode tokens after the first / their time")
    final = report.get("final") or {}
    if final:
        lines.append(f"- **Final model**: `{final.get('path', '?')}` ({final.get('form', '?')})")
    return lines + [""]


def _ratio(num: Any, den: Any) -> float | None:
    return num / den if is_num(num) and is_num(den) and den else None


def _relative_line(stages: list[dict]) -> str:
    """Final stage relative to stage 0: size ratio, speed-up and fidelity."""
    first, last = stages[0], stages[-1]
    size = _ratio(last.get("bytes"), first.get("bytes"))
    size_txt = DASH if size is None else (
        f"{size:.2f}x size ({fmt(mb(first.get('bytes')), '.1f')} MB → {fmt(mb(last.get('bytes')), '.1f')} MB)")
    speed = _ratio((first.get("latency_ms") or {}).get("p50"), (last.get("latency_ms") or {}).get("p50"))
    if speed is None:
        speed_txt = f"latency {DASH}"
    else:
        speed_txt = f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"
        speed_txt += " (p50)"
    fid = last.get("fidelity") or {}
    fid_txt = ", ".join(f"{k} {fmt(v, '.4f')}" for k, v in fid.items()) or f"fidelity {DASH}"
    unseen = last.get("fidelity_unseen") or {}
    if unseen:
        fid_txt += "; " + ", ".join(f"{UNSEEN} {k} {fmt(unseen.get(k), '.4f')}" for k in FIDELITY_KEYS if k in unseen)
    return f"**Relative to input** (stage {last.get('index', '?')} {last.get('name', '?')}): " \
           f"{size_txt}; {speed_txt}; {fid_txt}"


def _pass_sections(stages: list[dict]) -> list[str]:
    """Each stage's section from its pass's `PassSpec.report`, in stage order; then the sections passes
    share (`report_group`), each heading once over its stages' lines, in order of first appearance."""
    lines: list[str] = []
    groups: dict[str, list[str]] = {}
    for stage in stages:
        spec = registry.find(str(stage.get("name")))  # None for stage 0 and for passes not registered here
        if spec is None or spec.report is None:
            continue
        if spec.report_group:
            groups.setdefault(spec.report_group, []).extend(spec.report(stage))
        else:
            lines += spec.report(stage)
    for heading, body in groups.items():
        if body:
            lines += [f"## {heading}", "", *body, ""]
    return lines


def write_markdown(report: dict, path: Path) -> None:
    """Write report.md: title, stage table, final-vs-input line, then the passes' own sections."""
    stages = report.get("stages") or []
    lines = _title_lines(report)
    lines += ["## Stages", ""]
    if stages:
        lines += md_table(*_stage_table(report), left=("stage", "form")) + ["", _relative_line(stages), ""]
    else:
        lines += ["No stages recorded.", ""]
    lines += _pass_sections(stages)
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def _fidelity_axis(stages: list[dict]) -> tuple[str, str]:
    """(key, label) for the plots' fidelity axis: cosine if any stage has it, else top1."""
    if any(is_num((s.get("fidelity") or {}).get("cosine")) for s in stages):
        return "cosine", "cosine to input"
    return "top1", "top-1 agreement with input"


def _panel(ax: Any, stages: list[dict], xfn: Any, xlabel: str, fkey: str, flabel: str) -> None:
    """One scatter-and-line panel of x (from `xfn`) against fidelity, labelled per stage."""
    pts = [(xfn(s), (s.get("fidelity") or {}).get(fkey), s) for s in stages]
    pts = [(x, y, s) for x, y, s in pts if is_num(x) and is_num(y)]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(flabel)
    ax.grid(True, alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ax.plot(xs, ys, "-", color="0.6", zorder=1)
    ax.scatter(xs, ys, zorder=2)
    xspan, yspan = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    labels: dict[tuple[int, int], tuple[float, float, list[str]]] = {}
    for x, y, s in pts:  # stages within 5% of both axes of each other share one label: "1,2"
        cell = (round((x - min(xs)) / xspan * 20), round((y - min(ys)) / yspan * 20))
        labels.setdefault(cell, (x, y, []))[2].append(str(s.get("index", "?")))
    for x, y, names in labels.values():
        ax.annotate(",".join(names), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9, va="bottom")


def write_plot(report: dict, path: Path) -> None:
    """Write a PNG with size (MB) vs fidelity and latency p50 (ms) vs fidelity, one point per stage."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    stages = report.get("stages") or []
    fkey, flabel = _fidelity_axis(stages)
    fig = Figure(figsize=(11, 4.5), dpi=110)
    size_ax, lat_ax = fig.subplots(1, 2)
    _panel(size_ax, stages, lambda s: mb(s.get("bytes")), "size (MB)", fkey, flabel)
    _panel(lat_ax, stages, lambda s: (s.get("latency_ms") or {}).get("p50"), "latency p50 (ms)",
           fkey, flabel)
    fig.suptitle(f"{report.get('model', '?')} ({report.get('kind', '?')})")
    legend = "   ".join(f"{s.get('index', '?')}: {s.get('name', '?')}" for s in stages)
    fig.text(0.5, 0.01, legend, ha="center", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(Path(path), format="png")


def summary_table(report: dict) -> Table:
    """The stage table as a rich Table, for the terminal summary at the end of a run."""
    from rich.table import Table

    headers, rows = _stage_table(report)
    table = Table(title=f"{report.get('model', '?')} ({report.get('kind', '?')})")
    for h in headers:
        table.add_column(h, justify="left" if h in ("stage", "form") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def write_all(report: dict, outdir: Path) -> list[Path]:
    """Write report.json, report.md and report.png into `outdir`; return their paths in that order."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / "report.json", outdir / "report.md", outdir / "report.png"]
    paths[0].write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    write_markdown(report, paths[1])
    write_plot(report, paths[2])
    return paths
