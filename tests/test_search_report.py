"""Tests for compress.search_report: search.md and search.png from a synthetic search.json dict (no models)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from compress.search_report import (
    LABELS,
    figure,
    markdown,
    metric,
    plot,
    recipe_short,
    write,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUANT = [{"pass": "export.onnx"}, {"pass": "quant.int8"}]


def _trial(number: int, state: str, stage: str, recipe: list[dict], metrics: dict, **extra) -> dict:
    base = {"number": number, "state": state, "stage": stage, "recipe": recipe, "params": {}, "metrics": metrics,
            "feasible": state == "complete", "violations": {}, "seconds": 10.0 + number, "error": None}
    return {**base, **extra}


@pytest.fixture
def doc() -> dict:
    """Six trials, one per state (two complete): 0 and 3 on the front, 3 chosen (best cosine under the bound)."""
    prune = [{"pass": "prune.structured", "layers": 0.5}, {"pass": "distill.kd", "steps": 300}, *QUANT]
    return {
        "model": "minilm", "kind": "encoder", "data": "mix",
        "objectives": [{"metric": "cosine", "direction": "maximize", "label": "held-out cosine"}],
        "constraints": [{"metric": "latency", "op": "<=", "value": 0.5, "unit": "x", "text": "latency<=0.5x"}],
        "reference": {"recipe": [{"pass": "export.onnx"}, {"pass": "optimize.ort"}, {"pass": "quant.int8"}],
                      "latency_ms": 12.3, "metrics": {"cosine": 0.951, "size_mb": 22.9}},
        "latency": {"how": "this machine: batch 1 x 128 tokens, 2 threads, timed interleaved with the reference"},
        "trials": [
            _trial(0, "complete", "trained", prune,
                   {"latency": 0.31, "latency_ms": 3.8, "size_mb": 11.0, "params": 11_100_000, "cosine": 0.9012}),
            _trial(1, "pruned", "proxy", [{"pass": "prune.structured", "layers": 0.75}, *QUANT],
                   {"latency": 0.22, "cosine": 0.61}),
            _trial(2, "infeasible", "trained", QUANT,
                   {"latency": 0.58, "latency_ms": 7.1, "size_mb": 22.9, "cosine": 0.9499},
                   feasible=False, violations={"latency<=0.5x": 0.08}),
            _trial(3, "complete", "trained", [{"pass": "prune.heads", "heads": 0.25}, *QUANT],
                   {"latency": 0.48, "latency_ms": 5.9, "size_mb": 15.2, "params": 15_200_000, "cosine": 0.9301,
                    "unseen": 0.86, "mystery": 1.5}),
            _trial(4, "failed", "trained", prune, {}, feasible=False, error="RuntimeError: " + "x" * 300),
            _trial(5, "running", "proxy", prune, {}, feasible=False, seconds=None),
        ],
        "pareto": [0, 3], "chosen": 3, "seconds": 456.7,
    }


def _table(md: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table under `heading`, without header and alignment lines."""
    lines = md.split(heading, 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[2:]]


def test_markdown_front_lists_front_best_first_and_marks_chosen(doc: dict) -> None:
    md = markdown(doc)

    rows = _table(md, "## Pareto front")
    assert [r[1] for r in rows] == ["3", "0"]  # cosine 0.9301 before 0.9012
    assert rows[0][0] == "**chosen**" and rows[1][0] == ""
    assert rows[0][2] == "prune.heads(heads=0.25) -> export.onnx -> quant.int8"
    header = md.split("## Pareto front", 1)[1].splitlines()[2]
    cells = [c.strip() for c in header.strip("|").split(" | ")]
    # objective, then constraint, then the others present, in LABELS order, then unknown keys
    assert cells[3:] == [LABELS["cosine"], LABELS["latency"], "latency ms",
                         "size MB", "params", "unseen-domain cosine", "mystery"]
    assert rows[0][3:6] == ["0.9301", "0.480", "5.90"] and rows[0][7] == "15.2M"
    assert "**Chosen**: trial 3" in md
    assert "best held-out cosine among trials meeting every constraint (latency<=0.5x)" in md


def test_markdown_header_says_what_was_searched(doc: dict) -> None:
    md = markdown(doc)

    assert md.startswith("# Compression search: minilm (encoder) on mix")
    assert "maximize held-out cosine" in md and "latency<=0.5x" in md
    assert "timed interleaved with the reference" in md
    assert "`export.onnx -> optimize.ort -> quant.int8`: latency 12.30 ms, cosine 0.9510, size MB 22.9" in md
    assert ("6 in 456.7 s: 2 complete, 1 pruned by the pruner after the proxy, 1 infeasible, 1 failed, 1 running; "
            "2 stopped at the proxy stage (no training), 4 trained") in md


def test_markdown_all_trials_lists_every_trial_with_state_and_short_error(doc: dict) -> None:
    rows = _table(markdown(doc), "## All trials")

    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [r[1] for r in rows] == ["complete", "pruned", "infeasible", "complete", "failed", "running"]
    assert [r[2] for r in rows] == ["trained", "proxy", "trained", "trained", "trained", "proxy"]
    assert "latency<=0.5x +0.08" in rows[2]
    error = rows[4][-1]
    assert error.startswith("RuntimeError: xxx") and len(error) == 100
    assert rows[5][-2] == "–" and rows[0][-1] == "–"  # no seconds yet; no error


def test_markdown_names_closest_trial_when_no_trial_is_feasible(doc: dict) -> None:
    trials = [t for t in doc["trials"] if t["number"] in (1, 2, 4)]
    trials.append({**copy.deepcopy(doc["trials"][2]), "number": 7, "violations": {"latency<=0.5x": 0.31}})
    doc = {**doc, "trials": trials, "pareto": [], "chosen": None}

    md = markdown(doc)

    assert "No trial met every constraint. Closest: trial 2 (`export.onnx -> quant.int8`), total violation 0.08" in md
    assert "No trial was chosen" in md
    assert not _table(md, "## Pareto front")


def test_markdown_says_chosen_misses_constraints_when_no_trial_is_feasible(doc: dict) -> None:
    doc = {**doc, "trials": [doc["trials"][2]], "pareto": [], "chosen": 2}

    md = markdown(doc)

    assert "**Chosen**: trial 2 (`export.onnx -> quant.int8`), although no trial met every constraint" in md
    assert "best held-out cosine" not in md


def test_metric_formats_each_kind() -> None:
    assert [metric("latency", 0.4812), metric("latency_ms", 5.912), metric("size_mb", 15.23),
            metric("cosine", 0.93012), metric("params", 15_200_000), metric("params", 1_300_000_000),
            metric("other", 1234.5678), metric("ppl", None)] == \
        ["0.481", "5.91", "15.2", "0.9301", "15.2M", "1.3B", "1235", "–"]
    assert recipe_short([{"pass": "export.onnx"}, {"pass": "quant.int8", "per_channel": True}]) == \
        "export.onnx -> quant.int8(per_channel=True)"


def test_write_writes_markdown_and_png_only(doc: dict, tmp_path: Path) -> None:
    write(doc, tmp_path / "out")

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["search.md", "search.png"]
    png = (tmp_path / "out" / "search.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert (tmp_path / "out" / "search.md").read_text(encoding="utf-8") == markdown(doc)


def test_figure_draws_groups_front_chosen_and_bound(doc: dict) -> None:
    doc["trials"].append(_trial(6, "complete", "proxy", QUANT, {"latency": 0.4, "cosine": 0.7}))

    ax = figure(doc).axes[0]
    handles, labels = ax.get_legend_handles_labels()
    drawn = dict(zip(labels, handles))

    assert labels == ["complete, feasible", "complete, feasible (proxy only)", "infeasible", "pruned after the proxy",
                      "Pareto front", "chosen", "latency<=0.5x"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("latency (x reference)", "cosine")
    assert drawn["complete, feasible"].get_offsets().tolist() == [[0.31, 0.9012], [0.48, 0.9301]]
    assert len(drawn["complete, feasible"].get_facecolors()) == 1  # trained: filled
    assert len(drawn["complete, feasible (proxy only)"].get_facecolors()) == 0  # proxy only: hollow
    assert len(drawn["pruned after the proxy"].get_facecolors()) == 0
    assert drawn["chosen"].get_offsets().tolist() == [[0.48, 0.9301]] and [t.get_text() for t in ax.texts] == ["#3"]
    assert list(drawn["Pareto front"].get_xdata()) == [0.31, 0.48]
    assert list(drawn["latency<=0.5x"].get_xdata()) == [0.5, 0.5]  # the bound, dashed, on the x axis


def test_plot_handles_two_objectives_without_constraints(doc: dict, tmp_path: Path) -> None:
    doc = {**doc, "constraints": [], "objectives": [
        {"metric": "cosine", "direction": "maximize", "label": "held-out cosine"},
        {"metric": "size_mb", "direction": "minimize", "label": "size"}]}
    for t in doc["trials"]:
        t.update(feasible=t["state"] == "complete", violations={})

    plot(doc, tmp_path / "search.png")
    md = markdown(doc)
    ax = figure(doc).axes[0]

    assert (tmp_path / "search.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("size MB", "cosine")  # the second objective on x
    assert "- **Constraints**: none" in md and "maximize held-out cosine, minimize size" in md
    assert "best held-out cosine among complete trials" in md


def test_plot_and_markdown_survive_trials_without_metrics(doc: dict, tmp_path: Path) -> None:
    for t in doc["trials"]:
        t["metrics"] = {}
    doc["reference"] = {}

    plot(doc, tmp_path / "search.png")
    md = markdown(doc)

    png = (tmp_path / "search.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert [t.get_text() for t in figure(doc).axes[0].texts] == ["no trial has both latency (x reference) and cosine"]
    assert [r[0] for r in _table(md, "## All trials")] == ["0", "1", "2", "3", "4", "5"]
    assert _table(md, "## All trials")[0][4] == "–"  # cosine column: not measured


def test_markdown_handles_empty_search() -> None:
    md = markdown({"model": "m", "kind": "encoder", "data": "mix", "trials": [], "pareto": [], "chosen": None})

    assert "No trials ran." in md and "No trial was chosen" in md
