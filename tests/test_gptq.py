"""compress's own error-compensating rounding (passes/lib/gptq.py) and quant.weight_only's mse / gptq-mse:
the block grid is MatMulNBits' (codes in range, symmetric zero point 8, the codes give the rounded weight
back exactly); the scale search and GPTQ's error feedback each lower the output error on correlated
inputs; on tiny_llama16 (tied embedding) the lm_head is rounded first and, with the tied embedding,
written once as the recorded 4-bit codes; a conflicting quant.int4 lm_head setting is refused up front."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from compress import Pipeline
from compress.errors import UserError
from compress.passes.lib.gptq import BlockGrid, block_codes, factor, gptq, output_error, rtn
from compress.passes.lib.quantized import dequantize
from compress.runtime import OnnxRunner

CALIBRATION = {"samples": 4, "max_length": 64}


def _layer(seed: int = 0, n: int = 48, k: int = 128, tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a few large columns, and the Hessian of correlated inputs with uneven channel scales
    (what makes activation-aware rounding pay in real layers)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, :4] *= 6
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix * torch.rand(k, generator=g) * 3
    return w, x.T @ x / tokens


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_codes_are_in_range_and_give_the_rounded_weight_back_exactly(symmetric):
    w, h = _layer()
    grid = BlockGrid(4, 32, symmetric)
    rounded = gptq(w, h, grid)
    codes, scales, zp = block_codes(rounded, grid)

    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scales.shape == (48, 4)
    assert torch.equal(dequantize(codes, scales, zp, 32), rounded.weight)
    if symmetric:
        assert bool((zp == 8).all())
    blocks = rounded.weight.reshape(48, 4, 32)
    assert max(len(torch.unique(b)) for row in blocks for b in row) <= 16


def test_searched_scales_and_error_feedback_each_lower_the_output_error():
    w, h = _layer(1)
    plain, searched = BlockGrid(candidates=1), BlockGrid(candidates=20)
    err = {"rtn": output_error(w, rtn(w, plain).weight, h),
           "rtn searched": output_error(w, rtn(w, searched, torch.diag(h)).weight, h),
           "gptq searched": output_error(w, gptq(w, h, searched).weight, h)}

    assert err["gptq searched"] < err["rtn searched"] < err["rtn"]
    assert err["gptq searched"] < 0.7 * err["rtn"]


def test_a_factored_hessian_reused_gives_the_same_rounding():
    w, h = _layer(2)
    h[5, :] = h[:, 5] = 0  # a dead input: zeroed either way
    f = factor(h)

    for grid in (BlockGrid(4, 32, True), BlockGrid(4, 32, False, candidates=1)):
        assert torch.equal(gptq(w, f, grid).weight, gptq(w, h, grid).weight)
    assert bool(f.dead[5]) and not bool(f.dead[4])


@pytest.fixture(scope="module")
def tied_run(tiny_llama16, text_file, tmp_path_factory):
    from test_generate import _fast

    dst = tmp_path_factory.mktemp("gptq") / "out"
    passes = [{"pass": "quant.weight_only", "method": "gptq-mse", "symmetric": True, "lm_head": True, **CALIBRATION},
              "export.onnx", {"pass": "quant.int4", "lm_head_bits": 4, "embeddings": True, "accuracy_level": 1}]
    return Pipeline(passes).run(str(tiny_llama16), str(text_file), dst, **_fast()), dst


def test_gptq_mse_writes_every_layer_and_the_tied_matrix_once_with_its_codes(tied_run, tiny_llama16, text_file):
    from transformers import AutoTokenizer

    result, dst = tied_run
    int4 = result.report["stages"][-1]
    graph = onnx.load(str(dst / "model.onnx")).graph

    assert int4["weight_only"]["written"] == int4["weight_only"]["layers"] == 15  # 2 x 7 Linears + the lm_head
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    assert int4["quantized_embeddings"] and set(int4["quantized_embeddings"].values()) == {"shared"}
    assert not any(i.name.endswith("_zero_points") for i in graph.initializer)  # symmetric: MatMulNBits' default
    tok = AutoTokenizer.from_pretrained(tiny_llama16)
    enc = tok(text_file.read_text().splitlines()[-3:], padding=True, truncation=True, max_length=32, return_tensors="np")
    feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    exported = OnnxRunner(dst / "stages" / "02-export.onnx" / "model.onnx", "causal-lm", threads=1)(feed)
    quantized = OnnxRunner(dst / "model.onnx", "causal-lm", threads=1)(feed)
    assert np.abs(quantized - exported).max() < 1e-4 * np.abs(exported).max()  # the recorded codes, head included


def test_gptq_mse_loses_less_than_plain_round_to_nearest(tiny_llama, text_file, tmp_path, fast):
    """The layers' relative output error on the calibration tokens, as the report records it."""
    def error(method: str, candidates: int) -> dict:
        passes = [{"pass": "quant.weight_only", "method": method, "candidates": candidates, **CALIBRATION}]
        result = Pipeline(passes).run(str(tiny_llama), str(text_file), tmp_path / method, **fast)
        return result.report["stages"][1]["weight_only"]["output_error"]

    plain, best = error("mse", 1), error("gptq-mse", 20)
    assert best["median"] < plain["median"] and best["worst"] < plain["worst"]


def test_an_lm_head_rounded_before_cannot_be_asked_for_at_eight_bits(tiny_llama16, text_file, tmp_path, fast):
    passes = [{"pass": "quant.weight_only", "method": "mse", "lm_head": True}, "export.onnx",
              {"pass": "quant.int4", "lm_head_bits": 8}]
    with pytest.raises(UserError, match="lm_head_bits=4, or quant.weight_only lm_head=false"):
        Pipeline(passes).run(str(tiny_llama16), str(text_file), tmp_path / "o", **fast)


def test_the_builder_graph_takes_the_recorded_lm_head_and_shares_it_with_the_embedding(tiny_llama16, text_file,
                                                                                        tmp_path, fast):
    """onnxruntime-genai's builder graph (fused q/k/v, compress's tied form): what the SmolLM2 benchmark ships."""
    pytest.importorskip("onnxruntime_genai")
    passes = [{"pass": "quant.weight_only", "method": "gptq-mse", "symmetric": True, "lm_head": True, **CALIBRATION},
              {"pass": "export.onnx", "exporter": "genai"},
              {"pass": "quant.int4", "lm_head_bits": 4, "embeddings": True, "accuracy_level": 1}]
    result = Pipeline(passes).run(str(tiny_llama16), str(text_file), tmp_path / "o", **fast)
    int4 = result.report["stages"][-1]

    assert int4["weight_only"]["written"] == int4["weight_only"]["layers"] == 15
    assert int4["weight_only"]["matmuls"] == 2 * 5 + 1  # qkv, o, gate, up, down per layer, and the lm_head
    assert set(int4["quantized_embeddings"].values()) == {"shared"}


def test_lm_head_with_a_neural_compressor_method_is_refused_up_front(tiny_llama16, text_file, tmp_path, fast):
    with pytest.raises(UserError, match="lm_head=true is for method=mse or gptq-mse"):
        Pipeline([{"pass": "quant.weight_only", "method": "rtn", "lm_head": True}]).run(
            str(tiny_llama16), str(text_file), tmp_path / "o", **fast)
