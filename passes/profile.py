"""profile: onnxruntime latency of the current model at a given batch, sequence length and thread
count (warm-up, then p50/p90/p99 over repeated runs on real text), throughput, peak memory of a
fresh process, file size and the top ops from ORT's profiler. For a causal LM with a KV cache also
generation: time to first token for a prompt of `prompt_tokens` real tokens, decode tokens/s over
`new_tokens` greedy steps (medians of `generate_runs`) and the peak memory of a fresh process that
generates. Its settings are also the ones the pipeline uses to time every stage, so the report
compares like with like."""
from __future__ import annotations

from pydantic import Field, model_validator

from compress.config import PassConfig
from compress.context import PassContext
from compress.profiling import LIMITS, LatencySettings, check_limits, profile_file
from compress.registry import ALL_KINDS, PassSpec
from compress.report import DASH, fmt, is_num, mb, md_table, stage_label
from compress.state import ModelState


class Profile(PassConfig):
    pass_name = "profile"
    batch: int = Field(1, ge=1, le=LIMITS["batch"], description="rows per run (batch x seq at most 2**20 tokens)")
    seq: int = Field(128, ge=1, le=LIMITS["seq"], description="tokens per row (real text, truncated / repeated to fit)")
    threads: int = Field(2, ge=1, le=LIMITS["threads"], description="intra-op threads (pinned; at most 4 per CPU core are used)")
    warmup: int = Field(10, ge=0, le=LIMITS["warmup"], description="untimed runs first")
    runs: int = Field(50, ge=5, le=LIMITS["runs"], description="timed runs for the percentiles")
    prompt_tokens: int = Field(64, ge=1, le=LIMITS["prompt_tokens"], description=(
        "causal LMs with a KV cache: real held-out tokens in the prompt whose time to first token is measured"))
    new_tokens: int = Field(32, ge=2, le=LIMITS["new_tokens"], description=(
        "causal LMs with a KV cache: greedy tokens per generation run (decode tokens/s over the 2nd to the last)"))
    generate_runs: int = Field(3, ge=1, le=LIMITS["generate_runs"], description="causal LMs with a KV cache: timed generation runs (median)")

    @model_validator(mode="after")
    def _tokens_per_run(self) -> "Profile":
        problems = check_limits({"batch": self.batch, "seq": self.seq})
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def latency_settings(self) -> LatencySettings:
        return LatencySettings(self.batch, self.seq, self.threads, self.warmup, self.runs, self.prompt_tokens,
                               self.new_tokens, self.generate_runs)


def run(state: ModelState, cfg: Profile, ctx: PassContext) -> ModelState:
    settings = cfg.latency_settings()
    texts = state.data.eval if state.data else []
    feed = state.kind.inputs.latency_feed(state.tokenizer, texts, settings.batch, settings.seq)
    prompt = state.kind.profile_prompt(state.tokenizer, texts, settings.prompt_tokens)  # causal LMs: generation timing
    with ctx.console.status(f"profiling {state.path.name} (batch {cfg.batch}, seq {cfg.seq}, {cfg.threads} threads)"):
        ctx.notes["profile"] = profile_file(state.path, state.kind, feed, settings, ctx.workdir, prompt=prompt)
    return state


def _report(stage: dict) -> list[str]:
    """report.md's section for the `profile` note: throughput, peak memory, generation, top ops."""
    prof = stage.get("profile") or {}
    if not prof:
        return []
    lines = [f"## Profile: {stage_label(stage)}", "",
             f"- Throughput: {fmt(prof.get('throughput_per_s'), ',.1f')} samples/s",
             f"- Peak memory (RSS of a fresh process): {fmt(prof.get('peak_rss_mb'), ',.1f')} MB, "
             f"of which {fmt(prof.get('model_mb'), ',.1f')} MB above the onnxruntime baseline (model + buffers)"]
    if "bytes" in prof:
        lines.append(f"- Model size: {fmt(mb(prof.get('bytes')), '.1f')} MB")
    gen = prof.get("generation") or {}
    if gen:
        lines += [f"- Generation (prompt {fmt(gen.get('prompt_tokens'), 'd')} tokens, {fmt(gen.get('new_tokens'), 'd')} new, "
                  f"median of {fmt(gen.get('runs'), 'd')} runs): time to first token {fmt(gen.get('ttft_ms'), ',.1f')} ms, "
                  f"decode {fmt(gen.get('tokens_per_s'), ',.1f')} tokens/s",
                  f"- Peak memory while generating (fresh process): {fmt(gen.get('peak_rss_mb'), ',.1f')} MB, "
                  f"of which {fmt(gen.get('model_mb'), ',.1f')} MB above the baseline"]
    ops = prof.get("top_ops") or []
    if ops:
        rows = [[str(op.get("op", DASH)), fmt(op.get("ms"), ".2f"),
                 DASH if not is_num(op.get("share")) else f"{op['share'] * 100:.1f}%"] for op in ops]
        lines += ["", *md_table(["op", "ms", "share"], rows, left=("op",))]
    return lines + [""]


PASS = PassSpec(name="profile", config=Profile, run=run, takes=("onnx", "ort"), gives=None, changes_model=False, kinds=ALL_KINDS,
                report=_report, summary="Latency p50/p90/p99, throughput, peak memory, size, top ops; TTFT and tokens/s for LLMs (onnxruntime).")
