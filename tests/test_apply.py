"""Every torch-form algorithm called on a bare model, without the pipeline (`apply()` in each pass
module): the result really is changed as promised, the caller's model is not, a bare call refuses
what the pipeline refuses, and for pruning it gives the pipeline's weights bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compress import Pipeline, data
from compress.errors import ConfigError
from compress.models import load_hf
from compress.passes import distill_kd, prune_experts, prune_homodistil, prune_structured, quant_weight_only, riq
from compress.passes.distill_kd import DistillKD
from compress.passes.prune_experts import PruneExperts
from compress.passes.prune_homodistil import HomoDistil
from compress.passes.prune_structured import PruneStructured
from compress.passes.quant_weight_only import QuantWeightOnly
from compress.passes.riq import QuantRiq

HOMODISTIL = dict(steps=12, batch_size=4, max_length=32, mask_every=2, checkpoint_every=4)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stage_model(out, name: str):
    model, _, _ = load_hf(out / "stages" / f"01-{name}" / "model")
    return model


def test_structured_on_a_bare_llama_prunes_exactly_and_equals_the_pipeline(tiny_llama, text_file, tmp_path, fast):
    model, tok, _ = load_hf(tiny_llama)
    before = _snapshot(model)
    cfg = PruneStructured(heads=0.5, ffn=0.5, importance="activation", calibration_batches=1, max_length=32)
    notes: dict = {}

    pruned = prune_structured.apply(model, tok, data.load(str(text_file)), cfg, notes=notes, progress=False)

    # 4 query heads on 2 kv heads (head_dim 8), FFN 64: one kv group and half the FFN go. Per layer:
    # q 16 x 32 + k 8 x 32 + v 8 x 32 + o 32 x 16 = 1536; gate/up/down 3 x 32 x 32 = 3072.
    assert _params(pruned) == _params(model) - 2 * (1536 + 3072) == notes["pruning"]["after"]["params"]
    c = pruned.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (2, 1, 32)
    assert _same(_snapshot(model), before)  # the caller's model is untouched
    result = Pipeline([cfg]).run(str(tiny_llama), str(text_file), tmp_path / "o", **fast)
    assert _same(_snapshot(_stage_model(tmp_path / "o", "prune.structured")), _snapshot(pruned))  # bit for bit
    assert result.report["stages"][1]["pruning"] == notes["pruning"]


def test_homodistil_on_a_bare_bert_prunes_exactly_and_equals_the_pipeline(tiny_bert, text_file, tmp_path, fast):
    model, tok, _ = load_hf(tiny_bert)
    before = _snapshot(model)
    cfg = HomoDistil(heads=0.5, ffn=0.5, **HOMODISTIL)

    student = prune_homodistil.apply(model, None, tok, data.load(str(text_file)), cfg, workdir=tmp_path / "w",
                                     progress=False)

    # Per layer (hidden 32, 4 heads of 8, FFN 64): q/k/v 3 x (16 x 32 + 16) = 1584, o 16 x 32 = 512,
    # up 32 x 32 + 32 = 1056, down 32 x 32 = 1024.
    assert _params(student) == _params(model) - 2 * (1584 + 512 + 1056 + 1024)
    assert tuple(student.encoder.layer[0].attention.self.query.weight.shape) == (16, 32)
    assert _same(_snapshot(model), before)
    assert not (tmp_path / "w" / "checkpoint.pt").exists()  # removed once training is done
    Pipeline([cfg]).run(str(tiny_bert), str(text_file), tmp_path / "o", **fast)
    # Same seeds, same batches, same thread count: the training is reproduced bit for bit.
    assert _same(_snapshot(_stage_model(tmp_path / "o", "prune.homodistil")), _snapshot(student))


def _gap(student, teacher, tok, texts: list[str]) -> float:
    from compress.evaluate import fidelity
    from compress.runtime import TorchRunner

    return 1 - fidelity("encoder", TorchRunner(student, "encoder"), TorchRunner(teacher, "encoder"), tok, texts, 32)["cosine"]


def test_distill_kd_on_a_bare_pruned_bert_closes_the_held_out_gap(tiny_bert_sharp, text_file):
    teacher, tok, _ = load_hf(tiny_bert_sharp)
    text = data.load(str(text_file))
    pruned = prune_structured.apply(teacher, cfg=PruneStructured(heads=0.5, ffn=0.5, importance="random"))
    before = _snapshot(pruned)
    notes: dict = {}

    recovered = distill_kd.apply(pruned, teacher, tok, text.train, DistillKD(steps=30, batch_size=8, max_length=32, lr=1e-3),
                                 notes=notes, progress=False)

    gap_pruned, gap_recovered = _gap(pruned, teacher, tok, text.eval), _gap(recovered, teacher, tok, text.eval)
    assert gap_recovered < 0.5 * gap_pruned  # held-out text, never trained on (measured: 0.238 -> 0.044)
    assert notes["distill"]["final_loss"] < notes["distill"]["first_loss"] and notes["distill"]["steps"] == 30
    assert _same(_snapshot(pruned), before)


def _expert_rows(layer) -> tuple[int, int]:
    """(experts stored, router rows) of one Mixtral layer."""
    return layer.mlp.experts.gate_up_proj.shape[0], layer.mlp.gate.weight.shape[0]


def test_expert_pruning_on_a_bare_mixtral_keeps_half_the_experts(tiny_mixtral):
    model, tok, _ = load_hf(tiny_mixtral)
    notes: dict = {}

    pruned = prune_experts.apply(model, tok, data.lee_background()[:8],
                                 PruneExperts(keep=0.5, calibration_samples=8, max_length=32, reconstruction_tokens=128),
                                 notes=notes)

    assert (pruned.config.num_local_experts, model.config.num_local_experts) == (4, 8)
    for layer, original in zip(pruned.model.layers, model.model.layers):
        assert _expert_rows(layer) == (4, 4) and _expert_rows(original) == (8, 8)
    assert all(len(v["kept"]) == 4 for v in notes["experts"]["layers"].values())
    assert _params(pruned) == notes["experts"]["after"]["params"] < _params(model)


def test_weight_only_rtn_on_a_bare_llama_gives_codes_times_scales(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from compress.passes.lib.quantized import dequantize

    model, _, _ = load_hf(tiny_llama)
    before = _snapshot(model)
    notes: dict = {}

    quantized = quant_weight_only.apply(model, cfg=QuantWeightOnly(method="rtn"), notes=notes, workdir=tmp_path,
                                        progress=False)

    tensors = load_file(str(tmp_path / quant_weight_only.CODES_FILE))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    assert len(names) == notes["weight_only"]["layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name in names:
        codes = tensors[f"{name}.codes"]
        assert int(codes.max()) <= 15  # 4-bit codes
        weight = quantized.get_submodule(name).weight.detach()
        assert torch.equal(weight, dequantize(codes, tensors[f"{name}.scales"], tensors[f"{name}.zero_points"], 32))
        assert not torch.equal(weight, model.get_submodule(name).weight)
    assert _same(_snapshot(model), before)


def test_riq_on_a_bare_bert_leaves_codes_times_one_delta_per_tensor(tiny_bert, text_file):
    model, tok, _ = load_hf(tiny_bert)
    before = _snapshot(model)
    notes: dict = {}

    quantized = riq.apply(model, tok, data.load(str(text_file)), QuantRiq(calibration_samples=8, deviation=0.01),
                          notes=notes, progress=False)

    weights = {k: v.numpy() for k, v in quantized.state_dict().items()}
    rows = notes["riq_layers"]
    assert rows and notes["riq"]["calibration_cosine"] >= 0.99
    for row in rows:
        w, delta = weights[row["name"]], np.float32(row["delta"])
        codes = np.rint(w / delta)
        assert np.array_equal(codes.astype(np.float32) * delta, w), row["name"]  # exactly codes x delta
        assert len(np.unique(codes)) == row["symbols"]
    untouched = set(weights) - {r["name"] for r in rows}
    assert untouched and all(np.array_equal(weights[k], before[k].numpy()) for k in untouched)
    assert _same(_snapshot(model), before)


class SmallCnn(nn.Module):
    def __init__(self, widths: tuple[int, int] = (16, 32)):
        super().__init__()
        a, b = widths
        self.features = nn.Sequential(nn.Conv2d(3, a, 3, padding=1), nn.BatchNorm2d(a), nn.ReLU(),
                                      nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU())
        self.fc = nn.Linear(b, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_structured_channels_on_a_bare_cnn_with_an_images_array():
    torch.manual_seed(0)
    net = SmallCnn().eval()
    before = _snapshot(net)
    images = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)

    pruned = prune_structured.apply(net, None, images, PruneStructured(channels=0.5, round_to=1), progress=False)

    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)] == [8, 16]
    assert _params(pruned) == _params(SmallCnn((8, 16)))
    assert pruned(torch.from_numpy(images)).shape == (8, 10)
    assert _same(_snapshot(net), before)


def test_a_bare_call_refuses_what_the_pipeline_refuses(tiny_bert):
    model, tok, _ = load_hf(tiny_bert)
    with pytest.raises(ConfigError, match="importance=taylor needs a causal LM"):
        prune_structured.apply(model, tok, ["some text"], PruneStructured(importance="taylor"))
    with pytest.raises(ConfigError, match="needs data"):
        prune_homodistil.apply(model, None, tok, None, HomoDistil())
    with pytest.raises(ConfigError, match="prune.homodistil does not work on"):
        prune_homodistil.apply(SmallCnn(), None, None, np.zeros((1, 3, 8, 8), np.float32), HomoDistil())
