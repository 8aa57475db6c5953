"""Measurement levels (full / quick / off) and the input-measurement cache: quick still gives a
fidelity number per stage at a fraction of the work; a second run on the same model and data
reuses the input's measurements and says so."""
from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from compress import Pipeline, evaluate
from compress.cli import app
from compress.errors import ConfigError, UserError
from compress.measure import MeasureSettings


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


@pytest.fixture
def counting(monkeypatch):
    """How many held-out samples fidelity saw, and how many paragraphs perplexity read, per call."""
    seen = {"fidelity": [], "ppl": []}
    real_fid, real_ppl = evaluate.fidelity, evaluate.perplexity

    def fid(kind, student, teacher, tokenizer, texts, *a, **k):
        seen["fidelity"].append(len(texts))
        return real_fid(kind, student, teacher, tokenizer, texts, *a, **k)

    def ppl(run, tokenizer, texts, *a, **k):
        seen["ppl"].append(len(texts))
        return real_ppl(run, tokenizer, texts, *a, **k)

    monkeypatch.setattr(evaluate, "fidelity", fid)
    monkeypatch.setattr(evaluate, "perplexity", ppl)
    return seen


def test_quick_level_measures_fidelity_on_16_samples_and_perplexity_on_10_paragraphs(
        tiny_llama, text_file, tmp_path, fast, counting, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", "off")
    fast = {**fast, "tasks": True}

    quick = Pipeline(["export.onnx"]).run(str(tiny_llama), str(text_file), tmp_path / "q", measure="quick", **fast)
    quick_seen = {k: list(v) for k, v in counting.items()}
    counting["fidelity"].clear(), counting["ppl"].clear()
    full = Pipeline(["export.onnx"]).run(str(tiny_llama), str(text_file), tmp_path / "f", **fast)

    assert quick_seen == {"fidelity": [8, 8], "ppl": [10, 10]}  # 40 news lines: 8 held out, all within 16
    assert counting["ppl"] == [100, 100]
    for stage in quick.report["stages"]:
        assert set(stage["fidelity"]) == {"kl", "top1"} and set(stage["metrics"]) == {"ppl_lee10"}
        assert stage["latency_ms"]["p50"] > 0
    assert all(set(s["metrics"]) == {"ppl_lee"} for s in full.report["stages"])
    assert quick.report["settings"]["measure"] == "quick" and full.report["settings"]["measure"] == "full"
    assert "measure: quick" in (tmp_path / "q" / "recipe.yaml").read_text()


def test_quick_level_caps_fidelity_samples_at_16(tiny_bert, tmp_path, fast, counting, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", "off")

    result = Pipeline(["export.onnx"]).run(str(tiny_bert), "lee", tmp_path / "q", measure="quick", **fast)

    assert counting["fidelity"] == [16, 16] * 2  # per stage: 16 of lee's 60 held-out paragraphs, 16 unseen-domain
    assert result.report["stages"][1]["fidelity"]["cosine"] > 0.99


def test_off_level_records_size_only(tiny_bert, text_file, tmp_path, fast, counting):
    result = Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "o", measure="off", **fast)

    for stage in result.report["stages"]:
        assert stage["params"] > 0 and stage["bytes"] > 0
        assert "fidelity" not in stage and stage["metrics"] == {} and stage["latency_ms"] is None
    assert counting["fidelity"] == []


def test_second_run_reuses_the_input_measurements_and_says_so(tiny_bert, text_file, tmp_path, fast, counting,
                                                              monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    first_console, first_out = _console()
    second_console, second_out = _console()

    first = Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "a",
                                          **{**fast, "console": first_console})
    calls_first = len(counting["fidelity"])
    second = Pipeline(["export.onnx", "quant.int8"]).run(str(tiny_bert), str(text_file), tmp_path / "b",
                                                         **{**fast, "console": second_console})

    assert "reused from the cache" not in first_out.getvalue()
    assert "input measurements reused from the cache" in second_out.getvalue()
    assert second.report["stages"][0]["fidelity"] == first.report["stages"][0]["fidelity"]
    assert second.report["stages"][0]["latency_ms"] == first.report["stages"][0]["latency_ms"]
    # export and int8 stages only (held-out and unseen-domain samples each): the input came from the cache
    assert len(counting["fidelity"]) - calls_first == 4
    # the cached teacher outputs give the same fidelity as a fresh measurement
    assert second.report["stages"][1]["fidelity"] == pytest.approx(first.report["stages"][1]["fidelity"], abs=1e-6)


def test_cache_is_not_reused_when_data_or_level_differ(tiny_bert, text_file, tmp_path, fast, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other.txt"
    other.write_text("\n".join(text_file.read_text().splitlines()[:30]) + "\n")
    Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "a", **fast)

    for data, level, out in ((other, "full", "b"), (text_file, "quick", "c")):
        console, buf = _console()
        Pipeline(["export.onnx"]).run(str(tiny_bert), str(data), tmp_path / out, measure=level,
                                      **{**fast, "console": console})
        assert "reused from the cache" not in buf.getvalue()


def test_measure_level_is_checked_in_python_cli_and_recipe(tiny_bert, tmp_path):
    with pytest.raises(UserError, match="measure must be one of full, quick, off"):
        MeasureSettings.of("fast")
    result = CliRunner().invoke(app, ["run", str(tiny_bert), "--pass", "export.onnx", "--measure", "fast",
                                      "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "measure must be one of" in result.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text("measure: fast\npasses:\n  - pass: quant.int9\n")
    with pytest.raises(ConfigError, match="(?s)'measure' must be one of full, quick, off.*quant.int9"):
        Pipeline.from_recipe(recipe).validate(str(tiny_bert))
    assert not (tmp_path / "o").exists()


def test_recipe_measure_key_sets_the_level(tiny_bert, text_file, tmp_path, fast):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("measure: off\npasses:\n  - pass: export.onnx\n")

    result = Pipeline.from_recipe(recipe).run(str(tiny_bert), str(text_file), tmp_path / "o", **fast)

    assert result.report["settings"]["measure"] == "off"
    assert all(s["latency_ms"] is None for s in result.report["stages"])
