"""Measuring one stage: parameters, bytes, fidelity against the teacher, task metrics, latency.

How much is measured is a level (`MeasureSettings`, `--measure`, `measure:` in a recipe):
- `full` (default): fidelity on every held-out sample (up to 128), the kind's task metrics on their
  whole sets (perplexity on 100 lee paragraphs, Lee-50 and polarity), latency as configured;
- `quick`: fidelity on the first 16 held-out samples, a causal LM's perplexity on 10 paragraphs
  (an encoder's Lee-50 / polarity need their whole sets: skipped), latency with 2 warm-up and 10
  timed runs and one generation run: a fidelity number per stage at a fraction of the cost;
- `off`: size and parameters only.
Encoders and classifiers (kinds whose teacher outputs are kept, `kind.cache_reference`) also get
fidelity on an unseen domain (`record["fidelity_unseen"]`, same keys as `record["fidelity"]`):
technical documentation no built-in training corpus holds (`compress.data.unseen_domain()`, the
Python language reference, 128 chunks), all of it at `full`, the first 16 at `quick`, none at `off`;
it applies whatever data the run trains on. Causal LMs skip it: their perplexity (lee_background
news) is already measured out of the training domain, and their logits are too large to keep.
The input stage's measurements (and the teacher's outputs, for kinds that keep them) are cached by
content hash (compress/refcache.py), so a second run on the same model and data reuses them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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

    if path.suffix != ".onnx":  # .ort / .pte: not readable as a graph (the pipeline keeps the previous count)
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


LEVELS = ("full", "quick", "off")


@dataclass(frozen=True)
class MeasureSettings:
    """What each stage's measurement costs; `MeasureSettings.of("quick")` gives a level's preset."""

    level: str = "full"
    eval_samples: int | None = None  # held-out samples for fidelity; None: all of them
    fidelity: bool = True
    tasks: str = "full"  # "full", "quick" (cheaper subsets where meaningful) or "off"
    latency: bool = True
    latency_runs: tuple[int, int, int] | None = None  # (warmup, runs, generate_runs) caps; None: as configured

    @classmethod
    def of(cls, level: str | MeasureSettings | None) -> MeasureSettings:
        from compress.errors import UserError

        if isinstance(level, MeasureSettings):
            return level
        level = level or "full"
        if level == "full":
            return cls()
        if level == "quick":
            return cls("quick", eval_samples=16, tasks="quick", latency_runs=(2, 10, 1))
        if level == "off":
            return cls("off", fidelity=False, tasks="off", latency=False)
        raise UserError(f"measure must be one of {', '.join(LEVELS)} (got {str(level)[:40]!r})")

    def eval_texts(self, data: Any) -> Any:
        """The held-out samples fidelity uses (texts, or an (N, 3, H, W) image array)."""
        if data is None:
            return []
        return data.eval if self.eval_samples is None else data.eval[: self.eval_samples]

    def unseen_texts(self) -> list[str]:
        """The unseen-domain samples fidelity is also measured on (data.unseen_domain(): all of them,
        or the first `eval_samples`); none when fidelity is off."""
        if not self.fidelity:
            return []
        from compress.data import unseen_domain

        texts = unseen_domain()
        return texts if self.eval_samples is None else texts[: self.eval_samples]

    def latency_settings(self, settings: profiling.LatencySettings | None) -> profiling.LatencySettings | None:
        if not self.latency or settings is None:
            return None
        if self.latency_runs is None:
            return settings
        warmup, runs, gen = self.latency_runs
        return replace(settings, warmup=min(settings.warmup, warmup), runs=min(settings.runs, runs),
                       generate_runs=min(settings.generate_runs, gen))

    def as_dict(self) -> dict:
        return {"level": self.level, "eval_samples": self.eval_samples, "fidelity": self.fidelity,
                "tasks": self.tasks, "latency": self.latency, "latency_runs": self.latency_runs}


def measures_unseen(state: ModelState) -> bool:
    """Whether stages of this model get fidelity on the unseen domain: text kinds whose teacher
    outputs are kept (encoder, classifier). Not causal LMs: their logits are too large to keep, and
    their perplexity on lee_background news already is measured out of the training domain."""
    return state.kind.cache_reference and state.kind.uses_tokenizer and state.tokenizer is not None


@dataclass
class Reference:
    """Teacher outputs on the held-out text, computed once (encoder / classifier), and on the unseen
    domain (`unseen`; None where not measured); a causal LM's logits are too large to keep, so its
    teacher runs again batch by batch (`kind.cache_reference`)."""

    outputs: Any = None
    teacher_runner: Any = None
    extra: dict = field(default_factory=dict)
    unseen: list[np.ndarray] | None = None

    @classmethod
    def build(cls, state: ModelState, max_length: int, ms: MeasureSettings | None = None) -> Reference:
        teacher = runtime.runner(state, "teacher")
        if not state.kind.cache_reference:
            return cls(teacher_runner=teacher)
        ms = ms or MeasureSettings()
        texts = ms.eval_texts(state.data)
        unseen = ms.unseen_texts() if measures_unseen(state) else []
        return cls(outputs=evaluate.outputs(teacher, state.tokenizer, texts, max_length, kind=state.kind),
                   unseen=evaluate.outputs(teacher, state.tokenizer, unseen, max_length, kind=state.kind)
                   if unseen else None)

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
    if state.form == "pte":
        return profiling.time_call(runtime.PteRunner(state.path, state.kind, threads=settings.threads).bound(feed), settings)
    sess = runtime.session(state.path, settings.threads)
    out = profiling.time_onnx(state.path, state.kind, feed, settings, sess=sess)
    ids = state.kind.profile_prompt(state.tokenizer, texts, settings.prompt_tokens)
    if ids is not None:
        gen = profiling.time_generation(state.path, ids, settings, sess=sess)
        out.update({k: gen[k] for k in ("ttft_ms", "tokens_per_s") if k in gen})
    return out


def measure(state: ModelState, ref: Reference, max_length: int, settings: profiling.LatencySettings | None,
            tasks: bool = True, step: Callable[[str], None] = lambda what: None,
            ms: MeasureSettings | None = None) -> dict:
    """`step(what)` is called as each part starts (the pipeline drives a progress bar with it)."""
    ms = ms or MeasureSettings()
    run = runtime.runner(state, threads=settings.threads if settings else None)
    if state.form == "torch":
        params, nbytes = torch_params(state.model), torch_bytes(state.model)
    else:
        params, nbytes = onnx_params(state.path), profiling.file_bytes(state.path)
    record = {"form": state.form, "params": params, "bytes": nbytes}
    texts = ms.eval_texts(state.data)
    if ms.fidelity and (state.tokenizer is not None or not state.kind.uses_tokenizer) and len(texts):
        step(f"fidelity on {len(texts)} held-out samples")
        record["fidelity"] = evaluate.fidelity(state.kind, run, ref.target(), state.tokenizer, texts, max_length)
    unseen = ms.unseen_texts() if ref.unseen is not None and measures_unseen(state) else []
    if unseen:  # the teacher's outputs on the same texts, with the same batching (Reference.build)
        step(f"fidelity on {len(unseen)} unseen-domain samples")
        record["fidelity_unseen"] = evaluate.fidelity(state.kind, run, ref.unseen, state.tokenizer, unseen, max_length)
    step("task metrics")
    quick = ms.tasks == "quick"
    record["metrics"] = evaluate.task_metrics(state.kind, run, state.tokenizer, quick=quick) if tasks and ms.tasks != "off" else {}
    step("latency")
    timing = ms.latency_settings(settings)
    record["latency_ms"] = latency(state, timing) if timing else None
    return record


MEASURE_STEPS = 4
