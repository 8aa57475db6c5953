"""Kind `classifier`: a transformers sequence classifier (`...ForSequenceClassification`).

It owns little beyond the defaults of `ModelKind`: token inputs, `logits` (batch, labels) as
the output compared and exported, fidelity as the mean KL(teacher || student) of the label
distributions and top-1 agreement per sample, no task metrics. Detection: a config naming a
`ForSequenceClassification` architecture, or an ONNX graph whose first output is not
(batch, sequence, vocab) and that has no embedding outputs."""
from __future__ import annotations

from typing import Any

from compress.kinds.base import FALLBACK, NO, YES, Logits, ModelKind, Transformers


class Classifier(ModelKind):
    def recognise_config(self, config: Any) -> int:
        archs = " ".join(getattr(config, "architectures", None) or [])
        return YES if "ForSequenceClassification" in archs else NO

    def recognise_graph(self, inputs: list[str], outputs: list[tuple[str, tuple]]) -> int:
        return FALLBACK if outputs and len(outputs[0][1]) != 3 else NO


KIND = Classifier(name="classifier", summary="transformers sequence classifier: label logits",
                  fidelity=Logits(per_token=False), storage=Transformers("AutoModelForSequenceClassification"))
