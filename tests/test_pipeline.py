"""The pipeline end to end on tiny models: every pass runs, parity, quantized ops, report,
cache and resume, atomic outputs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from compress import Pipeline, registry
from compress.errors import ConfigError, OutputExistsError, PassFailed

# The shortest chain that brings a model in the torch form to the form each pass takes.
PREFIX = {"torch": [], "onnx": ["export.onnx"], "ort": ["export.onnx", "export.ort"]}
# Training passes: a few steps on short samples are enough to exercise them.
FAST = {"steps": 6, "batch_size": 4, "max_length": 32}
QUICK = {"prune.homodistil": {**FAST, "mask_every": 2}, "distill.kd": FAST,  # prune.structured: one shot
         "quant.riq": {"calibration_samples": 8}, "prune.experts": {"calibration_samples": 8, "max_length": 32},
         "quant.weight_only": {"samples": 4, "max_length": 32}}
REQUIRES = {"export.riq": [{"pass": "quant.riq", "calibration_samples": 8}]}  # passes that must come right before


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


MODEL_FOR = {"prune.experts": "tiny_mixtral"}  # passes that need another architecture than BERT
OPTIONAL = {"export.executorch": "executorch"}  # passes whose dependency is an optional extra: skipped without it


@pytest.mark.parametrize("name", registry.names())
def test_pipeline_every_registered_pass_runs_on_a_tiny_model(name, text_file, tmp_path, fast, request):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    model = request.getfixturevalue(MODEL_FOR.get(name, "tiny_bert"))
    form = registry.get(name).takes[0]
    before = [p for p in PREFIX[form] if p != name] + REQUIRES.get(name, [])
    passes = before + [{"pass": name, **QUICK.get(name, {})}]

    result = Pipeline(passes).run(str(model), str(text_file), tmp_path / "out", **fast)

    stages = result.report["stages"]
    assert [s["name"] for s in stages] == ["input", *(p if isinstance(p, str) else p["pass"] for p in before), name]
    for s in stages:  # encoders: embedding cosine; LMs: top-1 agreement (pruning half a random MoE moves it)
        assert s["fidelity"]["cosine"] > 0.9 if "cosine" in s["fidelity"] else 0 < s["fidelity"]["top1"] <= 1
    assert (tmp_path / "out" / result.report["final"]["path"]).exists()


def test_export_onnx_matches_torch_at_other_batch_and_length(tiny_bert, text_file, tmp_path, fast):
    import torch
    from transformers import AutoModel, AutoTokenizer

    result = Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "out", **fast)
    from compress.runtime import OnnxRunner

    runner = OnnxRunner(tmp_path / "out" / "model.onnx", "encoder")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["short one", "a somewhat longer real sentence about the weather in Sydney today", "x"]
    enc = tok(texts, padding=True, return_tensors="np")
    feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    model = AutoModel.from_pretrained(tiny_bert).eval()
    with torch.inference_mode():
        ref = model(input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=torch.from_numpy(feed["attention_mask"]))

    got = runner.raw(feed)

    np.testing.assert_allclose(got["last_hidden_state"], ref.last_hidden_state.numpy(), atol=1e-4)
    assert all(r["ok"] for r in result.report["stages"][1]["parity"])


def test_optimize_ort_fuses_bert_attention(tiny_bert, text_file, tmp_path, fast):
    result = Pipeline(["export.onnx", "optimize.ort"]).run(str(tiny_bert), str(text_file), tmp_path / "out", **fast)

    assert result.report["stages"][2]["fused_ops"].get("Attention") == 2  # one per layer
    assert "Attention" in _ops(tmp_path / "out" / "model.onnx")


@pytest.mark.parametrize("params, expected", [
    ({"mode": "dynamic"}, {"MatMulInteger", "QAttention"}),
    ({"mode": "static", "calibration_samples": 4}, {"QuantizeLinear", "DequantizeLinear"}),
])
def test_quant_int8_graph_contains_quantized_ops(params, expected, tiny_bert, text_file, tmp_path, fast):
    Pipeline(["export.onnx", "optimize.ort", {"pass": "quant.int8", **params}]).run(
        str(tiny_bert), str(text_file), tmp_path / "out", **fast)

    assert expected <= _ops(tmp_path / "out" / "model.onnx")


def test_quant_int4_graph_contains_matmulnbits(tiny_llama, text_file, tmp_path, fast):
    result = Pipeline(["export.onnx", {"pass": "quant.int4", "block_size": 16}]).run(
        str(tiny_llama), str(text_file), tmp_path / "out", **fast)

    assert "MatMulNBits" in _ops(tmp_path / "out" / "model.onnx")
    # 2 layers x (q, k, v, o, gate, up, down) + lm_head = 15 MatMuls with constant weights
    assert result.report["stages"][-1]["matmulnbits_nodes"] == 15
    assert result.report["stages"][-1]["bytes"] < 0.75 * result.report["stages"][1]["bytes"]


def test_pipeline_classifier_and_lm_record_kl_and_top1(tiny_classifier, tiny_llama, text_file, tmp_path, fast):
    for i, model in enumerate((tiny_classifier, tiny_llama)):
        result = Pipeline(["export.onnx"]).run(str(model), str(text_file), tmp_path / f"o{i}", **fast)
        fid = result.report["stages"][1]["fidelity"]
        assert fid["top1"] == 1.0 and fid["kl"] < 1e-6


def test_pipeline_report_has_every_stage_measured(tiny_bert, text_file, tmp_path, fast):
    Pipeline(["export.onnx", "quant.int8", "profile"]).run(str(tiny_bert), str(text_file), tmp_path / "out", **fast)

    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["stages"][0]["name"] == "input" and rep["stages"][0]["form"] == "torch"
    for stage in rep["stages"]:
        assert {"name", "params", "bytes", "seconds", "fidelity", "metrics", "latency_ms"} <= set(stage)
        assert set(stage["latency_ms"]) >= {"p50", "p90", "p99"}
    assert rep["stages"][2]["bytes"] < rep["stages"][1]["bytes"]
    assert {"throughput_per_s", "peak_rss_mb", "top_ops"} <= set(rep["stages"][3]["profile"])
    for name in ("report.md", "report.png", "recipe.yaml", "tokenizer.json"):
        assert (tmp_path / "out" / name).is_file()


def test_pipeline_failure_keeps_finished_stages_and_resume_continues(tiny_bert, text_file, tmp_path, fast, monkeypatch):
    spec = registry.get("quant.int8")
    broken = type(spec)(**{**spec.__dict__, "run": lambda state, cfg, ctx: 1 / 0})
    real_get = registry.get
    monkeypatch.setattr(registry, "get", lambda name: broken if name == "quant.int8" else real_get(name))
    pipe = Pipeline(["export.onnx", "quant.int8"])
    out = tmp_path / "out"

    with pytest.raises(PassFailed, match="pass 2 'quant.int8' failed: ZeroDivisionError"):
        pipe.run(str(tiny_bert), str(text_file), out, **fast)
    assert not out.exists()
    export_marker = tmp_path / ".out.partial" / "stages" / "01-export.onnx" / "stage.json"
    first = export_marker.stat().st_mtime_ns

    monkeypatch.setattr(registry, "get", real_get)
    result = pipe.run(str(tiny_bert), str(text_file), out, resume=True, **fast)

    assert export_marker.exists() is False  # the partial run directory became OUTDIR
    assert (out / "stages" / "01-export.onnx" / "stage.json").stat().st_mtime_ns == first  # reused, not re-run
    assert [s["name"] for s in result.report["stages"]] == ["input", "export.onnx", "quant.int8"]


def test_pipeline_refuses_existing_outdir_and_overwrites_when_asked(tiny_bert, text_file, tmp_path, fast):
    out = tmp_path / "out"
    Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), out, **fast)
    (out / "old.txt").write_text("from the first run")

    with pytest.raises(OutputExistsError, match="--overwrite"):
        Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), out, **fast)
    assert (out / "old.txt").read_text() == "from the first run"

    Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), out, overwrite=True, **fast)
    assert (out / "model.onnx").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial or .old folder left


def test_pipeline_never_changes_the_input_model(tiny_bert, text_file, tmp_path, fast):
    before = {p.name: p.read_bytes() for p in tiny_bert.iterdir() if p.is_file()}

    Pipeline(["export.onnx", "optimize.ort", "quant.int8"]).run(str(tiny_bert), str(text_file), tmp_path / "o", **fast)

    assert {p.name: p.read_bytes() for p in tiny_bert.iterdir() if p.is_file()} == before


def test_pipeline_onnx_input_runs_onnx_passes(tiny_bert, text_file, tmp_path, fast):
    Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "a", **fast)

    result = Pipeline(["quant.int4"]).run(str(tmp_path / "a" / "model.onnx"), str(text_file), tmp_path / "b", **fast)

    assert result.report["stages"][0]["form"] == "onnx"
    assert result.report["stages"][1]["fidelity"]["cosine"] > 0.95


def test_pipeline_rejects_wrong_order_before_any_work(tiny_bert, text_file, tmp_path, fast):
    with pytest.raises(ConfigError, match="torch passes must come before export.onnx"):
        Pipeline(["export.onnx", "export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "out", **fast)
    assert list(tmp_path.iterdir()) == []


def test_passes_after_export_executorch_go_on_from_the_torch_model(tiny_bert):
    from compress import loading
    from compress.pipeline import _problems_for_chain

    info = loading.describe(str(tiny_bert))

    def problems(*passes) -> list[str]:  # (ExecuTorch itself is an optional extra: its absence is not the point)
        return [p for p in _problems_for_chain(Pipeline(list(passes)).configs, info, True) if "needs ExecuTorch" not in p]

    assert problems({"pass": "prune.structured", "ffn": 0.5}, "export.executorch", "export.onnx", "quant.int8") == []
    assert problems("export.executorch", "distill.kd", "export.executorch") == []
    wrong = problems("export.executorch", "quant.int8")
    assert len(wrong) == 1 and "nothing runs on a .pte file: after export.executorch only torch passes" in wrong[0]


def test_pipeline_resume_when_a_stage_points_at_an_earlier_file(tiny_bert, text_file, tmp_path, fast, monkeypatch):
    """Regression: `profile` keeps the previous stage's file; its path must survive a resume."""
    pipe = Pipeline(["export.onnx", "profile", "quant.int8"])
    spec = registry.get("quant.int8")
    broken = type(spec)(**{**spec.__dict__, "run": lambda state, cfg, ctx: 1 / 0})
    real_get = registry.get
    monkeypatch.setattr(registry, "get", lambda name: broken if name == "quant.int8" else real_get(name))
    with pytest.raises(PassFailed):
        pipe.run(str(tiny_bert), str(text_file), tmp_path / "out", **fast)
    monkeypatch.setattr(registry, "get", real_get)
    monkeypatch.chdir(tmp_path.parent)  # another cwd: stage paths are stored relative to the run directory

    result = pipe.run(str(tiny_bert), str(text_file), tmp_path / "out", resume=True, **fast)

    assert result.report["stages"][3]["quantized_ops"]


def test_quant_int8_fails_when_nothing_new_is_quantized(tiny_bert, text_file, tmp_path, fast):
    Pipeline(["export.onnx", "quant.int8"]).run(str(tiny_bert), str(text_file), tmp_path / "a", **fast)
    with pytest.raises(PassFailed, match="the quantizer changed nothing"):  # an int8 file: validation can't see it
        Pipeline(["quant.int8"]).run(str(tmp_path / "a" / "model.onnx"), str(text_file), tmp_path / "out", **fast)


def test_file_bytes_counts_external_data(tiny_bert, text_file, tmp_path, fast):
    from compress.profiling import file_bytes

    Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "a", **fast)
    model = onnx.load(str(tmp_path / "a" / "model.onnx"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)

    assert file_bytes(tmp_path / "ext.onnx") >= (tmp_path / "weights.bin").stat().st_size > 1_000_000


def test_pipeline_leaves_a_caller_module_untouched(tiny_bert, text_file, tmp_path, fast):
    from transformers import AutoModel, AutoTokenizer

    module = AutoModel.from_pretrained(tiny_bert).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}

    Pipeline(["export.onnx"]).run(module, str(text_file), tmp_path / "o", tokenizer=AutoTokenizer.from_pretrained(tiny_bert), **fast)

    assert module.training
    assert all((module.state_dict()[k] == v).all() for k, v in before.items())


def test_causal_lm_stage_reports_perplexity_on_held_out_news(tiny_llama, text_file, tmp_path, fast):
    result = Pipeline(["export.onnx"]).run(str(tiny_llama), str(text_file), tmp_path / "o", **{**fast, "tasks": True})

    torch_ppl, onnx_ppl = (s["metrics"]["ppl_lee"] for s in result.report["stages"])
    assert 1 < torch_ppl < 2 * 30522  # a random model is near-uniform over its 30522-token vocabulary
    assert abs(onnx_ppl - torch_ppl) / torch_ppl < 1e-3


def test_export_onnx_of_a_pruned_moe_folder_matches_torch(tiny_mixtral, text_file, tmp_path, fast):
    # transformers 5's default grouped_mm experts do not export; export.onnx switches to batched_mm and back
    result = Pipeline([{"pass": "prune.experts", "keep": 4, "calibration_samples": 8, "max_length": 32},
                       "export.onnx"]).run(str(tiny_mixtral), str(text_file), tmp_path / "out", **fast)

    assert all(r["ok"] for r in result.report["stages"][2]["parity"])
    assert result.report["stages"][1]["experts"]["after"]["experts"] == 4
