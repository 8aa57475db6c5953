"""optimize.ort fuses head-pruned BERTs as it fuses whole ones: one Attention per layer, the
embedding LayerNorm fused, parity kept (a head count that does not divide the hidden size, 3 of 4
heads, used to fail; 2 of 4 silently lost the Attention fusion)."""
from __future__ import annotations

import pytest

from compress.pipeline import Pipeline


@pytest.mark.parametrize("heads", [0.25, 0.5])
def test_head_pruned_bert_gets_fused_attention(heads, tiny_bert, text_file, tmp_path, fast):
    result = Pipeline([{"pass": "prune.structured", "heads": heads, "ffn": 0.0, "importance": "activation"},
                       "export.onnx", "optimize.ort"]).run(str(tiny_bert), str(text_file), tmp_path / "o", **fast)
    stage = result.report["stages"][-1]
    layers = 2  # tests/conftest.py TINY
    assert stage["fused_ops"].get("Attention") == layers and stage["fused_ops"].get("EmbedLayerNormalization") == 1
    assert stage["fidelity"]["cosine"] > 0.999
