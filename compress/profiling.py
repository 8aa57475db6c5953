"""Latency measurement, the same for every stage so the report can compare them.

Inputs are real text (held-out samples) tokenized and padded/truncated to exactly `seq` tokens,
`batch` rows. Threads are pinned (torch.set_num_threads / ORT intra_op_num_threads). After
`warmup` runs, `runs` timed runs give p50/p90/p99. `profile_file` adds throughput, peak memory (in a
fresh process, so the number is the model's own) and the top ops from ORT's profiler.

Causal-LM graphs with a KV cache also get generation speed: a prompt of `prompt_tokens` real
held-out tokens, then greedy steps through compress.generate's own loop (never stopping early) up to
`new_tokens` tokens; time to first token (TTFT) and decode tokens/s are medians over `generate_runs`
runs, and peak memory is that of a fresh process generating once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compress.errors import UserError, short
from compress.generate import CacheStepper, context_limit, decode_tokens  # generation timing runs the real loop
from compress.runtime import OnnxRunner, input_specs, is_past, session, tokenize


@dataclass(frozen=True)
class LatencySettings:
    batch: int = 1
    seq: int = 128
    threads: int = 2
    warmup: int = 10
    runs: int = 50
    prompt_tokens: int = 64  # causal-LM cache graphs: real prompt tokens of the time-to-first-token step
    new_tokens: int = 16  # greedy tokens per generation run; decode speed counts the 2nd to the last
    generate_runs: int = 3  # timed generation runs (median), after one untimed run when warmup > 0

    def __post_init__(self):
        """The bounds of the profile pass and `compress profile` (LIMITS); threads above what this
        machine can run (thread_cap) are cut to it: oversubscribed threads only wait for each other."""
        problems = check_limits(self.as_dict())
        if problems:
            raise UserError("latency settings: " + "; ".join(problems))
        object.__setattr__(self, "threads", min(self.threads, thread_cap()))

    def as_dict(self) -> dict:
        return asdict(self)


# Upper bounds of what a latency measurement may ask for (the profile pass's fields and `compress
# profile`'s options have the same): beyond them a run exhausts memory, or threads starve each other.
LIMITS = {"batch": 256, "seq": 8192, "threads": 256, "warmup": 1000, "runs": 100_000, "prompt_tokens": 32768,
          "new_tokens": 4096, "generate_runs": 1000}
MAX_TOKENS = 2**20  # batch x seq: one run's input (attention memory grows with batch x seq x seq)


def check_limits(values: dict) -> list[str]:
    """What is out of bounds in {setting: value} (LIMITS, at least 1 (warmup: 0), batch x seq)."""
    problems = []
    for key, value in values.items():
        if key not in LIMITS:
            continue
        low = 0 if key == "warmup" else 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= LIMITS[key]:
            problems.append(f"{key} must be a whole number from {low} to {LIMITS[key]} (got {short(value, 40)})")
    batch, seq = values.get("batch"), values.get("seq")
    if not problems and isinstance(batch, int) and isinstance(seq, int) and batch * seq > MAX_TOKENS:
        problems.append(f"batch x seq is {batch * seq:,} tokens, over the {MAX_TOKENS:,} one run may take: "
                        "lower batch or seq")
    return problems


def thread_cap() -> int:
    """The most intra-op threads worth running here: 4 per CPU core (more only wait for each other)."""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 4 * max(cores, 1)


def real_feed(tokenizer: Any, texts: list[str], batch: int, seq: int) -> dict[str, np.ndarray]:
    """`batch` real samples, each filled to `seq` tokens (texts are repeated when too short). Images
    ((N, 3, H, W) array): the first `batch` of them (repeated when fewer), `seq` unused. (The
    pipeline asks the model's kind: `kind.inputs.latency_feed`, which is one of the two below.)"""
    if isinstance(texts, np.ndarray):
        return image_feed(texts, batch)
    return text_feed(tokenizer, texts, batch, seq)


def image_feed(images: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """The first `batch` images ((N, 3, H, W) array), repeated when fewer, as pixel_values."""
    return {"pixel_values": np.ascontiguousarray(images[np.arange(batch) % len(images)], dtype=np.float32)}


def text_feed(tokenizer: Any, texts: list[str], batch: int, seq: int) -> dict[str, np.ndarray]:
    """`batch` real samples, each filled to `seq` tokens (texts are repeated when too short); random
    token ids without a tokenizer."""
    if tokenizer is None:
        ids = np.random.default_rng(0).integers(1000, 2000, size=(batch, seq), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    rows = []
    for i in range(batch):
        text = texts[i % len(texts)]
        rows.append(" ".join([text] * 8))  # long enough to truncate at seq
    return tokenize(tokenizer, rows, seq, pad_to_max=True)


def percentiles(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}


def time_call(fn: Callable[[], Any], settings: LatencySettings) -> dict[str, float]:
    for _ in range(settings.warmup):
        fn()
    times = []
    for _ in range(settings.runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def time_torch(model: Any, feed: dict[str, np.ndarray], settings: LatencySettings) -> dict[str, float]:
    import torch

    if "pixel_values" in feed:
        args, kwargs = (torch.from_numpy(feed["pixel_values"]),), {}
    else:
        args = ()
        kwargs = {"input_ids": torch.from_numpy(feed["input_ids"]), "attention_mask": torch.from_numpy(feed["attention_mask"])}
        config = getattr(model, "config", None)  # a plain module fed token ids has none
        if getattr(config, "is_decoder", False) or "CausalLM" in type(model).__name__:
            kwargs["use_cache"] = False
    prev = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.inference_mode():
            return time_call(lambda: model(*args, **kwargs), settings)
    finally:
        torch.set_num_threads(prev)


def time_onnx(path: Path, kind: Any, feed: dict[str, np.ndarray], settings: LatencySettings,
              sess: Any = None) -> dict[str, float]:
    run = OnnxRunner(path, kind, threads=settings.threads, sess=sess)
    sess, inputs = run.sess, run.feed(feed)
    return time_call(lambda: sess.run(None, inputs), settings)


def prompt_ids(tokenizer: Any, texts: list[str], n: int) -> np.ndarray:
    """(1, n) ids of real text: held-out samples joined (from the first again when they run out) and
    cut at n tokens, the tokenizer's special tokens included. Fewer only if the texts have fewer."""
    if tokenizer is None or not texts:
        return np.random.default_rng(0).integers(1000, 2000, size=(1, n), dtype=np.int64)
    chosen, words = [], 0
    for i in range(4 * n):  # a word is at least one token: n words are enough
        chosen.append(texts[i % len(texts)])
        words += len(chosen[-1].split())
        if words >= n:
            break
    ids = tokenizer(" ".join(chosen), truncation=True, max_length=n)["input_ids"]
    return np.asarray(ids, dtype=np.int64)[None]


def is_cache_graph(sess: Any) -> bool:
    """A causal-LM graph with past_key_values inputs and a logits output (export.onnx cache=true)."""
    return any(is_past(i.name) for i in sess.get_inputs()) and "logits" in {o.name for o in sess.get_outputs()}


def _greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def generate_once(sess: Any, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of one greedy run of compress.generate's loop from an empty
    cache; no stop token, so it always makes `new_tokens` tokens."""
    tokens, ttft, decode_s = decode_tokens(CacheStepper(sess, input_specs(sess)), ids, new_tokens, _greedy, set())
    return ttft, ((len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0)


def fit_prompt(sess: Any, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """The prompt cut so that prompt + new tokens fit the context the graph's metadata records."""
    limit = context_limit(None, sess, None)
    if limit is None or ids.shape[1] + new_tokens <= limit:
        return ids
    if limit - new_tokens < 1:
        raise UserError(f"new_tokens ({new_tokens}) leaves no room for a prompt in the model's context of {limit} "
                        f"tokens: ask for at most {limit - 1} new tokens")
    return ids[:, : limit - new_tokens]


def time_generation(path: Path, ids: np.ndarray, settings: LatencySettings, sess: Any = None) -> dict:
    """TTFT (ms) and decode tokens/s, medians over `generate_runs` greedy runs of `new_tokens` tokens
    on the (1, prompt) `ids`; {} for a graph without a KV cache."""
    sess = sess if sess is not None else session(path, settings.threads)
    if not is_cache_graph(sess):
        return {}
    ids = fit_prompt(sess, ids, settings.new_tokens)
    if settings.warmup:
        generate_once(sess, ids, settings.new_tokens)
    runs = [generate_once(sess, ids, settings.new_tokens) for _ in range(settings.generate_runs)]
    return {"ttft_ms": float(np.median([r[0] for r in runs]) * 1000.0),
            "tokens_per_s": float(np.median([r[1] for r in runs])),
            "prompt_tokens": int(ids.shape[1]), "new_tokens": settings.new_tokens, "runs": settings.generate_runs}


def top_ops(path: Path, feed_inputs: dict[str, np.ndarray], settings: LatencySettings, workdir: Path, n: int = 10) -> list[dict]:
    """Aggregate ORT profiler node events by op type: total ms per run and share of node time."""
    sess = session(path, settings.threads, profile_prefix=str(workdir / "ort_profile"))
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feed_inputs.items() if k in names}
    runs = max(5, settings.runs // 5)
    for _ in range(runs):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    per_op: dict[str, float] = defaultdict(float)
    for ev in json.loads(trace.read_text()):
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per_op[ev.get("args", {}).get("op_name", "?")] += ev.get("dur", 0) / 1000.0
    trace.unlink(missing_ok=True)
    total = sum(per_op.values()) or 1.0
    rows = sorted(per_op.items(), key=lambda kv: -kv[1])[:n]
    return [{"op": op, "ms": ms / runs, "share": ms / total} for op, ms in rows]


_HWM = """
def hwm():  # peak RSS of this process in MB; VmHWM restarts at exec (ru_maxrss would carry the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""
_PEAK_SCRIPT = "import json, sys, numpy as np, onnxruntime as ort" + _HWM + """
path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
feed = dict(np.load(sys.argv[4]))
base = hwm()
so = ort.SessionOptions(); so.intra_op_num_threads = threads
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
for _ in range(runs):
    s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})
print(json.dumps({"peak_rss_mb": hwm(), "model_mb": hwm() - base}))
"""
_PEAK_GENERATE_SCRIPT = "import json, sys, numpy as np, onnxruntime" + _HWM + """
from compress.profiling import generate_once
from compress.runtime import session
path, threads, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = np.load(sys.argv[4])["input_ids"]
base = hwm()
generate_once(session(path, threads), ids, new_tokens)
print(json.dumps({"peak_rss_mb": hwm(), "model_mb": hwm() - base}))
"""


def _peak(script: str, args: list[str], arrays: dict[str, np.ndarray], threads: int, workdir: Path) -> dict:
    """Run `script` in a fresh interpreter with the arrays saved to an .npz (its last argument)."""
    npz = Path(workdir) / "profile_feed.npz"
    np.savez(npz, **arrays)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        out = subprocess.run([sys.executable, "-c", script, *args, str(npz)], capture_output=True, text=True,
                             timeout=600, env=env, check=True)
    finally:
        npz.unlink(missing_ok=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_memory_mb(path: Path, feed_inputs: dict[str, np.ndarray], settings: LatencySettings, workdir: Path) -> dict:
    """Peak resident memory of a fresh process that loads the model and runs it a few times:
    the whole process, and the part above the interpreter + onnxruntime baseline."""
    return _peak(_PEAK_SCRIPT, [str(path), str(settings.threads), "5"], feed_inputs, settings.threads, workdir)


def peak_generation_memory_mb(path: Path, ids: np.ndarray, settings: LatencySettings, workdir: Path) -> dict:
    """The same for a cache graph generating once: the (1, prompt) `ids`, then `new_tokens` tokens
    (the cache at its longest, the logits of the whole prompt)."""
    return _peak(_PEAK_GENERATE_SCRIPT, [str(path), str(settings.threads), str(settings.new_tokens)],
                 {"input_ids": ids}, settings.threads, workdir)


def external_files(path: Path) -> list[Path]:
    """The external-data files an ONNX graph names in its initializers (none for .ort)."""
    import onnx

    if Path(path).suffix != ".onnx":
        return []
    model = onnx.load(str(path), load_external_data=False)
    names = {entry.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
             for entry in init.external_data if entry.key == "location"}
    return sorted(Path(path).parent / name for name in names)


def file_bytes(path: Path) -> int:
    """Bytes on disk of a model file or folder, external-data files included."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size + sum(p.stat().st_size for p in external_files(path) if p.is_file())


def profile_file(path: Path, kind: Any, feed: dict[str, np.ndarray], settings: LatencySettings, workdir: Path,
                 prompt: np.ndarray | None = None) -> dict:
    """Latency, throughput, peak memory, size and top ops; with a (1, prompt) `prompt` (the kind's
    `profile_prompt`) and a KV-cache graph also `generation`: TTFT, decode tokens/s and the peak
    memory of generating. `kind`: a ModelKind or its name."""
    run = OnnxRunner(path, kind, threads=settings.threads)
    inputs = run.feed(feed)
    latency = time_call(lambda: run.sess.run(None, inputs), settings)
    result = {
        "settings": settings.as_dict(),
        "latency_ms": latency,
        "throughput_per_s": settings.batch * 1000.0 / latency["p50"],
        **peak_memory_mb(path, inputs, settings, workdir),
        "bytes": file_bytes(path),
        "top_ops": top_ops(path, inputs, settings, workdir),
    }
    gen = time_generation(path, prompt, settings, run.sess) if prompt is not None else {}
    if gen:
        peak = peak_generation_memory_mb(path, prompt[:, : gen["prompt_tokens"]], settings, workdir)
        result["generation"] = {**gen, **peak}
    return result


def time_interleaved(fns: dict[str, Callable[[], Any]], settings: LatencySettings, rounds: int = 5) -> dict[str, dict]:
    """Time several candidates in alternating rounds, so background load on a shared machine
    hits all of them alike; percentiles over all rounds. Use for ratios in benchmarks."""
    for fn in fns.values():
        for _ in range(settings.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_round = max(1, settings.runs // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: percentiles(t) for name, t in times.items()}
