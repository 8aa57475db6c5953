"""Measuring one stage: parameters, bytes, fidelity against the teacher, task metrics, latency."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compress import evaluate, profiling, runtime
from compress.state import ModelState

QUANT_BOOKKEEPING = ("_scale", "_zero_point", "_scales", "_zero_points", "_offsets", "_block_sums")  # quant.int4 offsets


def torch_params(model: Any) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def torch_bytes(model: Any) -> int:
    """Bytes of the weights as safetensors would store them (tied tensors once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def onnx_params(path: Path) -> int | None:
    """Logical parameter count of an ONNX graph: quantization scales / zero points are not
    parameters, and a MatMulNBits weight counts K*N however it is packed."""
    import onnx

    if path.suffix == ".ort":
        return None
    model = onnx.load(str(path), load_external_data=False)
    packed: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            packed[node.input[1]] = attrs["K"] * attrs["N"]
    total = 0
    for init in model.graph.initializer:
        if init.name in packed:
            total += packed[init.name]
        elif not init.name.endswith(QUANT_BOOKKEEPING):
            total += int(np.prod(init.dims)) if init.dims else 1
    return total


@dataclass
class Reference:
    """Teacher outputs on the held-out text, computed once (encoder / classifier); a causal LM's
    logits are too large to keep, so its teacher runs again batch by batch (`kind.cache_reference`)."""

    outputs: Any = None
    teacher_runner: Any = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, state: ModelState, max_length: int) -> "Reference":
        teacher = runtime.runner(state, "teacher")
        if not state.kind.cache_reference:
            return cls(teacher_runner=teacher)
        return cls(outputs=evaluate.outputs(teacher, state.tokenizer, state.data.eval, max_length, kind=state.kind))

    def target(self) -> Any:
        return self.teacher_runner if self.outputs is None else self.outputs


def latency(state: ModelState, settings: profiling.LatencySettings) -> dict[str, float]:
    """Forward-pass percentiles (ms) of one (batch, seq) run; a causal-LM ONNX graph with a KV cache
    adds `ttft_ms` and `tokens_per_s` of greedy generation (prompt_tokens real tokens, new_tokens)
    when its kind gives a prompt (`kind.profile_prompt`)."""
    texts = state.data.eval if state.data is not None else []
    feed = state.kind.inputs.latency_feed(state.tokenizer, texts, settings.batch, settings.seq)
    if state.form == "torch":
        return profiling.time_torch(state.model, feed, settings)
    sess = runtime.session(state.path, settings.threads)
    out = profiling.time_onnx(state.path, state.kind, feed, settings, sess=sess)
    ids = state.kind.profile_prompt(state.tokenizer, texts, settings.prompt_tokens)
    if ids is not None:
        gen = profiling.time_generation(state.path, ids, settings, sess=sess)
        out.update({k: gen[k] for k in ("ttft_ms", "tokens_per_s") if k in gen})
    return out


def measure(state: ModelState, ref: Reference, max_length: int, settings: profiling.LatencySettings | None,
            tasks: bool = True, step: Callable[[str], None] = lambda what: None) -> dict:
    """`step(what)` is called as each part starts (the pipeline drives a progress bar with it)."""
    run = runtime.runner(state, threads=settings.threads if settings else None)
    if state.form == "torch":
        params, nbytes = torch_params(state.model), torch_bytes(state.model)
    else:
        params, nbytes = onnx_params(state.path), profiling.file_bytes(state.path)
    record = {"form": state.form, "params": params, "bytes": nbytes}
    if (state.tokenizer is not None or not state.kind.uses_tokenizer) and state.data is not None:
        step(f"fidelity on {len(state.data.eval)} held-out samples")
        record["fidelity"] = evaluate.fidelity(state.kind, run, ref.target(), state.tokenizer, state.data.eval, max_length)
    step("task metrics (Lee-50, polarity)")
    record["metrics"] = evaluate.task_metrics(state.kind, run, state.tokenizer) if tasks else {}
    step("latency")
    record["latency_ms"] = latency(state, settings) if settings else None
    return record


MEASURE_STEPS = 3
