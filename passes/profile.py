"""profile: onnxruntime latency of the current model at a given batch, sequence length and thread
count (warm-up, then p50/p90/p99 over repeated runs on real text), throughput, peak memory of a
fresh process, file size and the top ops from ORT's profiler. Its settings are also the ones the
pipeline uses to time every stage, so the report compares like with like."""
from __future__ import annotations

from pydantic import Field

from compress.config import PassConfig
from compress.profiling import LatencySettings, profile_file, real_feed
from compress.registry import PassSpec
from compress.state import ModelState


class Profile(PassConfig):
    pass_name = "profile"
    batch: int = Field(1, ge=1, le=256, description="rows per run")
    seq: int = Field(128, ge=1, le=8192, description="tokens per row (real text, truncated / repeated to fit)")
    threads: int = Field(2, ge=1, le=256, description="intra-op threads (pinned)")
    warmup: int = Field(10, ge=0, le=1000, description="untimed runs first")
    runs: int = Field(50, ge=5, le=100000, description="timed runs for the percentiles")

    def latency_settings(self) -> LatencySettings:
        return LatencySettings(self.batch, self.seq, self.threads, self.warmup, self.runs)


def run(state: ModelState, cfg: Profile, ctx) -> ModelState:
    settings = cfg.latency_settings()
    feed = real_feed(state.tokenizer, state.data.eval if state.data else [], settings.batch, settings.seq)
    with ctx.console.status(f"profiling {state.path.name} (batch {cfg.batch}, seq {cfg.seq}, {cfg.threads} threads)"):
        ctx.notes["profile"] = profile_file(state.path, state.kind, feed, settings, ctx.workdir)
    return state


PASS = PassSpec(name="profile", config=Profile, run=run, takes=("onnx", "ort"), gives=None, changes_model=False,
                summary="Latency p50/p90/p99, throughput, peak memory, size and top ops with onnxruntime.")
