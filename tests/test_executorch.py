"""export.executorch on tiny models: the .pte loads in ExecuTorch's own runtime and matches PyTorch
(fp32 tightly, int8 within the int8 bound), XNNPACK really holds the graph (counted in the lowered
program and in the written file), the `pte` stage is measured (fidelity, latency), saved, reloaded
and shares its torch stages with an export.onnx run; causal LMs are refused before any work.
Skipped where ExecuTorch is not installed (pip install 'compress[executorch]')."""
from __future__ import annotations

import pytest

pytest.importorskip("executorch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from torch import nn  # noqa: E402

from compress import Pipeline, images  # noqa: E402
from compress.errors import ConfigError  # noqa: E402
from compress.profiling import LatencySettings  # noqa: E402
from compress.runtime import PteRunner, pool, tokenize  # noqa: E402

PRUNE = {"pass": "prune.structured", "ffn": 0.5}
# Measured on tiny BERT (hidden 32, 2 layers; 2026-11-29): XNNPACK takes 60 of 133 compute nodes (45%), every
# linear / bmm / softmax / gelu; embeddings, LayerNorm and the mask arithmetic stay on portable kernels.
MIN_SHARE = 0.4
MATMULS = ("aten_linear_default", "aten_bmm_default")


def _run_kwargs(**extra) -> dict:
    """conftest's `fast`, for module-scoped runs."""
    return dict(latency=LatencySettings(batch=1, seq=16, threads=1, warmup=1, runs=5), tasks=False, max_length=32,
                console=Console(quiet=True), **extra)


@pytest.fixture(scope="module")
def shared_runs(tiny_bert, text_file, tmp_path_factory):
    """The same torch pass to both back ends: export.onnx first, then export.executorch over the same stage folder."""
    root = tmp_path_factory.mktemp("executorch")
    stages = root / "stages"
    onnx = Pipeline([PRUNE, "export.onnx"]).run(str(tiny_bert), str(text_file), root / "onnx",
                                                **_run_kwargs(stages_dir=stages))
    pte = Pipeline([PRUNE, "export.executorch"]).run(str(tiny_bert), str(text_file), root / "pte",
                                                     **_run_kwargs(stages_dir=stages))
    return root, onnx.report, pte.report


@pytest.fixture(scope="module")
def int8_run(tiny_bert, text_file, tmp_path_factory):
    """int8, with every sample the pass hands to the model's inputs recorded (calibration must be training text)."""
    from compress.kinds import TextInputs

    seen: list[list[str]] = []
    batches = TextInputs.batches

    def spy(self, tokenizer, samples, max_length, batch_size=16):
        seen.append(list(samples))
        return batches(self, tokenizer, samples, max_length, batch_size)

    out = tmp_path_factory.mktemp("executorch_int8") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TextInputs, "batches", spy)
        result = Pipeline([{"pass": "export.executorch", "quantize": "int8", "calibration_samples": 8}]).run(
            str(tiny_bert), str(text_file), out, **_run_kwargs())
    return out, result.report, seen


def _torch_embeddings(folder, feed: dict) -> np.ndarray:
    from compress.models import load_hf

    model = load_hf(folder, False)[0].eval()  # a pruned folder: compress's loader reads its per-layer widths
    with torch.inference_mode():
        hidden = model(input_ids=torch.from_numpy(feed["input_ids"]),
                       attention_mask=torch.from_numpy(feed["attention_mask"])).last_hidden_state
    return pool(hidden.numpy(), feed["attention_mask"], "mean")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_export_executorch_fp32_pte_loads_in_the_executorch_runtime_and_matches_torch(shared_runs, tiny_bert):
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from transformers import AutoTokenizer

    root, _, report = shared_runs
    pruned = next((root / "stages").glob("01-prune.structured-*")) / "model"  # the torch stage the .pte was made from
    texts = ["short one", "a somewhat longer real sentence about the weather in Sydney today", "x"]
    feed = tokenize(AutoTokenizer.from_pretrained(tiny_bert), texts, 64)  # 3 rows: not a parity feed's shape

    module = _load_for_executorch(str(root / "pte" / "model.pte"))  # ExecuTorch's runtime, not compress's runner
    hidden, embedding = module.forward((torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])))

    assert hidden.shape == (3, feed["input_ids"].shape[1], 32) and embedding.shape == (3, 32)
    assert _cosines(embedding.numpy(), _torch_embeddings(pruned, feed)).min() > 0.9999
    rows = report["stages"][-1]["parity"]
    assert {r["name"] for r in rows} == {"last_hidden_state", "sentence_embedding"}
    assert all(r["ok"] and r["cosine"] > 0.9999 for r in rows)


def test_export_executorch_hands_the_matmuls_to_xnnpack(shared_runs):
    from executorch.exir._serialize._program import deserialize_pte_binary

    root, _, report = shared_runs
    et = report["stages"][-1]["executorch"]
    plan = deserialize_pte_binary((root / "pte" / "model.pte").read_bytes()).program.execution_plan[0]

    assert et["delegated_share"] >= MIN_SHARE and et["subgraphs"] == et["delegates"]["XnnpackBackend"]
    assert all(et["delegated_ops"].get(op) for op in MATMULS) and not set(MATMULS) & set(et["portable_ops"])
    assert [d.id for d in plan.delegates] == ["XnnpackBackend"] * et["subgraphs"]  # the file holds them
    assert not any("linear" in op.name or "bmm" in op.name or "addmm" in op.name for op in plan.operators)


def test_export_executorch_stage_is_measured_like_an_onnx_stage(shared_runs):
    root, onnx, pte = shared_runs
    stage, onnx_stage = pte["stages"][-1], onnx["stages"][-1]

    assert stage["form"] == "pte" and pte["final"] == {"path": "model.pte", "form": "pte"}
    pruned = pte["stages"][1]  # fidelity is against the input model: the .pte keeps the pruned model's
    for key in ("fidelity", "fidelity_unseen"):
        assert abs(stage[key]["cosine"] - pruned[key]["cosine"]) < 1e-5
        assert abs(stage[key]["cosine"] - onnx_stage[key]["cosine"]) < 1e-5  # one torch model, two runtimes
    assert stage["latency_ms"]["p50"] > 0
    assert stage["params"] == pruned["params"]  # a .pte is not read back as a graph: the torch stage's count
    assert stage["bytes"] == (root / "pte" / "model.pte").stat().st_size
    assert "## ExecuTorch: stage 2 export.executorch" in (root / "pte" / "report.md").read_text()


def test_export_executorch_shares_the_torch_stages_of_an_export_onnx_run(shared_runs):
    _, onnx, pte = shared_runs

    assert pte["stages"][1] == onnx["stages"][1]  # loaded from the shared folder, not pruned again


def test_export_executorch_stage_reloads_from_its_folder(shared_runs, tiny_bert, text_file):
    root, _, pte = shared_runs

    again = Pipeline([PRUNE, "export.executorch"]).run(str(tiny_bert), str(text_file), root / "again",
                                                       **_run_kwargs(stages_dir=root / "stages"))

    assert again.report["stages"] == pte["stages"]  # every stage cached, the .pte one included
    assert again.state.form == "pte" and again.state.path.suffix == ".pte"
    out = PteRunner(root / "again" / "model.pte", "encoder").raw(
        {"input_ids": np.full((2, 8), 1000, dtype=np.int64), "attention_mask": np.ones((2, 8), dtype=np.int64)})
    assert out["sentence_embedding"].shape == (2, 32)


def test_the_same_pruned_model_goes_to_pte_and_onnx_in_one_run(tiny_bert, text_file, tmp_path):
    out = tmp_path / "both"
    report = Pipeline([PRUNE, "export.executorch", "export.onnx", "quant.int8"]).run(
        str(tiny_bert), str(text_file), out, **_run_kwargs()).report

    pruned, pte, onnx_fp32, int8 = report["stages"][1:]
    assert [s["form"] for s in (pruned, pte, onnx_fp32, int8)] == ["torch", "pte", "onnx", "onnx"]
    assert pte["params"] == pruned["params"]  # both back ends hold the pruned model (ONNX counts its graph's
    assert abs(onnx_fp32["params"] - pruned["params"]) < 0.01 * pruned["params"]  # initializers, buffers too)
    assert pte["fidelity"]["cosine"] > 0.999 and onnx_fp32["fidelity"]["cosine"] > 0.999  # each against the input
    assert pte["latency_ms"]["p50"] > 0 and int8["latency_ms"]["p50"] > 0
    assert report["final"] == {"path": "model.onnx", "form": "onnx"}
    assert (out / "stages" / "02-export.executorch" / "model.pte").is_file()  # kept in the run's folder
    assert "## ExecuTorch: stage 2 export.executorch" in (out / "report.md").read_text()


def test_pte_runner_slices_batches_over_the_planned_size_and_refuses_longer_inputs(shared_runs):
    root, _, pte = shared_runs
    run = PteRunner(root / "pte" / "model.pte", "encoder")
    ids = np.random.default_rng(0).integers(1000, 2000, size=(20, 12), dtype=np.int64)  # 20 > max_batch 16
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    whole = run(feed)
    parts = np.concatenate([run({k: v[:10] for k, v in feed.items()}), run({k: v[10:] for k, v in feed.items()})])

    assert pte["stages"][-1]["executorch"]["max_batch"] == 16 and whole.shape == (20, 32)
    np.testing.assert_allclose(whole, parts, atol=1e-6)
    longest = pte["stages"][-1]["executorch"]["max_sequence"]
    with pytest.raises(ValueError, match="max_sequence"):
        too_long = np.ones((1, longest + 1), dtype=np.int64)
        run({"input_ids": too_long, "attention_mask": too_long})


def test_export_executorch_int8_matches_within_the_int8_bound(int8_run):
    out, report, _ = int8_run
    stage = report["stages"][-1]

    # measured 0.9998 (parity) and 0.9999 (held-out fidelity) on tiny BERT; the bound is the config's 0.98
    assert all(r["ok"] and r["cosine"] >= 0.98 and r["atol"] is None for r in stage["parity"])
    assert stage["fidelity"]["cosine"] > 0.99
    assert stage["executorch"]["quantize"] == "int8" and stage["executorch"]["delegated_share"] >= MIN_SHARE
    assert (out / "model.pte").is_file()


def test_export_executorch_int8_calibrates_on_training_text_only(int8_run, text_file):
    from compress.data import load

    _, _, seen = int8_run
    data = load(str(text_file))

    calibration = [s for s in seen if len(s) == 8 and set(s) <= set(data.train)]
    assert calibration == [list(data.train[:8])]  # the first calibration_samples training texts, once
    assert not any(set(s) & set(data.eval) for s in calibration)


def test_export_executorch_works_on_a_classifier(tiny_classifier, text_file, tmp_path):
    result = Pipeline(["export.executorch"]).run(str(tiny_classifier), str(text_file), tmp_path / "o", **_run_kwargs())

    stage = result.report["stages"][-1]
    assert [r["name"] for r in stage["parity"]] == ["logits"] and all(r["cosine"] > 0.9999 for r in stage["parity"])
    assert stage["fidelity"]["top1"] == 1.0 and stage["fidelity"]["kl"] < 1e-6


class TinyCNN(nn.Module):
    """conv, depthwise conv, residual add, BatchNorm, pooling, linear (as tests/test_cnn_pruning.py's TinyNet)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        h = self.stem(x)
        return self.fc((h + self.dw(h)).mean((2, 3)))


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_export_executorch_image_classifier_runs_on_xnnpack(quantize, tmp_path):
    torch.manual_seed(0)
    photos = images.load("photos", size=32)

    result = Pipeline([{"pass": "export.executorch", "quantize": quantize, "calibration_samples": 16}]).run(
        TinyCNN().eval(), photos, tmp_path / "o", **_run_kwargs())

    stage = result.report["stages"][-1]
    et = stage["executorch"]
    # measured: fp32 KL 3e-15, top-1 1.0; int8 (untrained, near-tied logits) parity cosine 0.9995, KL 5e-6, top-1 0.9
    assert all(r["ok"] for r in stage["parity"]) and stage["fidelity"]["kl"] < (1e-9 if quantize == "none" else 1e-4)
    conv = "aten_convolution_default"
    assert et["delegated_ops"].get(conv) == 2 and conv not in et["portable_ops"]
    assert et["max_sequence"] is None and stage["latency_ms"]["p50"] > 0


def test_export_executorch_refuses_a_causal_lm_before_any_work(tiny_llama, text_file, tmp_path):
    with pytest.raises(ConfigError, match="KV-cache method"):
        Pipeline(["export.executorch"]).run(str(tiny_llama), str(text_file), tmp_path / "o", **_run_kwargs())

    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_export_executorch_says_how_to_install_executorch_when_missing(monkeypatch, tiny_bert):
    import importlib.util

    from compress import loading, registry

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    spec = registry.get("export.executorch")

    problems = spec.check(spec.config(), loading.describe(str(tiny_bert)))

    assert problems == ["needs ExecuTorch, which is not installed: pip install 'compress[executorch]'"]


# --- the built-in real models (slow: minutes on 2 cores) ---------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_real_minilm_pte_runs_in_executorch_and_keeps_the_embeddings(quantize, tmp_path):
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    result = Pipeline([{"pass": "export.executorch", "quantize": quantize}]).run(
        "minilm", "mix", tmp_path / "o", latency=LatencySettings(batch=1, seq=128, threads=2, warmup=2, runs=10),
        tasks=False, console=Console(quiet=True))

    stage = result.report["stages"][-1]
    # measured (benchmarks/mobile_runtimes.py, README): fp32 held-out cosine 1.0000, int8 0.9908
    assert stage["fidelity"]["cosine"] > (0.9999 if quantize == "none" else 0.98)
    assert stage["fidelity_unseen"]["cosine"] > (0.9999 if quantize == "none" else 0.98)
    assert stage["executorch"]["delegated_share"] > 0.4 and stage["latency_ms"]["p50"] > 0
    module = _load_for_executorch(str(tmp_path / "o" / "model.pte"))  # ExecuTorch's own runtime
    ids = torch.tensor([[101, 7592, 2088, 102]])
    hidden, embedding = module.forward((ids, torch.ones_like(ids)))
    assert hidden.shape == (1, 4, 384) and embedding.shape == (1, 384)
    assert abs(float(embedding.norm()) - 1) < 1e-3  # a unit-norm sentence embedding


@pytest.mark.slow
def test_real_efficientnet_pte_agrees_with_torch_on_the_photos(tmp_path):
    result = Pipeline(["export.executorch"]).run("efficientnet-lite0", "photos", tmp_path / "o", tasks=False,
                                                 latency=LatencySettings(batch=1, threads=2, warmup=2, runs=10),
                                                 console=Console(quiet=True))

    stage = result.report["stages"][-1]
    assert all(r["ok"] for r in stage["parity"]) and stage["fidelity"]["top1"] == 1.0
    assert (tmp_path / "o" / "model.pte").stat().st_size > 15e6  # fp32 weights of 4.65M parameters
