"""export.ort's mobile outputs on tiny models: the minimal-build operator config beside model.ort
(onnxruntime's create_config_from_models, read back with its parser), onnxruntime's mobile
usability verdict per EP in the record and report.md, the XNNPACK entry, and a checker failure
that is recorded instead of failing the export."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from rich.console import Console
from torch import nn

from compress import Pipeline, images
from compress.exporters import ort_mobile
from compress.profiling import LatencySettings

EPS = ("nnapi", "coreml_mlprogram", "coreml_neuralnetwork")
# Ops of the int8 tiny-BERT graph that ORT's basic optimisation folds away (constant folding,
# Identity elimination), so they cannot appear in the .ort's operator config.
FOLDED = {"Constant", "ConstantOfShape", "Identity"}


def _run_kwargs() -> dict:
    """conftest's `fast`, for module-scoped runs, with measurement off: these tests read the pass's own record."""
    return dict(latency=LatencySettings(batch=1, seq=16, threads=1, warmup=1, runs=5), tasks=False, max_length=32,
                console=Console(quiet=True), measure="off")


def _op_set(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}


def _basic_optimized(src, dst) -> onnx.ModelProto:
    """The graph ORT bakes into model.ort at optimization=basic, saved as ONNX."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst))


@pytest.fixture(scope="module")
def bert_int8_ort(tiny_bert, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort_mobile") / "out"
    result = Pipeline(["export.onnx", "quant.int8", "export.ort"]).run(str(tiny_bert), str(text_file), out,
                                                                       **_run_kwargs())
    return out, result.report


def test_export_ort_writes_required_operators_config_naming_every_op_of_the_graph(bert_int8_ort, tmp_path):
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    out, _ = bert_int8_ort
    int8 = out / "stages" / "02-quant.int8" / "model.onnx"

    required, _ = parse_config(str(out / "required_operators.config"))  # onnxruntime's own parser reads it back
    config_ops = {(domain, op) for domain, opsets in required.items() for ops in opsets.values() for op in ops}

    assert (out / "model.ort").is_file()
    assert "# - model.ort\n" in (out / "required_operators.config").read_text()  # not the run's temporary path
    assert config_ops == _op_set(_basic_optimized(int8, tmp_path / "basic.onnx"))
    graph_ops = _op_set(onnx.load(str(int8)))
    assert config_ops <= graph_ops
    assert {op for _, op in graph_ops - config_ops} <= FOLDED
    assert {("ai.onnx", "MatMulInteger"), ("ai.onnx", "DynamicQuantizeLinear")} <= config_ops  # quant.int8's ops
    assert all(isinstance(opset, int) and opset >= 1 for opsets in required.values() for opset in opsets)


def test_export_ort_records_the_mobile_usability_verdict_per_ep(bert_int8_ort, tmp_path):
    out, report = bert_int8_ort
    graph = _basic_optimized(out / "stages" / "02-quant.int8" / "model.onnx", tmp_path / "basic.onnx")
    graph_ops = {f"{domain}:{op}" for domain, op in _op_set(graph)}

    mobile = report["stages"][-1]["mobile"]

    assert "error" not in mobile
    assert mobile["nodes"] == len(graph.graph.node)
    assert mobile["dynamic_inputs"] == ["input_ids", "attention_mask"]
    for key in EPS:
        ep = mobile[key]
        assert ep["nodes"] == len(graph.graph.node) and 0 < ep["nodes_covered"] < ep["nodes"]
        assert ep["partitions"] == len(ep["partition_sizes"]) and sum(ep["partition_sizes"]) == ep["nodes_covered"]
        assert set(ep["supported_ops"]) | set(ep["unsupported_ops"]) == graph_ops
        assert not set(ep["supported_ops"]) & set(ep["unsupported_ops"])
        assert ep["as_is"] in ("YES", "MAYBE", "NO") and ep["fixed_shapes"]["verdict"] in ("YES", "MAYBE", "NO")
        assert ep["fixed_shapes"]["nodes_covered"] > ep["nodes_covered"]  # dynamic shapes cost NNAPI/CoreML nodes
        assert "ai.onnx:MatMulInteger" in ep["unsupported_ops"]  # in none of the checker's supported-op tables
    assert mobile["try_nnapi_or_coreml"] is False and mobile["recommendation"].startswith("use the CPU EP")
    assert mobile["required_operators"]["file"] == "required_operators.config"
    assert json.loads((out / "report.json").read_text())["stages"][-1]["mobile"] == mobile


def test_export_ort_records_xnnpack_availability_plainly(bert_int8_ort):
    _, report = bert_int8_ort
    xnn = report["stages"][-1]["mobile"]["xnnpack"]

    if ort_mobile.XNNPACK in ort.get_available_providers():
        assert xnn["available"] is True and xnn["parity_ok"] is True
        assert xnn["p50_ms"]["cpu"] > 0 and xnn["p50_ms"]["xnnpack"] > 0
    else:  # the pip CPU wheel
        assert xnn == {"available": False, "why": xnn["why"]}
        assert "CPUExecutionProvider" in xnn["why"] and "without XNNPACK" in xnn["why"]


def test_export_ort_report_has_the_ort_mobile_section(bert_int8_ort):
    out, _ = bert_int8_ort
    md = (out / "report.md").read_text()

    section = md[md.index("## ORT Mobile: stage 3 export.ort"):]
    assert "`required_operators.config` lists" in section and "--include_ops_by_config" in section
    for title in ("| NNAPI |", "| CoreML MLProgram |", "| CoreML NeuralNetwork |"):
        assert title in section
    assert "MatMulInteger" in section and "- XNNPACK EP:" in section


def test_export_ort_model_still_loads_and_runs_in_onnxruntime(bert_int8_ort, tiny_bert):
    from transformers import AutoTokenizer

    out, _ = bert_int8_ort
    feed = dict(AutoTokenizer.from_pretrained(str(tiny_bert))(["a short real sentence about rain"], return_tensors="np"))

    def embed(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v for k, v in feed.items() if k in names})))

    got, ref = embed(out / "model.ort"), embed(out / "stages" / "02-quant.int8" / "model.onnx")
    assert got.keys() == ref.keys() and "sentence_embedding" in got
    np.testing.assert_allclose(got["sentence_embedding"], ref["sentence_embedding"], atol=1e-4)


def test_export_ort_records_a_checker_failure_instead_of_failing(bert_int8_ort, tiny_bert, text_file, tmp_path,
                                                                 monkeypatch):
    from onnxruntime.tools.mobile_helpers import usability_checker

    def exotic(*args, **kwargs):
        raise RuntimeError("graph the checker cannot read")

    monkeypatch.setattr(usability_checker, "check_nnapi_partitions", exotic)
    out, _ = bert_int8_ort

    result = Pipeline(["export.ort"]).run(str(out / "stages" / "02-quant.int8" / "model.onnx"), str(text_file),
                                          tmp_path / "o", tokenizer=str(tiny_bert), **_run_kwargs())

    mobile = result.report["stages"][-1]["mobile"]
    assert mobile["error"] == "RuntimeError: graph the checker cannot read"
    assert not any(key in mobile for key in EPS)
    assert (tmp_path / "o" / "model.ort").is_file() and (tmp_path / "o" / "required_operators.config").is_file()
    assert "- Mobile usability checker failed on this graph: RuntimeError" in (tmp_path / "o" / "report.md").read_text()


class _SaysXnnpack:
    """A CPU session that reports the XNNPACK EP: the wheel here has none, so this is how the measuring
    branch (parity, p50 under both EPs) runs at all."""

    def __init__(self, sess):
        self._sess = sess

    def __getattr__(self, name):
        return getattr(self._sess, name)

    def get_providers(self):
        return [ort_mobile.XNNPACK, "CPUExecutionProvider"]


def test_export_ort_measures_parity_and_p50_under_xnnpack_when_the_wheel_has_it(bert_int8_ort, tiny_bert, text_file,
                                                                                 tmp_path, monkeypatch):
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ort_mobile.XNNPACK, *real])
    monkeypatch.setattr(ort_mobile, "xnnpack_session", lambda path, threads: _SaysXnnpack(
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])))
    out, _ = bert_int8_ort

    result = Pipeline(["export.ort"]).run(str(out / "stages" / "02-quant.int8" / "model.onnx"), str(text_file),
                                          tmp_path / "o", tokenizer=str(tiny_bert), **_run_kwargs())

    xnn = result.report["stages"][-1]["mobile"]["xnnpack"]
    assert xnn["available"] is True and xnn["parity_ok"] is True and xnn["threads"] == 1
    assert {r["name"] for r in xnn["parity"]} >= {"sentence_embedding"} and all(r["cosine"] > 0.9999 for r in xnn["parity"])
    assert xnn["p50_ms"]["cpu"] > 0 and xnn["p50_ms"]["xnnpack"] > 0
    assert "- XNNPACK EP: parity with the ONNX graph OK; p50" in (tmp_path / "o" / "report.md").read_text()


def test_export_ort_records_a_fallback_when_xnnpack_is_listed_but_not_used(bert_int8_ort, tiny_bert, text_file,
                                                                           tmp_path, monkeypatch):
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ort_mobile.XNNPACK, *real])
    out, _ = bert_int8_ort

    result = Pipeline(["export.ort"]).run(str(out / "stages" / "02-quant.int8" / "model.onnx"), str(text_file),
                                          tmp_path / "o", tokenizer=str(tiny_bert), **_run_kwargs())

    xnn = result.report["stages"][-1]["mobile"]["xnnpack"]
    assert xnn == {"available": False, "why": "a session asking for it ran on CPUExecutionProvider"}


def _tiny_cnn() -> nn.Module:
    """Conv, ReLU6 (Clip), Conv, ReLU, global average pool, Linear: every op in NNAPI's table."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU6(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_export_ort_says_fixed_shapes_make_a_tiny_cnn_fit_nnapi(tmp_path):
    result = Pipeline(["export.onnx", "export.ort"]).run(_tiny_cnn(), images.load("photos", size=32), tmp_path / "o",
                                                         **_run_kwargs())

    mobile = result.report["stages"][-1]["mobile"]
    nnapi = mobile["nnapi"]
    # the batch axis is dynamic: as exported no node qualifies; with fixed shapes all 7 form one partition
    assert mobile["dynamic_inputs"] == ["pixel_values"]
    assert (nnapi["as_is"], nnapi["nodes_covered"], nnapi["nodes"]) == ("NO", 0, 7)
    assert nnapi["fixed_shapes"] == {"nodes_covered": 7, "partitions": 1, "verdict": "YES"}
    assert nnapi["verdict"] == "YES" and nnapi["unsupported_ops"] == []
    assert mobile["try_nnapi_or_coreml"] is True and "make_dynamic_shape_fixed" in mobile["recommendation"]
    assert mobile["required_operators"]["ops"] == {"ai.onnx": ["Clip", "Conv", "Flatten", "Gemm", "GlobalAveragePool",
                                                               "Relu"]}
    assert (tmp_path / "o" / "required_operators.config").is_file()


@pytest.mark.slow
def test_real_minilm_int8_ort_file_runs_and_names_its_operators(tmp_path):
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    out = tmp_path / "o"
    result = Pipeline(["export.onnx", "optimize.ort", "quant.int8", "export.ort"]).run(
        "minilm", "mix", out, latency=LatencySettings(batch=1, seq=128, threads=2, warmup=2, runs=10), tasks=False,
        console=Console(quiet=True))

    stage = result.report["stages"][-1]
    assert stage["form"] == "ort" and stage["fidelity"]["cosine"] > 0.99  # measured 0.994 (the int8 graph's)
    required, _ = parse_config(str(out / "required_operators.config"))
    config_ops = {(domain, op) for domain, opsets in required.items() for ops in opsets.values() for op in ops}
    assert {("com.microsoft", "QAttention"), ("ai.onnx", "MatMulInteger")} <= config_ops  # fused, then int8
    sess = ort.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    emb = sess.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert emb.shape == (1, 384) and abs(np.linalg.norm(emb) - 1) < 1e-3
