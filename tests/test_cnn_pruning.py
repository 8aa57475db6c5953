"""CNNs through the pipeline: prune.structured by channels (Torch-Pruning), distill.kd on logits,
export.onnx / quant.int8 on pixel inputs, saving and reloading the narrowed model. A tiny seeded
CNN (conv, depthwise conv, residual add, BatchNorm) on the real built-in photos at 32 pixels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from compress import images
from compress.errors import ConfigError
from compress.pipeline import Pipeline


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32))  # added to the stem's output
        self.head = nn.Sequential(nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU6())
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.pw(self.dw(h))
        return self.fc(self.head(h).mean((2, 3)))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    for m in net.modules():  # non-trivial BatchNorm statistics, as in a trained net
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def photos32() -> images.ImageData:
    return images.load("photos", size=32)


def test_builtin_photos_split_by_photo(photos32):
    assert photos32.train.shape == (100, 3, 32, 32) and photos32.eval.shape == (40, 3, 32, 32)
    train = {a.tobytes() for a in photos32.train}
    assert not any(a.tobytes() in train for a in photos32.eval)
    assert -1.0 <= photos32.eval.min() and photos32.eval.max() <= 1.0  # (x - 127) / 128


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "random"])
def test_channel_pruning_narrows_convs_exports_and_quantizes(importance, photos32, tmp_path, fast):
    net = tiny_net()
    passes = [{"pass": "prune.structured", "channels": 0.5, "importance": importance}, "export.onnx",
              {"pass": "quant.int8", "mode": "static", "calibration_samples": 16}]
    result = Pipeline(passes).run(net, photos32, tmp_path / "o", **fast)

    stages = result.report["stages"]
    assert result.report["kind"] == "image-classifier"
    assert stages[1]["pruning"]["backend"] == "torch-pruning"
    assert stages[1]["params"] < 0.45 * stages[0]["params"]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 32, 64]  # the caller's module is untouched
    assert stages[2]["parity"][0]["ok"] and stages[3]["quantized_ops"].get("QuantizeLinear")
    assert (tmp_path / "o" / "model.onnx").is_file()
    assert "batch 1, images of 32x32" in (tmp_path / "o" / "report.md").read_text()


def test_pruned_widths_are_multiples_of_round_to_and_model_reloads(photos32, tmp_path, fast):
    result = Pipeline([{"pass": "prune.structured", "channels": 0.4, "round_to": 8}]).run(
        tiny_net(), photos32, tmp_path / "o", **fast)
    model = result.state.model
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [24, 24, 24, 40]  # 32 - 12 = 20 -> 24, 64 - 25 = 39 -> 40 (rounded up); the classifier keeps 10
    assert model.fc.out_features == 10

    folder = tmp_path / "o" / "model"
    assert json.loads((folder / "shapes.json").read_text())["layers"]["stem.0"]["out_channels"] == 24
    reloaded = images.load_module(folder, tiny_net(seed=1))  # another instance of the class, other weights
    x = torch.from_numpy(photos32.eval[:5])
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_distill_kd_recovers_a_pruned_cnn(photos32, tmp_path, fast):
    passes = [{"pass": "prune.structured", "channels": 0.5, "importance": "random"},
              {"pass": "distill.kd", "steps": 40, "batch_size": 16, "lr": 3e-3}]
    result = Pipeline(passes).run(tiny_net(), photos32, tmp_path / "o", **fast)

    pruned, recovered = (s["fidelity"]["kl"] for s in result.report["stages"][1:3])
    assert recovered < 0.5 * pruned  # held-out photos, never trained on
    assert result.report["stages"][2]["distill"]["images"] == 100


@pytest.mark.parametrize("passes, message", [
    ([{"pass": "prune.structured"}], "a CNN is pruned by channels"),
    ([{"pass": "prune.structured", "channels": 0.5, "heads": 0.5}], "heads: for transformers; a CNN is pruned by channels"),
    ([{"pass": "prune.structured", "channels": 0.5, "importance": "activation"}], "activation is for transformers"),
    ([{"pass": "distill.kd", "w_hidden": 1.0}], "w_hidden: for transformers only"),
    ([{"pass": "prune.homodistil"}], "'prune.homodistil' does not work on a image-classifier model; the passes that do:"),
    (["export.onnx", "quant.riq"], "'quant.riq' does not work on a image-classifier"),
])
def test_cnn_bad_settings_rejected_before_work(passes, message, photos32, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Pipeline(passes).run(tiny_net(), photos32, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_channels_rejected_on_a_transformer(tiny_bert, text_file, tmp_path):
    with pytest.raises(ConfigError, match="channels applies to CNNs"):
        Pipeline([{"pass": "prune.structured", "channels": 0.5}]).run(str(tiny_bert), str(text_file), tmp_path / "o")


def test_image_folder_data_and_onnx_input(tmp_path, fast):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = images.load(folder, size=32)
    assert data.train.shape == (4, 3, 32, 32) and data.eval.shape == (1, 3, 32, 32)

    exported = Pipeline(["export.onnx"]).run(tiny_net(), data, tmp_path / "e", **fast)
    onnx_in = exported.outdir / "model.onnx"
    again = Pipeline([{"pass": "quant.int8", "mode": "static"}]).run(str(onnx_in), str(folder), tmp_path / "q", **fast)
    assert again.report["kind"] == "image-classifier" and again.report["stages"][1]["fidelity"]["top1"] >= 0.0
    with pytest.raises(Exception, match="at least 2 image files"):
        images.load(tmp_path / "e", size=32)


def test_static_int8_after_ort_fusion_names_the_fix(photos32, tmp_path, fast):
    from compress.errors import PassFailed

    passes = ["export.onnx", "optimize.ort", {"pass": "quant.int8", "mode": "static"}]
    with pytest.raises(PassFailed, match="put quant.int8 before optimize.ort"):
        Pipeline(passes).run(tiny_net(), photos32, tmp_path / "o", **fast)


def test_cli_prunes_the_builtin_efficientnet_and_refuses_text_passes(tmp_path):
    """The real EfficientNet-Lite0 and photos through the CLI (one-shot magnitude, export, parity)."""
    from typer.testing import CliRunner

    from compress.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["run", "efficientnet-lite0", "--pass", "prune.homodistil", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "does not work on a image-classifier model" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "bad").exists()

    out = tmp_path / "o"
    ok = runner.invoke(app, ["run", "efficientnet-lite0", "--pass", "prune.structured:channels=0.1",
                             "--pass", "export.onnx", "--pass", "profile:runs=5,warmup=1", "-o", str(out), "--no-tasks"])
    assert ok.exit_code == 0, ok.output
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert report["kind"] == "image-classifier" and report["data"]["eval"] == 40
    assert stages[1]["params"] < 0.9 * stages[0]["params"]  # 4.65M -> ~3.95M (the classifier stays whole)
    assert stages[2]["parity"][0]["ok"]
    reloaded = images.load_module(out / "stages" / "01-prune.structured" / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == stages[1]["params"]


def test_matching_views_are_seeded_random_views_of_the_batch(photos32):
    x = torch.from_numpy(photos32.train[:8])
    a, b, c = images.matching_views(x, 3), images.matching_views(x, 3), images.matching_views(x, 4)

    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x) and a.abs().max() <= x.abs().max() + 1e-5  # mixes of crops: no new extremes


class InputsNet(TinyNet):
    def forward(self, inputs):  # EfficientNet's argument name: dynamic shapes must not assume `x`
        return super().forward(inputs)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_image_export_with_either_exporter_matches_torch_on_other_batch_sizes(exporter, photos32, tmp_path, fast):
    torch.manual_seed(0)
    net = InputsNet().eval()
    result = Pipeline([{"pass": "export.onnx", "exporter": exporter}]).run(net, photos32, tmp_path / "o", **fast)

    assert all(row["ok"] for row in result.report["stages"][1]["parity"])  # batches of 2 and 3
