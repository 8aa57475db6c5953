"""Text generation on onnxruntime with the KV-cache graph of export.onnx (cache=true).

One prompt step with an empty past (batch 1, kv_heads, 0, head_dim), then one token per step: the
graph's `present.{i}.key / .value` outputs are fed back as `past_key_values.{i}.key / .value`, the
attention mask grows by one column and the position is the count of tokens so far minus one.
Greedy decoding picks the argmax (the first on ties, as torch.argmax), so on an fp32 export it
reproduces transformers' `generate(do_sample=False)` token for token. Sampling divides the logits
by the temperature, keeps the top_k best and the smallest set reaching top_p of the probability,
and draws with a seeded numpy generator, so a seed gives the same text again.

Timing: time to first token (TTFT) is the prompt step plus the first pick; decode speed counts the
tokens after the first over the time of the steps that made them."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from compress import runtime
from compress.errors import UserError

CONTEXT_KEYS = ("max_position_embeddings", "n_positions")  # Llama/Qwen/Mistral..., GPT-2


@dataclass(frozen=True)
class GenerateResult:
    token_ids: list[int]  # the new tokens only, a stop token included when one ended the text
    text: str  # the new tokens decoded, special tokens skipped
    ttft_s: float  # prompt step + first token
    decode_tokens_per_s: float  # tokens after the first / their time (0.0 when only one was made)
    num_tokens: int
    prompt_tokens: int
    stop_reason: str  # "stop_token" or "max_new_tokens"


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut

    def check(self) -> None:
        """Sampling settings are checked when sampling (greedy ignores them)."""
        if not self.do_sample:
            return
        problems = []
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, 0 keeping every token (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if problems:
            raise UserError("; ".join(problems))


def sample_token(logits: np.ndarray, cfg: Sampling, rng: np.random.Generator) -> int:
    """One token id from (vocab,) logits. Top-p keeps each token whose more likely predecessors hold
    less than top_p: probs [0.5, 0.3, 0.2] at top_p 0.6 keep the first two."""
    if not cfg.do_sample:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    if 0 < cfg.top_k < z.size:
        z = np.where(z < np.partition(z, -cfg.top_k)[-cfg.top_k], -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
        probs[order[before >= cfg.top_p]] = 0.0
        probs /= probs.sum()
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))


def _open(session_or_path: Any, threads: int | None) -> tuple[Any, Path | None]:
    if isinstance(session_or_path, (str, Path)):
        path = Path(session_or_path)
        if not path.is_file():
            raise UserError(f"model not found: '{path}' is not a file; give the .onnx (or .ort) file export.onnx wrote")
        return runtime.session(path, threads), path
    return session_or_path, None


def _cache_specs(sess: Any) -> dict:
    specs = runtime.input_specs(sess)
    outputs = {o.name for o in sess.get_outputs()}
    if not any(runtime.is_past(name) for name in specs) or "logits" not in outputs:
        raise UserError("this graph has no KV cache (no past_key_values.* inputs / logits output), so it can't "
                        "generate step by step: re-export the model with export.onnx cache=true "
                        "(e.g. compress run MODEL --pass export.onnx:cache=true -o OUT)")
    return specs


def context_limit(path: Path | None, sess: Any, max_context: int | None) -> int | None:
    """The tightest of: config.json beside the graph, the graph's metadata (export.onnx records
    max_position_embeddings there), the caller's `max_context`. None when nothing says."""
    found = [max_context] if max_context else []
    config = path.parent / "config.json" if path is not None else None
    if config is not None and config.is_file():
        try:
            data = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {config}: {exc}") from None
        found += [int(data[k]) for k in CONTEXT_KEYS if isinstance(data.get(k), int)][:1]
    meta = sess.get_modelmeta().custom_metadata_map.get("max_position_embeddings")
    if meta and meta.isdigit():
        found.append(int(meta))
    return min(found) if found else None


def uses_chat(tokenizer: Any, chat: bool) -> bool:
    """Whether the prompt goes through the tokenizer's chat template (asked for, and the tokenizer has one)."""
    return bool(chat and getattr(tokenizer, "chat_template", None))


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool = False) -> np.ndarray:
    """Token ids of the prompt; with `chat`, as one user turn of the tokenizer's chat template, ending with the
    assistant's turn opened (an instruct model sent the bare text may answer with its end token at once)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"the prompt is empty (got {prompt!r}): give some text to continue")
    if uses_chat(tokenizer, chat):
        try:
            out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
        except Exception as exc:  # noqa: BLE001 - jinja's errors, or the template's own raise_exception
            raise UserError(f"the tokenizer's chat template failed on this prompt ({type(exc).__name__}: "
                            f"{str(exc)[:200]}): send the prompt as is (--raw, or chat=False)") from None
        ids = np.asarray(out["input_ids"] if hasattr(out, "keys") else out, dtype=np.int64).reshape(-1)
    else:
        ids = np.asarray(tokenizer(prompt)["input_ids"], dtype=np.int64)
    if ids.size == 0:
        raise UserError(f"the prompt {prompt!r} gives no tokens with this tokenizer: give other text")
    return ids[None]  # (1, prompt_tokens)


def _check_length(prompt_tokens: int, max_new_tokens: int, limit: int | None) -> None:
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise UserError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = "
                        f"{prompt_tokens + max_new_tokens} tokens is longer than the model's context of {limit}: "
                        f"shorten the prompt or ask for at most {max(limit - prompt_tokens, 0)} new tokens")


def _stops(tokenizer: Any, stop_tokens: Iterable[int] | None) -> set[int]:
    if stop_tokens is not None:
        return {int(t) for t in stop_tokens}
    eos = getattr(tokenizer, "eos_token_id", None)
    return set(eos) if isinstance(eos, (list, tuple)) else ({int(eos)} if eos is not None else set())


class CacheStepper:
    """Runs one graph step and keeps the presents as the next step's past."""

    def __init__(self, sess: Any, specs: dict):
        self.sess, self.specs = sess, specs
        self.outputs = [o.name for o in sess.get_outputs()]
        self.past: dict[str, np.ndarray] = {}

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        # positions: cumsum(mask) - 1 of the new columns; first step: an empty past as well
        feed = runtime.complete_feed({"input_ids": ids, "attention_mask": mask, **self.past}, self.specs)
        outs = dict(zip(self.outputs, self.sess.run(None, feed)))
        self.past = {runtime.past_name(n): v for n, v in outs.items() if n.startswith(runtime.PRESENT_PREFIX)}
        return outs["logits"][0, -1]  # (vocab,) of the last position


def decode_tokens(step: CacheStepper, ids: np.ndarray, max_new_tokens: int, pick: Callable[[np.ndarray], int],
                  stops: set[int]) -> tuple[list[int], float, float]:
    """(new tokens, TTFT seconds, seconds of the decode steps)."""
    mask = np.ones_like(ids)
    start = time.perf_counter()
    tokens = [pick(step(ids, mask))]
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    while tokens[-1] not in stops and len(tokens) < max_new_tokens:
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)  # (1, past + 1)
        tokens.append(pick(step(np.array([[tokens[-1]]], dtype=np.int64), mask)))
    return tokens, ttft, time.perf_counter() - start


def generate(session_or_path: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Iterable[int] | None = None, threads: int | None = None,
             max_context: int | None = None, chat: bool = True) -> GenerateResult:
    """Continue `prompt` with up to `max_new_tokens` tokens; stop early at a stop token (default: the
    tokenizer's eos; [] never stops early). `session_or_path`: an onnxruntime session or a graph file.
    `chat`: send the prompt as a user turn of the tokenizer's chat template when it has one (False: as is)."""
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    sampling.check()
    sess, path = _open(session_or_path, threads)
    specs = _cache_specs(sess)
    ids = _prompt_ids(tokenizer, prompt, chat)
    _check_length(ids.shape[1], max_new_tokens, context_limit(path, sess, max_context))
    stops, rng = _stops(tokenizer, stop_tokens), np.random.default_rng(seed)
    tokens, ttft, decode_s = decode_tokens(CacheStepper(sess, specs), ids, max_new_tokens,
                                     lambda logits: sample_token(logits, sampling, rng), stops)
    rate = (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0
    return GenerateResult(token_ids=tokens, text=tokenizer.decode(tokens, skip_special_tokens=True), ttft_s=ttft,
                          decode_tokens_per_s=rate, num_tokens=len(tokens), prompt_tokens=int(ids.shape[1]),
                          stop_reason="stop_token" if tokens[-1] in stops else "max_new_tokens")
