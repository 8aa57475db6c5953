"""Kind `encoder`: a transformers encoder (BERT, MiniLM, RoBERTa, ...) used for sentence embeddings.

It owns: the output compared and exported, the mean- or CLS-pooled, L2-normalised sentence
embedding (pooling from the sentence-transformers folder, state.meta["pooling"]); fidelity as the
mean (and min) cosine of those embeddings; task metrics Lee-50 and polarity-200
(compress.evaluate); ONNX outputs `last_hidden_state` and `sentence_embedding` (pooled inside the
graph); the distillation output loss on pooled embeddings (cosine or MSE). It is the fallback for
a transformers config that names no causal-LM or classification head."""
from __future__ import annotations

from typing import Any

import numpy as np

from compress.kinds.base import FALLBACK, NO, YES, Cosine, ModelKind, Transformers

EMBEDDING_OUTPUTS = ("last_hidden_state", "sentence_embedding")


class Encoder(ModelKind):
    def torch_output(self, model: Any, feed: dict[str, np.ndarray], pooling: str = "mean") -> np.ndarray:
        import torch

        from compress.runtime import pool

        ids, mask = torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return pool(hidden.float().numpy(), feed["attention_mask"], pooling)

    def onnx_output(self, outputs: dict[str, np.ndarray], feed: dict[str, np.ndarray], pooling: str = "mean") -> np.ndarray:
        from compress.runtime import pool

        if "sentence_embedding" in outputs:
            return outputs["sentence_embedding"]
        return pool(outputs.get("last_hidden_state", next(iter(outputs.values()))), feed["attention_mask"], pooling)

    def task_metrics(self, run: Any, tokenizer: Any, quick: bool = False) -> dict[str, float]:
        """Lee-50 (all 1225 pairs) and polarity (5-fold probe on 200 sentences): both need their whole
        sets to mean anything, so a quick measurement skips them."""
        from compress import evaluate

        if quick:
            return {}

        return {"lee50": evaluate.lee50(run, tokenizer), "polarity": evaluate.polarity(run, tokenizer)}

    def export_forward(self, model: Any, input_ids: Any, attention_mask: Any, pooling: str) -> Any:
        import torch

        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if pooling == "cls":
            emb = hidden[:, 0]
        else:  # one batched MatMul: cheaper in ORT than Mul over (batch, seq, hidden) + ReduceSum
            m = attention_mask.to(hidden.dtype).unsqueeze(1)  # (batch, 1, seq)
            emb = torch.bmm(m, hidden).squeeze(1) / m.sum(-1).clamp(min=1e-9)  # (batch, hidden)
        return hidden, torch.nn.functional.normalize(emb, dim=-1)

    def output_loss(self, s_out: Any, t_out: Any, mask: Any, weights: Any, taid_t: float | None = None) -> Any:
        from compress.passes.lib.losses import embedding_loss

        return embedding_loss(s_out, t_out, mask, weights, taid_t)

    def recognise_config(self, config: Any) -> int:
        return FALLBACK  # a transformers model with no head we know: its hidden states are the output

    def recognise_graph(self, inputs: list[str], outputs: list[tuple[str, tuple]]) -> int:
        return YES if any(name in EMBEDDING_OUTPUTS for name, _ in outputs) else NO


KIND = Encoder(name="encoder", summary="transformers encoder: pooled, L2-normalised sentence embeddings",
               fidelity=Cosine(), storage=Transformers("AutoModel"), onnx_outputs=EMBEDDING_OUTPUTS)
