"""Latency budgets (passes/lib/budget.py): candidate architectures timed as int8 ONNX on this
machine, the most accurate by a one-shot proxy chosen, an unreachable budget refused before training."""
from __future__ import annotations

import pytest
import torch

from compress import Pipeline
from compress.errors import ConfigError, UserError
from compress.models import load_hf
from compress.passes.lib import budget, prunable


@pytest.fixture()
def small_grid(monkeypatch):
    """Depth only (2 exports: the full model and 1 layer); the width grid is the same code path."""
    monkeypatch.setattr(budget, "WIDTHS", (0.0,))


def test_grid_and_affine_depth_estimate():
    geo = prunable.Geometry(layers=4, heads=4, kv_heads=2, head_dim=8, ffn=64)
    shapes = budget.grid(geo)
    assert len(shapes) == 4 * len(budget.WIDTHS) ** 2
    assert {prunable.keep_count(4, s.layers) for s in shapes} == {1, 2, 3, 4}
    measured = {budget.Shape(budget.layer_fraction(4, keep), h, f): 1.0 + keep * (2 - h - f)
                for keep in (1, 4) for h in budget.WIDTHS for f in budget.WIDTHS}
    est = budget.estimated(geo, measured)
    # an affine latency is recovered exactly at the depths that were not built
    assert all(abs(est[s] - (1.0 + prunable.keep_count(4, s.layers) * (2 - s.heads - s.ffn))) < 1e-9 for s in shapes)


def test_sliced_candidate_has_the_exact_shape(tiny_llama):
    model, _, _ = load_hf(tiny_llama)
    fam = prunable.family_of(model.config)
    m = budget.sliced(model, fam, budget.Shape(0.5, 0.5, 0.75))
    cfg = m.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.intermediate_size) == (1, 1, 2, 16)
    assert model.config.num_hidden_layers == 2  # the input model is untouched


def test_unreachable_latency_is_refused_before_training_naming_the_fastest(tiny_llama, text_file, tmp_path, fast,
                                                                           small_grid):
    with pytest.raises(UserError, match=r"latency=0\.01 is out of reach.*fastest candidate \(\d layers.*give latency >="):
        Pipeline([{"pass": "prune.homodistil", "latency": 0.01, "steps": 12, "max_length": 32}]).run(
            str(tiny_llama), str(text_file), tmp_path / "o", **fast)
    assert not (tmp_path / "o").exists()
    assert not list((tmp_path).glob("o.partial/stages/*/model*"))  # nothing trained


@pytest.fixture(scope="module")
def deep_bert(tmp_path_factory):
    """6 layers, wide enough that depth dominates the int8 latency over fixed overheads (an encoder: no
    30k-vocabulary head to time), so a 0.8 budget is clearly reachable on a loaded machine."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from compress.models import alias_path

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("deep_bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256,
                     max_position_embeddings=512, architectures=["BertModel"])
    BertModel(cfg).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(alias_path("minilm"), local_files_only=True).save_pretrained(folder)
    return folder


def test_latency_budget_chooses_a_fitting_shape_and_prunes_to_it(deep_bert, text_file, tmp_path, fast, small_grid):
    result = Pipeline([{"pass": "prune.structured", "latency": 0.8, "max_length": 32, "calibration_batches": 1}]).run(
        str(deep_bert), str(text_file), tmp_path / "o", **fast)
    notes = result.report["stages"][1]["pruning"]
    chosen = notes["budget"]
    cfg = result.state.model.config

    assert chosen["target"] == 0.8 and chosen["candidates"][0]["shape"] == chosen["chosen"]
    assert all(c["latency_ratio"] <= 0.8 for c in chosen["candidates"])
    losses = [c["proxy_loss"] for c in chosen["candidates"]]
    assert losses == sorted(losses)  # best proxy first
    f = chosen["fractions"]
    assert cfg.num_hidden_layers == prunable.keep_count(6, f["layers"]) < 6
    assert cfg.intermediate_size == prunable.keep_count(256, f["ffn"])
    assert cfg.num_attention_heads == prunable.keep_count(4, f["heads"])


@pytest.mark.parametrize("step, message", [
    ({"pass": "prune.homodistil", "latency": 0.5, "heads": 0.5}, "give either latency or heads=0.5"),
    ({"pass": "prune.structured", "latency": 0.5, "params": 0.5}, "give either latency or params=0.5"),
    ({"pass": "prune.structured", "latency": 1.5}, "latency"),
])
def test_bad_latency_settings_rejected_before_work(step, message, tiny_llama, text_file, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Pipeline([step]).run(str(tiny_llama), str(text_file), tmp_path / "o")


def test_proxy_prefers_keeping_what_matters(tiny_llama, text_file):
    from transformers import AutoTokenizer

    from compress import kinds
    from compress.passes.lib.trainer import tokenized

    model, _, _ = load_hf(tiny_llama)
    fam = prunable.family_of(model.config)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    proxy = budget.Proxy(model, fam, kinds.get("causal-lm"), tokenized(tok, text_file.read_text().splitlines()[:8], 32))
    assert proxy.loss(budget.Shape(0.0, 0.0, 0.0)) == pytest.approx(0.0, abs=1e-6)
    assert proxy.loss(budget.Shape(0.0, 0.0, 0.25)) < proxy.loss(budget.Shape(0.5, 0.5, 0.75))
    assert isinstance(proxy.pruned(budget.Shape(0.5, 0.0, 0.0)), torch.nn.Module)
