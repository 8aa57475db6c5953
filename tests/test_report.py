"""Tests for compress.report: report.json, report.md, report.png and the rich summary table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.report import summary_table, write_all, write_markdown, write_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _stage(index: int, name: str, form: str, **extra) -> dict:
    base = {"index": index, "name": name, "config": None if index == 0 else {"pass": name},
            "form": form, "path": f"stages/{index:02d}-{name}", "params": 22713216,
            "bytes": 90868376, "seconds": 0.0, "fidelity": {"cosine": 1.0},
            "metrics": {"lee50": 0.505, "polarity": 0.73},
            "latency_ms": {"p50": 23.4, "p90": 25.0, "p99": 27.1, "mean": 23.9}}
    return {**base, **extra}


@pytest.fixture
def report() -> dict:
    profile = {"throughput_per_s": 130.2, "peak_rss_mb": 210.5, "bytes": 23000000,
               "top_ops": [{"op": "QAttention", "ms": 1.2, "share": 0.31},
                           {"op": "MatMulInteger", "ms": 0.85, "share": 0.22}]}
    return {
        "model": "minilm", "kind": "encoder",
        "data": {"source": "builtin:wiki", "train": 4075, "eval": 128},
        "settings": {"latency": {"batch": 1, "seq": 128, "threads": 2, "warmup": 10, "runs": 50}},
        "stages": [
            _stage(0, "input", "torch"),
            _stage(1, "export.onnx", "onnx", seconds=4.21, fidelity={"cosine": 0.99998},
                   latency_ms=None),
            _stage(2, "prune.heads", "onnx", params=17000000, bytes=68000000, seconds=12.5,
                   fidelity={"cosine": 0.9871}, metrics={"lee50": 0.49, "polarity": None},
                   latency_ms={"p50": 15.12, "p90": 16.0, "p99": None, "mean": 15.3}),
            _stage(3, "quantize.dynamic", "onnx", params=17000000, bytes=23000000, seconds=3.0,
                   fidelity={"cosine": 0.9712}, latency_ms={"p50": 7.8, "p90": 8.4, "p99": 9.05}),
            _stage(4, "profile", "onnx", params=17000000, bytes=23000000, seconds=6.7,
                   fidelity={"cosine": 0.9712}, latency_ms={"p50": 7.8, "p90": 8.4, "p99": 9.05},
                   profile=profile),
        ],
        "final": {"path": "model.onnx", "form": "onnx"},
    }


@pytest.fixture
def classifier_report(report: dict) -> dict:
    """The same pipeline, classifier-style: kl/top1 fidelity and no task metrics."""
    stages = []
    for stage, (kl, top1) in zip(report["stages"], [(0.0, 1.0), (0.0001, 1.0), (0.021, 0.9844),
                                                   (None, 0.9609), (0.034, 0.9609)]):
        stages.append({**stage, "fidelity": {"kl": kl, "top1": top1}, "metrics": {}})
    return {**report, "kind": "classifier", "stages": stages}


def test_write_all_writes_three_files(report: dict, tmp_path: Path) -> None:
    paths = write_all(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    assert all(p.is_file() for p in paths)


def test_write_all_json_round_trips(report: dict, tmp_path: Path) -> None:
    json_path = write_all(report, tmp_path)[0]
    assert json.loads(json_path.read_text()) == report


def test_write_markdown_lists_every_stage(report: dict, tmp_path: Path) -> None:
    write_markdown(report, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    for stage in report["stages"]:
        assert f"| {stage['name']} |" in text


def test_write_markdown_formats_numbers(report: dict, tmp_path: Path) -> None:
    write_markdown(report, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    for expected in ("22,713,216", "90.9", "23.0", "1.0000", "0.9871", "23.40", "15.12", "9.05",
                     "0.505", "12.5"):
        assert expected in text


def test_write_markdown_title_and_settings(report: dict, tmp_path: Path) -> None:
    write_markdown(report, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Compression report: minilm (encoder)")
    assert "builtin:wiki" in text and "4,075 train" in text and "128 eval" in text
    assert "batch 1, seq 128, 2 threads, 10 warmup, 50 runs" in text


def test_write_markdown_shows_dash_for_missing(report: dict, tmp_path: Path) -> None:
    write_markdown(report, tmp_path / "report.md")
    row = next(l for l in (tmp_path / "report.md").read_text().splitlines() if "| export.onnx |" in l)
    assert "| – | – | – | 4.2 |" in row  # p50, p90, p99 not measured


def test_write_markdown_relative_to_input(report: dict, tmp_path: Path) -> None:
    write_markdown(report, tmp_path / "report.md")
    line = next(l for l in (tmp_path / "report.md").read_text().splitlines() if "Relative to input" in l)
    assert "0.25x size" in line and "3.00x faster" in line and "cosine 0.9712" in line


def test_write_markdown_profile_section(report: dict, tmp_path: Path) -> None:
    write_markdown(report, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "## Profile: stage 4 profile" in text
    assert "130.2 samples/s" in text and "210.5 MB" in text
    assert "| QAttention | 1.20 | 31.0% |" in text
    assert text.count("## Profile") == 1


def test_write_markdown_classifier_fidelity(classifier_report: dict, tmp_path: Path) -> None:
    write_markdown(classifier_report, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    header = text.splitlines()[text.splitlines().index("## Stages") + 2]
    assert "| kl | top1 |" in header and "cosine" not in header and "lee50" not in header
    assert "0.9844" in text and "0.0210" in text
    assert "kl 0.0340, top1 0.9609" in text


def test_write_plot_writes_png(report: dict, tmp_path: Path) -> None:
    write_plot(report, tmp_path / "report.png")
    data = (tmp_path / "report.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_write_plot_classifier_uses_top1(classifier_report: dict, tmp_path: Path) -> None:
    write_plot(classifier_report, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_SIGNATURE)


def test_write_plot_survives_all_missing(report: dict, tmp_path: Path) -> None:
    stages = [{**s, "bytes": None, "latency_ms": None} for s in report["stages"]]
    write_plot({**report, "stages": stages}, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_SIGNATURE)


def test_summary_table_one_row_per_stage(report: dict) -> None:
    table = summary_table(report)
    assert table.row_count == len(report["stages"])
    headers = [c.header for c in table.columns]
    assert headers[:5] == ["#", "stage", "form", "params", "MB"]
    assert list(table.columns[1].cells) == [s["name"] for s in report["stages"]]


def test_summary_table_classifier_columns(classifier_report: dict) -> None:
    headers = [c.header for c in summary_table(classifier_report).columns]
    assert "kl" in headers and "top1" in headers and "cosine" not in headers


def _note_keys(path: Path) -> set[str]:
    """Top-level keys a module writes into a stage's notes: `notes["k"] = ...`, `ctx.notes["k"]`,
    `notes.update(k=...)`, `notes.setdefault("k", ...)`."""
    import ast

    def is_notes(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id == "notes") or (isinstance(node, ast.Attribute) and node.attr == "notes")

    keys = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Subscript) and is_notes(node.value) and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_notes(node.func.value):
            keys |= {kw.arg for kw in node.keywords if kw.arg}
            keys |= {a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return keys


def test_report_py_knows_no_pass_note_key() -> None:
    """Each pass renders its own notes (PassSpec.report); report.py only lays sections out, so a note
    key written anywhere under passes/ or exporters/ must not appear as a string in report.py."""
    import ast

    import compress.report

    root = Path(__file__).parents[1]
    keys = set().union(*(_note_keys(p) for d in ("passes", "exporters") for p in (root / d).rglob("*.py")))
    source = Path(compress.report.__file__).read_text(encoding="utf-8")
    literals = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    assert {"riq", "riq_file", "riq_layers", "weight_only", "profile", "parity", "pruning"} <= keys  # the scan works
    assert not keys & literals, f"report.py formats pass notes itself: {sorted(keys & literals)}"


def test_sections_come_from_their_passes_and_shared_headings_gather_their_stages(tmp_path: Path) -> None:
    """quant.weight_only and quant.int4 share one heading, placed after the per-stage sections (profile's)."""
    wo = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False, "layers": 14, "calibration_tokens": 0}
    stages = [_stage(0, "input", "torch"), _stage(1, "quant.weight_only", "torch", weight_only=wo),
              _stage(2, "export.onnx", "onnx"),
              _stage(3, "quant.int4", "onnx", weight_only={"method": "rtn", "matmuls": 14, "layers": 14}),
              _stage(4, "profile", "onnx", profile={"throughput_per_s": 5.0, "peak_rss_mb": 9.0}),
              _stage(5, "prune.heads", "onnx", profile={"throughput_per_s": 5.0})]  # not a pass: no section

    write_markdown({"model": "m", "kind": "causal-lm", "stages": stages}, tmp_path / "report.md")

    text = (tmp_path / "report.md").read_text()
    assert text.count("## Weight-only quantization") == 1 and text.count("## Profile") == 1
    assert text.index("## Profile: stage 4 profile") < text.index("## Weight-only quantization")
    assert ("## Weight-only quantization\n\n- stage 1 quant.weight_only: rtn int4 (group 32, asymmetric) on 14 Linear "
            "layers\n- stage 3 quant.int4: 14 of the 14 layers quantized with rtn written as MatMulNBits") in text
