"""Kind `causal-lm`: a decoder LLM (`...ForCausalLM`: Llama, Qwen, Mistral, Mixtral, ...).

It owns: logits (batch, seq, vocab) computed with the position ids the ONNX runner feeds (so left
padding compares alike) and `use_cache=False` on every transformers forward; fidelity as KL and
top-1 agreement over the real (unpadded) tokens, batches weighted by their tokens; the
reference strategy (its logits are too large to cache: the teacher runs again batch by batch);
perplexity on 100 lee_background paragraphs as its task metric; export.onnx with a KV cache by
default (exporters/causal_lm.py); generation timing (TTFT, tokens/s) of cache graphs when
profiled; next-token cross-entropy as an extra distillation loss. Text generation itself stays
in compress/generate.py."""
from __future__ import annotations

from typing import Any

import numpy as np

from compress.kinds.base import FALLBACK, NO, YES, Logits, ModelKind, Transformers

# a GGUF config names no architecture: a decoder model type means a causal LM
DECODER_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gemma", "gemma2", "mixtral", "qwen2_moe",
                 "qwen3_moe", "olmoe", "deepseek_v3"}


class CausalLM(ModelKind):
    def forward_kwargs(self) -> dict:
        return {"use_cache": False}

    def torch_output(self, model: Any, feed: dict[str, np.ndarray], pooling: str = "mean") -> np.ndarray:
        import torch

        from compress.runtime import position_ids

        ids, mask = torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])
        pos = torch.from_numpy(position_ids(feed["attention_mask"], ids.shape[1]))
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos, **self.forward_kwargs()).logits.float().numpy()

    def output_rows(self, out: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return out[mask.astype(bool)]  # one logit vector per real token

    def task_metrics(self, run: Any, tokenizer: Any, quick: bool = False) -> dict[str, float]:
        """Perplexity on the first 100 lee_background paragraphs (256 tokens each at most): real news
        text, never in the default (wiki) training data. Quick: the first 10 (`ppl_lee10`, named
        apart so it is never compared with the full number)."""
        from compress import evaluate
        from compress.data import lee_background

        if quick:
            return {"ppl_lee10": evaluate.perplexity(run, tokenizer, lee_background()[:evaluate.PPL_PARAGRAPHS_QUICK])}
        return {"ppl_lee": evaluate.perplexity(run, tokenizer, lee_background()[:evaluate.PPL_PARAGRAPHS])}

    def profile_prompt(self, tokenizer: Any, texts: Any, n: int) -> np.ndarray | None:
        from compress.profiling import prompt_ids

        return prompt_ids(tokenizer, texts, n)

    def export_onnx(self, state: Any, cfg: Any, ctx: Any) -> Any:
        from compress.exporters import onnx_export

        return onnx_export.export_tokens(state, cfg, ctx, cache=cfg.cache)

    def recognise_config(self, config: Any) -> int:
        archs = " ".join(getattr(config, "architectures", None) or [])
        decoder = not archs and getattr(config, "model_type", "") in DECODER_TYPES
        return YES if "ForCausalLM" in archs or decoder else NO

    def recognise_graph(self, inputs: list[str], outputs: list[tuple[str, tuple]]) -> int:
        return FALLBACK if outputs and len(outputs[0][1]) == 3 else NO


KIND = CausalLM(name="causal-lm", summary="decoder LLM: next-token logits; KV-cache export, generation timing",
                fidelity=Logits(per_token=True), storage=Transformers("AutoModelForCausalLM"),
                is_generative=True, cache_reference=False)
