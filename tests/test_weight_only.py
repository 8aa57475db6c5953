"""quant.weight_only (Neural Compressor RTN / GPTQ / AWQ) on tiny_llama, carried into MatMulNBits
by quant.int4: the torch model holds exactly the dequantized weights (on a 16-level grid per
block), reloads, and after export.onnx + quant.int4 every quantized Linear is a MatMulNBits with
the recorded codes (the logits equal the fake-quantized export's); GPTQ / AWQ lose less than RTN;
bad requests are refused before any work."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from compress import Pipeline
from compress.errors import UserError
from compress.passes.lib import sequential
from compress.runtime import OnnxRunner

LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); the lm_head stays float in the pass
CALIBRATION = {"samples": 4, "max_length": 64}


def _run(passes, model, text_file, out, fast):
    return Pipeline(passes).run(str(model), str(text_file), out, **fast)


@pytest.fixture(scope="module")
def runs(tiny_llama, text_file, tmp_path_factory):
    """method -> (pipeline result, output dir) of quant.weight_only -> export.onnx ->
    quant.int4 (lm_head float, fp32 compute: the int4 graph must reproduce the export exactly)."""
    from test_generate import _fast

    out = {}
    for method in ("rtn", "gptq", "awq"):
        dst = tmp_path_factory.mktemp(method) / "out"
        passes = [{"pass": "quant.weight_only", "method": method, **CALIBRATION}, "export.onnx",
                  {"pass": "quant.int4", "lm_head": False, "accuracy_level": 1}]
        out[method] = (_run(passes, tiny_llama, text_file, dst, _fast()), dst)
    return out


def test_every_linear_becomes_a_matmulnbits_with_the_recorded_codes(runs):
    result, dst = runs["gptq"]
    int4 = result.report["stages"][-1]
    graph = onnx.load(str(dst / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]

    assert int4["weight_only"] == {"method": "gptq", "matmuls": LINEARS, "written": LINEARS, "layers": LINEARS}
    assert result.report["stages"][1]["params"] == result.report["stages"][0]["params"]  # no bias added
    assert len(nbits) == LINEARS and all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in nbits)
    weights = sum({a.name: a.i for a in n.attribute}["K"] * {a.name: a.i for a in n.attribute}["N"] for n in nbits)
    saved = result.report["stages"][2]["bytes"] - int4["bytes"]
    assert saved > 0.75 * 4 * weights  # 4.5 of 32 bits left per weight (codes, fp32 scale and zero point per 32)
    md = (dst / "report.md").read_text()
    assert "gptq int4 (group 32, asymmetric) on 14 Linear layers, calibrated on 256 training tokens" in md
    assert "14 of the 14 layers quantized with gptq written as MatMulNBits" in md


def test_int4_graph_gives_the_fake_quantized_exports_logits(runs, tiny_llama, text_file):
    """Same codes, same scales: MatMulNBits (fp32 compute) == the export of the dequantized weights."""
    from transformers import AutoTokenizer

    _, dst = runs["gptq"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    enc = tok(text_file.read_text().splitlines()[-3:], padding=True, truncation=True, max_length=32, return_tensors="np")
    feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    exported = OnnxRunner(dst / "stages" / "02-export.onnx" / "model.onnx", "causal-lm", threads=1)(feed)
    int4 = OnnxRunner(dst / "model.onnx", "causal-lm", threads=1)(feed)

    assert np.abs(int4 - exported).max() < 1e-4 * np.abs(exported).max()


def test_torch_weights_sit_on_sixteen_levels_per_block_and_reload(runs):
    from transformers import AutoModelForCausalLM

    _, dst = runs["awq"]
    model = AutoModelForCausalLM.from_pretrained(dst / "stages" / "01-quant.weight_only" / "model")
    weight = model.model.layers[0].mlp.down_proj.weight.detach()  # (32, 64): two blocks of 32 per row
    blocks = weight.reshape(weight.shape[0], -1, 32)

    assert max(len(torch.unique(b)) for row in blocks for b in row) <= 16
    assert not torch.equal(model.model.layers[0].post_attention_layernorm.weight, torch.ones(32))  # AWQ's 1/s folded


def test_calibrated_methods_lose_less_than_round_to_nearest(runs):
    kl = {m: runs[m][0].report["stages"][1]["fidelity"]["kl"] for m in runs}

    assert kl["gptq"] < kl["rtn"] and kl["awq"] < kl["rtn"]


def test_layers_changed_after_quantization_are_counted_and_none_left_is_an_error(tiny_llama, text_file, tmp_path, fast):
    def passes(heads):
        return [{"pass": "quant.weight_only", "method": "rtn"}, {"pass": "prune.structured", "ffn": 0.5, "heads": heads},
                "export.onnx", "quant.int4"]

    partial = _run(passes(0.0), tiny_llama, text_file, tmp_path / "ffn", fast)  # gate/up/down sliced, attention kept
    assert partial.report["stages"][-1]["weight_only"] == {"method": "rtn", "matmuls": 8, "written": 8, "layers": LINEARS}
    with pytest.raises(Exception, match="right after export.onnx"):  # every Linear sliced
        _run(passes(0.5), tiny_llama, text_file, tmp_path / "all", fast)


def test_awq_on_an_encoder_and_a_missing_neural_compressor_are_refused_up_front(tiny_bert, tiny_llama, text_file,
                                                                               tmp_path, fast, monkeypatch):
    with pytest.raises(UserError, match="method=awq supports Llama-family"):
        _run([{"pass": "quant.weight_only", "method": "awq"}], tiny_bert, text_file, tmp_path / "a", fast)

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "neural_compressor" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps neural-compressor-pt"):
        _run([{"pass": "quant.weight_only"}], tiny_llama, text_file, tmp_path / "b", fast)


def test_calibration_windows_are_full_and_too_little_text_is_named(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    windows = sequential.calibration_windows(tok, ["one two three four five six seven eight"] * 20, samples=3, length=16)

    assert windows.shape == (3, 16)
    with pytest.raises(ValueError, match="fewer than one calibration window"):
        sequential.calibration_windows(tok, ["too short"], samples=3, length=64)


def test_builder_graph_gets_the_recorded_codes_with_qkv_fused_and_symmetric_blocks_without_zero_points(
        tiny_llama16, text_file, tmp_path, fast):
    """onnxruntime-genai's builder fuses q, k and v into one MatMul: the three recorded layers side by side
    become one MatMulNBits; symmetric codes leave out the zero points (MatMulNBits' faster default)."""
    pytest.importorskip("onnxruntime_genai")
    passes = [{"pass": "quant.weight_only", "method": "rtn", "symmetric": True, **CALIBRATION},
              {"pass": "export.onnx", "exporter": "genai"}, {"pass": "quant.int4", "lm_head": False, "accuracy_level": 1}]
    result = _run(passes, tiny_llama16, text_file, tmp_path / "o", fast)

    assert result.report["stages"][-1]["weight_only"] == {"method": "rtn", "matmuls": 10, "written": LINEARS,
                                                           "layers": LINEARS}
    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 5 and all(len(n.input) == 3 for n in nbits)  # qkv, o, gate, up, down per layer
    from transformers import AutoTokenizer  # same codes in the right order: the export's logits (fp32 compute)

    tok = AutoTokenizer.from_pretrained(tiny_llama16)
    enc = tok(text_file.read_text().splitlines()[-3:], padding=True, truncation=True, max_length=32, return_tensors="np")
    feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    exported = OnnxRunner(tmp_path / "o" / "stages" / "02-export.onnx" / "model.onnx", "causal-lm", threads=1)(feed)
    int4 = OnnxRunner(tmp_path / "o" / "model.onnx", "causal-lm", threads=1)(feed)
    assert np.abs(int4 - exported).max() < 1e-4 * np.abs(exported).max()
