"""prune.sparse (passes/lib/sparse.py, passes/prune_sparse.py): the masks hold exactly the asked sparsity
(unstructured per matrix or per row, n:m per group); SparseGPT's compensation and Wanda's activation weighting
each lower the output error against magnitude on correlated inputs with uneven channels; on tiny BERT and tiny
Llama the pass zeroes the layers' Linears only, the model saves, reloads and exports with the zeros, distill.kd
keeps them, and quant.riq + export.riq code them as zeros; bad patterns and families are refused up front."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compress import Pipeline
from compress.errors import ConfigError, UserError
from compress.passes.lib import sparse
from compress.passes.lib.gptq import output_error
from compress.recipe import parse_cli_pass

CALIBRATION = {"samples": 4, "max_length": 64}


def _layer(seed: int = 0, n: int = 48, k: int = 128, tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight, and the Hessian of correlated inputs with uneven channel scales (as real layers' inputs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix * torch.rand(k, generator=g) * 3
    return w, x.T @ x / tokens


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_masks_hold_the_asked_fraction(method):
    w, h = _layer()
    m = sparse.mask(w, method, 0.5, hessian=h)
    assert int(m.sum()) == w.numel() // 2
    if method == "wanda":  # compared within each row
        assert (m.sum(1) == w.shape[1] // 2).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_n_of_m_prunes_n_of_every_m_consecutive_weights_of_each_row(method):
    w, h = _layer()
    out = sparse.sparsegpt(w, h, 0.5, (2, 4)) if method == "sparsegpt" else \
        w.masked_fill(sparse.mask(w, method, 0.5, (2, 4), h), 0.0)
    zeros = (out == 0).reshape(w.shape[0], -1, 4).sum(-1)
    assert (zeros == 2).all()


def test_sparsegpt_holds_the_sparsity_and_beats_wanda_and_magnitude_on_output_error():
    w, h = _layer()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = sparse.sparsegpt(w, h, 0.5) if method == "sparsegpt" else w.masked_fill(sparse.mask(w, method, 0.5,
                                                                                                  hessian=h), 0.0)
        assert abs(float((out == 0).float().mean()) - 0.5) < 0.01
        errors[method] = output_error(w, out, h)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_updates_the_kept_weights_and_zeroes_dead_inputs():
    w, h = _layer()
    h[5, :] = 0
    h[:, 5] = 0  # input 5 never active
    out = sparse.sparsegpt(w, h, 0.25)
    kept = out != 0
    assert (out[:, 5] == 0).all()
    assert not torch.equal(out[kept], w[kept])  # compensation moved the kept weights


def test_pattern_is_read_from_the_cli_and_bad_ones_are_named():
    assert parse_cli_pass("prune.sparse:pattern=2:4")["pattern"] == "2:4"  # not YAML 1.1's base-60 124
    assert sparse.parse_nm("2:4") == (2, 4) and sparse.parse_nm(None) is None
    for bad in ("4:2", "2", "a:b", "0:4"):
        with pytest.raises(ValueError, match="n:m"):
            sparse.parse_nm(bad)


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2}


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_pass_zeroes_the_layers_linears_only_and_the_model_reloads_and_exports(fixture, request, text_file, tmp_path,
                                                                              fast):
    from compress.models import load_hf

    path = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    result = Pipeline([{"pass": "prune.sparse", "method": "sparsegpt", "sparsity": 0.6, **CALIBRATION},
                       "export.onnx"]).run(str(path), str(text_file), out, **fast)
    model, _, _ = load_hf(out / "stages" / "01-prune.sparse" / "model")
    for name, p in _linear_weights(model).items():
        layer = ".layers." in name or ".layer." in name
        zeros = float((p == 0).float().mean())
        assert (abs(zeros - 0.6) < 0.02) if layer else zeros < 0.01, (name, zeros)
    note = result.report["stages"][1]["sparse"]
    assert note["method"] == "sparsegpt" and note["linears"] == (12 if fixture == "tiny_bert" else 14)
    graph = onnx.load(str(out / "model.onnx"))  # the export carries the zeros
    zero_fractions = [float((numpy_helper.to_array(t) == 0).mean()) for t in graph.graph.initializer
                      if len(t.dims) == 2 and 0.55 < float((numpy_helper.to_array(t) == 0).mean()) < 0.65]
    assert len(zero_fractions) == note["linears"]
    assert "Sparsity" in (out / "report.md").read_text()


def test_distill_kd_keeps_the_zeros_and_riq_codes_them(tiny_bert, text_file, tmp_path, fast):
    from compress.exporters import riq_format

    out = tmp_path / "out"
    Pipeline([{"pass": "prune.sparse", "method": "wanda", "pattern": "2:4", **CALIBRATION},
              {"pass": "distill.kd", "steps": 3, "batch_size": 4, "lr": 1e-2},
              {"pass": "quant.riq", "deviation": 0.02},
              "export.riq"]).run(str(tiny_bert), str(text_file), out, **fast)
    from compress.models import load_hf

    sparse_model, _, _ = load_hf(out / "stages" / "01-prune.sparse" / "model")
    trained, _, _ = load_hf(out / "stages" / "02-distill.kd" / "model")
    before, after = _linear_weights(sparse_model), _linear_weights(trained)
    for name, p in before.items():
        if ".layer." in name:
            assert torch.equal(p == 0, after[name] == 0), name  # the same zeros, no more
            assert not torch.equal(p, after[name])  # and the rest trained
    coded = {t.name: t for t in riq_format.read(out / "model.riq")[0] if isinstance(t, riq_format.CodedTensor)}
    layer = [t for name, t in coded.items() if ".layer." in name]
    assert layer and all(float(np.mean(t.codes == 0)) >= 0.5 for t in layer)


def test_refusals_name_the_fix(tiny_bert, tiny_mixtral, text_file, tmp_path, fast):
    with pytest.raises(ConfigError, match="sparsity or pattern, not both"):
        Pipeline([{"pass": "prune.sparse", "sparsity": 0.5, "pattern": "2:4"}]).run(str(tiny_bert), str(text_file),
                                                                                     tmp_path / "a", **fast)
    with pytest.raises(ConfigError, match="not a multiple of 64"):
        Pipeline([{"pass": "prune.sparse", "pattern": "2:64"}]).run(str(tiny_bert), str(text_file), tmp_path / "b",
                                                                     **fast)
    with pytest.raises((ConfigError, UserError), match="prune.sparse supports"):
        Pipeline([{"pass": "prune.sparse", "method": "magnitude"}]).run(str(tiny_mixtral), None, tmp_path / "c", **fast)


def test_bare_distill_keeps_zeros_only_when_asked(tiny_bert):
    """Outside the pipeline nothing says the model was made sparse: keep_zeros=None trains every weight (a
    GGUF-dequantized model has exact zeros of its own), keep_zeros=True (or sparse=True) keeps them."""
    from transformers import AutoModel, AutoTokenizer

    from compress.data import lee_background
    from compress.passes import distill_kd, prune_sparse

    teacher, tok = AutoModel.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)
    sparse_model = prune_sparse.apply(teacher, cfg=prune_sparse.PruneSparse(method="magnitude"), progress=False)
    texts = lee_background()[:8]
    name = "encoder.layer.0.intermediate.dense.weight"
    zeros = dict(sparse_model.named_parameters())[name] == 0
    for keep, stays in ((None, False), (True, True)):
        cfg = distill_kd.DistillKD(steps=2, batch_size=4, lr=1e-2, max_length=32, keep_zeros=keep)
        student = distill_kd.apply(sparse_model, teacher, tok, texts, cfg, progress=False)
        assert bool((dict(student.named_parameters())[name][zeros] == 0).all()) is stays, keep
