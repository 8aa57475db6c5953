"""Depth pruning (passes/lib/depth.py): layers removed one-shot by prune.structured and gradually by
prune.homodistil, on 4-layer tiny BERT and tiny Llama (GQA) models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress import Pipeline
from compress.errors import ConfigError
from compress.models import load_hf
from compress.passes.lib import depth, prunable
from compress.passes.lib.trainer import hidden_map, tokenized

QUICK = {"steps": 12, "batch_size": 4, "max_length": 32, "mask_every": 2, "checkpoint_every": 4}
IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0], [101, 7592, 2088, 999, 102, 0, 0]])


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _save(model, folder: Path) -> Path:
    from transformers import AutoTokenizer

    from compress.models import alias_path

    model.eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(alias_path("minilm"), local_files_only=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert4(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=512, architectures=["BertModel"])
    return _save(BertModel(cfg), tmp_path_factory.mktemp("bert4"))


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"], pad_token_id=0)
    return _save(LlamaForCausalLM(cfg), tmp_path_factory.mktemp("llama4"))


def _outputs(model):
    with torch.inference_mode():
        out = model(input_ids=IDS, attention_mask=(IDS != 0).long())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _layer_params(model) -> int:
    fam = prunable.family_of(model.config)
    return _params(prunable.layers(model, fam)[0])


def _calibration(folder: Path, texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    return tokenized(AutoTokenizer.from_pretrained(folder), texts[:8], 32)


@pytest.mark.parametrize("fixture", ["bert4", "llama4"])
def test_structured_layers_exact_shapes_reload_and_export(fixture, text_file, tmp_path, fast, request):
    folder = request.getfixturevalue(fixture)
    before, _, _ = load_hf(folder)
    result = Pipeline([{"pass": "prune.structured", "layers": 0.5, "heads": 0, "ffn": 0, "max_length": 32,
                        "calibration_batches": 1}]).run(str(folder), str(text_file), tmp_path / "o", **fast)
    exported = Pipeline(["export.onnx"]).run(str(tmp_path / "o" / "model"), str(text_file), tmp_path / "e", **fast)

    model, _, _ = load_hf(tmp_path / "o" / "model")
    notes = result.report["stages"][1]["pruning"]
    assert model.config.num_hidden_layers == 2 and len(prunable.layers(model, prunable.family_of(model.config))) == 2
    assert _params(model) == _params(before) - 2 * _layer_params(before)
    assert len(notes["layers_removed"]) == 2 and model.config.kept_layers == sorted(set(range(4)) - set(notes["layers_removed"]))
    assert (notes["before"]["layers"], notes["after"]["layers"]) == (4, 2)
    torch.testing.assert_close(_outputs(model), _outputs(result.state.model), atol=1e-5, rtol=1e-5)
    assert all(row["ok"] for row in exported.report["stages"][1]["parity"])


def test_dropped_llama_renumbers_the_cache_and_generates_like_a_full_forward(llama4, text_file):
    model, _, _ = load_hf(llama4)
    fam = prunable.family_of(model.config)
    depth.drop_layers(model, fam, [1, 2])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    ids = IDS[:1, :5]
    with torch.inference_mode():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(6):  # no KV cache: each step re-reads the whole sequence
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


@pytest.mark.parametrize("fixture", ["bert4", "llama4"])
def test_influence_picks_the_layer_that_does_nothing(fixture, text_file, request):
    folder = request.getfixturevalue(fixture)
    model, _, _ = load_hf(folder)
    fam = prunable.family_of(model.config)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: its input is its output
        for key in ("o", "down"):
            lin = prunable.linears(prunable.layers(model, fam)[2], fam)[key]
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    data = _calibration(folder, text_file.read_text().splitlines())

    bi = depth.span_distances(model, fam, data)

    assert int(torch.argmin(bi)) == 2 and float(bi[2]) < 1e-3 * float(bi.max())
    assert depth.choose(model, fam, data, 1) == [2]
    assert depth.choose(model, fam, data, 1, "angular") == [2]
    block = depth.choose(model, fam, data, 2, "angular")
    assert len(block) == 2 and block[1] == block[0] + 1 and 2 in block  # a contiguous block holding the idle layer


def test_layer_pairs_follow_kept_layers_and_fall_back_to_uniform():
    from transformers import BertConfig

    teacher = BertConfig(num_hidden_layers=6)
    cut = BertConfig(num_hidden_layers=3, kept_layers=[0, 4, 5])
    plain = BertConfig(num_hidden_layers=3)
    # hidden_states index i = output of layer i - 1; the last entries are always paired
    assert depth.layer_pairs(cut, teacher) == [(1, 1), (2, 5), (3, 6)]
    assert depth.layer_pairs(plain, teacher) == [(1, 2), (2, 4), (3, 6)]  # TinyBERT's uniform map
    assert depth.layer_pairs(teacher, teacher) == [(i, i) for i in range(1, 7)]


def test_homodistil_drops_layers_gradually_and_distils_each_from_its_teacher_layer(llama4, text_file, tmp_path, fast):
    before, _, _ = load_hf(llama4)
    result = Pipeline([{"pass": "prune.homodistil", **QUICK, "layers": 0.5, "heads": 0.5, "ffn": 0.5,
                        "layer_schedule": "gradual"}]).run(str(llama4), str(text_file), tmp_path / "o", **fast)

    model, _, _ = load_hf(tmp_path / "o" / "model")
    notes = result.report["stages"][1]["pruning"]
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (2, 2, 1, 32)
    # Per kept layer: q 16x32 + k 8x32 + v 8x32 + o 32x16 + gate/up/down 3 x 32x32 + 2 norms of 32.
    assert _params(model) == _params(before) - 2 * _layer_params(before) - 2 * (1536 + 3072)
    assert len(cfg.kept_layers) == 2 and notes["after"]["layers"] == 2
    assert hidden_map(model, before) == (depth.layer_pairs(cfg, before.config), None)
    torch.testing.assert_close(_outputs(model), _outputs(result.state.model), atol=1e-5, rtol=1e-5)


def test_homodistil_drops_layers_at_the_start_by_default(bert4, text_file, tmp_path, fast):
    result = Pipeline([{"pass": "prune.homodistil", **QUICK, "layers": 0.5, "heads": 0.5, "ffn": 0}]).run(
        str(bert4), str(text_file), tmp_path / "o", **fast)
    notes = result.report["stages"][1]["pruning"]
    model = result.state.model

    assert (notes["before"]["layers"], notes["after"]["layers"]) == (4, 2) and len(notes["layers_removed"]) == 2
    assert model.config.kept_layers == sorted(set(range(4)) - set(notes["layers_removed"]))
    assert model.config.num_attention_heads == 2
    assert notes["train"]["final_parts"]["hidden"] > 0  # each kept layer against its teacher layer


def test_dropper_schedule_bypass_and_resume(llama4, text_file):
    from compress.passes.prune_homodistil import HomoDistil, Platon

    model, _, _ = load_hf(llama4)
    fam, geo = prunable.family_of(model.config), prunable.Geometry.of(model.config)
    data = _calibration(llama4, text_file.read_text().splitlines())
    cfg = HomoDistil(steps=100, layers=0.5, heads=0, ffn=0, layer_schedule="gradual")
    platon = Platon(model, cfg, fam, geo, data)
    dropped = [platon.layers_dropped(s) for s in range(100)]
    assert dropped[: platon.t_i] == [0] * platon.t_i and dropped[platon.last] == 2 and dropped == sorted(dropped)
    assert 0 < dropped.index(1) < dropped.index(2) == platon.last  # one at a time, the last at the phase's end
    full = _outputs(model)
    platon.after_step(dropped.index(1), model)
    gone = platon.depth.dropped
    assert len(gone) == 1 and platon.layer_pairs() == [(i + 1, i + 1) for i in range(3) if i != gone[0]] + [(4, 4)]
    assert not torch.allclose(_outputs(model), full)

    fresh, _, _ = load_hf(llama4)  # a resumed run: same state dict, the bypass comes back from the checkpoint
    resumed = Platon(fresh, cfg, fam, geo, data)
    resumed.load_state_dict(platon.state_dict())
    torch.testing.assert_close(_outputs(fresh), _outputs(model))
    assert set(fresh.state_dict()) == set(model.state_dict())


def test_distill_kd_after_depth_pruning_uses_the_layer_map(bert4, text_file, tmp_path, fast):
    result = Pipeline([{"pass": "prune.structured", "layers": 0.5, "heads": 0, "ffn": 0, "max_length": 32,
                        "calibration_batches": 1},
                       {"pass": "distill.kd", "steps": 4, "batch_size": 4, "max_length": 32, "w_hidden": 1.0}]).run(
        str(bert4), str(text_file), tmp_path / "o", **fast)
    parts = result.report["stages"][2]["distill"]["final_parts"]

    assert result.state.model.config.num_hidden_layers == 2
    assert parts["hidden"] > 0  # 2 student layers against 4 teacher layers: the map pairs them
    teacher = load_hf(bert4)[0]
    assert hidden_map(result.state.model, teacher) == (depth.layer_pairs(result.state.model.config, teacher.config), None)

@pytest.mark.parametrize("step, message", [
    ({"pass": "prune.homodistil", "layers": 0.5, "w_attention": 1.0}, "attention-map loss"),
    ({"pass": "prune.structured", "layers": 0.5, "params": 0.5}, "params solves heads and ffn only"),
    ({"pass": "prune.homodistil", "layers": 1.0}, "layers"),
])
def test_bad_depth_settings_rejected_before_work(step, message, tiny_bert, text_file, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Pipeline([step]).run(str(tiny_bert), str(text_file), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_structured_hidden_and_layers_together_export_with_parity(llama4, text_file, tmp_path, fast):
    before, _, _ = load_hf(llama4)
    result = Pipeline([{"pass": "prune.structured", "layers": 0.25, "hidden": 0.5, "heads": 0.5, "ffn": 0.5,
                        "importance": "activation", "max_length": 32, "calibration_batches": 1}]).run(
        str(llama4), str(text_file), tmp_path / "o", **fast)
    exported = Pipeline(["export.onnx"]).run(str(tmp_path / "o" / "model"), str(text_file), tmp_path / "e", **fast)

    model, _, _ = load_hf(tmp_path / "o" / "model")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.intermediate_size) == (3, 16, 8, 1, 32)
    assert len(cfg.kept_hidden) == 16 and len(cfg.kept_layers) == 3
    # embeddings 30522 x 16 + lm_head 16 x 30522 + final norm 16; per layer: q 16x16, k 8x16, v 8x16, o 16x16,
    # gate/up 32x16 each, down 16x32, 2 norms of 16
    assert _params(model) == 2 * 30522 * 16 + 16 + 3 * (16 * 16 * 2 + 8 * 16 * 2 + 3 * 32 * 16 + 2 * 16)
    assert result.report["stages"][1]["pruning"]["hidden"] == {"before": 32, "after": 16}
    assert _params(before) > _params(model)
    assert all(row["ok"] for row in exported.report["stages"][1]["parity"])


def test_homodistil_hidden_distils_against_the_teachers_kept_channels(llama4, text_file, tmp_path, fast):
    result = Pipeline([{"pass": "prune.homodistil", **QUICK, "hidden": 0.5, "layers": 0.5, "heads": 0, "ffn": 0}]).run(
        str(llama4), str(text_file), tmp_path / "o", **fast)
    teacher, _, _ = load_hf(llama4)
    student = result.state.model
    parts = result.report["stages"][1]["pruning"]["train"]["final_parts"]

    assert (student.config.hidden_size, student.config.num_hidden_layers) == (16, 2)
    pairs, channels = hidden_map(student, teacher)
    assert channels == student.config.kept_hidden and len(pairs) == 2  # the teacher is the unpruned original
    assert parts["hidden"] > 0


@pytest.mark.parametrize("step", [{"pass": "prune.structured", "hidden": 0.5},
                                  {"pass": "prune.homodistil", "hidden": 0.5}])
def test_hidden_pruning_of_a_sentence_encoder_is_refused(step, tiny_bert, text_file, tmp_path):
    with pytest.raises(ConfigError, match="sentence-embedding width"):
        Pipeline([step]).run(str(tiny_bert), str(text_file), tmp_path / "o")
