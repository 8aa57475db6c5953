"""Model kinds (compress/kinds/): every registered kind answers the whole protocol, detection
picks the kinds the loader picked before, names and objects are interchangeable at the public
entry points, and the README's "Add a model kind" example (the regressor below, verbatim) runs
through the pipeline: validation, measurement of the input stage, export.onnx."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from compress import Pipeline, kinds, registry
from compress.errors import UserError

# --- the README's "Add a model kind" module: tests/test_kinds.py must hold it verbatim ----------------
import torch

from compress.kinds import NO, YES, Cosine, ModelKind, TorchModule


class TinyRegressor(torch.nn.Module):
    """Token ids -> one vector per text: the mean of the token embeddings, then a linear layer."""

    def __init__(self, vocab: int = 30522, width: int = 16, out: int = 4):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, width), torch.nn.Linear(width, out)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * m).sum(1) / m.sum(1).clamp(min=1))


class Regressor(ModelKind):
    """A module fed token ids that returns one vector per text; fidelity: cosine of those vectors."""

    def torch_output(self, model, feed, pooling="mean"):
        with torch.inference_mode():
            return model(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])).numpy()

    def onnx_output(self, outputs, feed, pooling="mean"):
        return outputs["vector"]

    def export_forward(self, model, input_ids, attention_mask, pooling):
        return model(input_ids, attention_mask)

    def recognise_module(self, module):
        return YES if isinstance(module, TinyRegressor) else NO


KIND = Regressor(name="regressor", summary="token ids -> a vector", fidelity=Cosine(), storage=TorchModule(),
                 onnx_outputs=("vector",))
# --- end of the README's module -------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
BUILT_IN = ("encoder", "classifier", "causal-lm", "image-classifier")


@pytest.fixture
def regressor():
    kinds.register(KIND)
    try:
        yield KIND
    finally:
        kinds.unregister(KIND.name)


def _samples(kind):
    """Held-out samples as the kind's inputs take them: texts, or (N, 3, H, W) images."""
    if kind.uses_tokenizer:
        return ["a first short sentence about the weather", "and a second, longer one about the stock market today"]
    return np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)


def _tokenizer():
    from compress.models import alias_path, load_tokenizer

    return load_tokenizer(alias_path("minilm"))


def test_builtin_kinds_are_registered_in_order_and_found_by_name():
    assert tuple(kinds.ALL)[:4] == BUILT_IN
    for name in BUILT_IN:
        kind = kinds.get(name)
        assert isinstance(kind, ModelKind) and str(kind) == kind.name == name and f"{kind}" == name
        assert kinds.get(kind) is kind and kind == name and hash(kind) == hash(name)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_kind_answers_the_protocol(name):
    kind = kinds.get(name)
    assert isinstance(kind.summary, str) and kind.summary
    assert all(isinstance(flag, bool) for flag in (kind.uses_tokenizer, kind.is_transformers, kind.is_generative,
                                                   kind.cache_reference, kind.train_in_eval_mode))
    assert kind.onnx_outputs and all(isinstance(n, str) for n in kind.onnx_outputs)
    assert isinstance(kind.inputs.default_data, str) and isinstance(kind.forward_kwargs(), dict)
    for method in ("load", "batches", "latency_feed", "parity_feeds", "calibration_feeds", "training_view"):
        assert callable(getattr(kind.inputs, method)), method
    for method in ("load_input", "save", "reload"):
        assert callable(getattr(kind.storage, method)), method
    for method in ("torch_output", "onnx_output", "output_rows", "task_metrics", "profile_prompt", "export_forward",
                   "export_onnx", "train_forward", "output_loss", "load_data"):
        assert callable(getattr(kind, method)), method
    tok = _tokenizer() if kind.uses_tokenizer else None
    feeds = list(kind.inputs.batches(tok, _samples(kind), 32, batch_size=1))
    assert len(feeds) == len(_samples(kind))
    assert set(kind.inputs.latency_feed(tok, _samples(kind), 2, 16)) == set(feeds[0])
    assert all(set(f) == set(feeds[0]) for f in kind.inputs.parity_feeds(tok, _samples(kind), 32))
    assert kind.fidelity.weight(feeds[0]) > 0
    mask = feeds[0].get("attention_mask")
    per_token = getattr(kind.fidelity, "per_token", False)
    out = np.random.default_rng(1).standard_normal((1, mask.shape[1], 7) if per_token else (1, 7))
    same = kind.fidelity.compare(out, out, mask)
    assert same.get("cosine", 1.0) == pytest.approx(1.0) and same.get("kl", 0.0) == pytest.approx(0.0, abs=1e-12)
    assert same.get("top1", 1.0) == 1.0 and set(same) in ({"cosine", "cosine_min"}, {"kl", "top1"})
    rows = kind.output_rows(out, mask if mask is not None else np.ones((1, 1)))
    assert rows.ndim == 2 and rows.shape[-1] == (7 if per_token else out[0].size)
    prompt = kind.profile_prompt(tok, _samples(kind), 4)
    assert (prompt is None) != kind.is_generative and (prompt is None or prompt.shape == (1, 4))


def test_detection_matches_the_loader_before_kinds():
    from transformers import BertConfig, LlamaConfig

    assert kinds.from_config(BertConfig(architectures=["BertModel"])).name == "encoder"
    assert kinds.from_config(BertConfig(architectures=["BertForSequenceClassification"])).name == "classifier"
    assert kinds.from_config(LlamaConfig(architectures=["LlamaForCausalLM"])).name == "causal-lm"
    assert kinds.from_config(LlamaConfig()).name == "causal-lm"  # a GGUF config names no architecture
    assert kinds.from_config(BertConfig()).name == "encoder"
    graph = kinds.from_graph
    assert graph(["input_ids"], [("last_hidden_state", ("b", "s", 32)), ("sentence_embedding", ("b", 32))]).name == "encoder"
    assert graph(["input_ids"], [("logits", ("b", "s", 100)), ("present.0.key", ("b", 2, "t", 8))]).name == "causal-lm"
    assert graph(["input_ids"], [("logits", ("b", 3))]).name == "classifier"
    assert graph(["pixel_values"], [("logits", ("b", 10))]).name == "image-classifier"
    assert graph(["pixel_values"], [("last_hidden_state", ("b", 5, 8))]).name == "image-classifier"  # pixels first
    assert kinds.of_module(torch.nn.Conv2d(3, 4, 3)).name == "image-classifier"


def test_unknown_names_and_double_registration_are_clear_errors():
    with pytest.raises(UserError, match="unknown model kind 'causal_lm': did you mean 'causal-lm'"):
        kinds.get("causal_lm")
    with pytest.raises(UserError, match="already registered"):
        kinds.register(Regressor(name="encoder", summary="a clash"))
    with pytest.raises(UserError, match="compress's own model kinds"):
        kinds.unregister("encoder")
    assert "causal_lm" not in registry.ALL_KINDS and "image-classifier" not in registry.TEXT_KINDS


def test_names_and_objects_work_alike_at_the_public_entry_points():
    from compress import evaluate
    from compress.state import ModelState

    state = ModelState(source="x", kind="causal-lm", form="onnx")
    assert state.kind is kinds.get("causal-lm") and state.kind.is_generative
    s, t = np.eye(3)[None] * 5.0, np.eye(3)[None] * 4.0
    mask = np.array([[1, 1, 0]])
    assert evaluate.compare("causal-lm", s, t, mask) == evaluate.compare(kinds.get("causal-lm"), s, t, mask)
    assert evaluate.compare("encoder", s[0], t[0])["cosine"] == pytest.approx(1.0)


def test_readme_shows_the_regressor_module_verbatim():
    text = README.read_text()
    section = text.split("### Add a model kind", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "README: no code under 'Add a model kind'"
    assert blocks[0] in Path(__file__).read_text(), "README's kind module and tests/test_kinds.py differ"


def test_a_registered_kind_runs_through_the_pipeline(regressor, text_file, tmp_path, fast):
    from compress import loading
    from compress.models import alias_path

    assert loading.describe(TinyRegressor()).kind is regressor
    assert "regressor" in registry.ALL_KINDS and "regressor" in registry.TEXT_KINDS
    torch.manual_seed(0)
    model = TinyRegressor()
    result = Pipeline(["export.onnx"]).run(model, str(text_file), tmp_path / "o", tokenizer=str(alias_path("minilm")),
                                           **fast)
    rep = result.report
    assert rep["kind"] == "regressor" and rep["architecture"] == "TinyRegressor"
    torch_stage, onnx_stage = rep["stages"]
    assert torch_stage["fidelity"]["cosine"] == pytest.approx(1.0) and torch_stage["metrics"] == {}
    assert onnx_stage["fidelity"]["cosine"] > 0.9999 and [r["name"] for r in onnx_stage["parity"]] == ["vector"]
    assert onnx_stage["latency_ms"]["p50"] > 0
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["vector"]


def test_without_registration_the_module_is_taken_for_an_image_classifier():
    from compress import loading

    assert "regressor" not in kinds.ALL
    assert loading.describe(TinyRegressor()).kind.name == "image-classifier"
