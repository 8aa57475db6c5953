"""SmolLM2-135M under onnxruntime-genai, from ONE run on this machine (issue 17): onnxruntime-genai's own model
builder against compress, each model run by both runtimes.

Models:
  builder fp32 / int4   `python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu` on the same weights (saved
                        as a transformers folder first): GroupQueryAttention with rotary inside over a shared KV
                        buffer, skip-norms, fused q/k/v; int4: symmetric blocks of 32, accuracy level 4, the tied
                        embedding / lm_head 4-bit and shared
  compress fp32 / int4 edge   compress's own KV-cache graph (export.onnx), and quant.int4 edge on it (block offsets,
                        8-bit lm_head, 4-bit embeddings shared with it: benchmarks/smollm2_edge.py's best)
  builder graph + ...   export.onnx exporter=genai (the builder's graph, checked against transformers by compress),
                        then compress's quant.int4: its defaults; edge; and "tied 4-bit" (block offsets, the tied
                        matrix 4-bit and stored once, as the builder's)
  builder graph + AWQ / GPTQ   quant.weight_only (Neural Compressor, symmetric blocks of 32, 32 windows of 128 wiki
                        training tokens) before export.onnx exporter=genai, then quant.int4 writing those codes with the
                        tied matrix 4-bit and shared: the builder's own format and kernels, calibrated codes;
                        GPTQ-MSE / MSE: compress's own (passes/lib/gptq.py: block scales searched for the least
                        activation-weighted error, GPTQ onto them), the tied lm_head / embedding rounded too
Columns: MB on disk; perplexity on the first 40 lee_background paragraphs (256 tokens at most each); time to first
token for a real 64-token prompt (wiki held-out) and decode tokens/s over 64 greedy new tokens, in onnxruntime
(compress.generate's loop; sessions alternate, medians over rounds; compress's sessions do not spin) and in
onnxruntime-genai (one model loaded at a time, as its threads spin while idle and the runtime has no switch for it:
each round loads, warms up and times each model in turn; so the two runtimes' columns are not on the same terms);
peak RSS of a fresh process generating once with onnxruntime. Threads pinned (default 2).

    python benchmarks/smollm2_genai.py [--threads 2] [--rounds 5] [--new-tokens 64] [--workdir DIR] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

GENAI = {"pass": "export.onnx", "exporter": "genai"}
INT4 = {"pass": "quant.int4", "block_size": 32}
EDGE = {**INT4, "block_offsets": True, "lm_head_bits": 8, "embeddings": True}
TIED4 = {**INT4, "block_offsets": True, "lm_head_bits": 4, "embeddings": True}
SHARED4 = {**INT4, "lm_head_bits": 4, "embeddings": True}  # the builder's int4 format: symmetric, tied matrix 4-bit once


def calibrated(method: str) -> dict:
    """quant.weight_only, symmetric (MatMulNBits' fast kernel has no zero points), on wiki training windows."""
    own = {"lm_head": True} if method in ("mse", "gptq-mse") else {}  # compress's own: the tied matrix rounded too
    return {"pass": "quant.weight_only", "method": method, "symmetric": True, "samples": 32, "max_length": 128, **own}


def builder_model(hf: Path, out: Path, precision: str) -> float:
    """onnxruntime-genai's builder with its defaults for the CPU; the cache's head size made a number (the
    builder leaves it symbolic; compress's runtime needs it: same graph). Returns the build seconds."""
    import onnx

    from compress.exporters import genai_builder

    t0 = time.perf_counter()
    genai_builder.build(hf, out, precision)
    seconds = time.perf_counter() - t0
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    config = json.loads((out / "genai_config.json").read_text())
    genai_builder.fixed_head_size(graph, config["model"]["decoder"]["head_size"])
    onnx.save(graph, str(out / "model.onnx"))  # the weights stay in model.onnx.data
    return seconds


def build(work: Path, threads: int, reuse: bool, methods: list[str]) -> tuple[dict[str, Path], dict[str, float]]:
    """name -> model folder (each holds model.onnx and genai_config.json), and build seconds."""
    from rich.console import Console

    from compress import Pipeline, data
    from compress.models import load_hf, resolve
    from compress.profiling import LatencySettings

    data_file = work / "data.txt"  # wiki *train* paragraphs: parity / fidelity / calibration never see held-out text
    data_file.write_text("\n".join(data.load("wiki").train[:40]) + "\n")
    settings = LatencySettings(batch=1, seq=64, threads=threads, warmup=1, runs=3, new_tokens=8, generate_runs=1)
    console = Console(stderr=True, width=160)
    seconds: dict[str, float] = {}
    hf = work / "hf"
    if not (reuse and (hf / "config.json").is_file()):
        model, tok, _ = load_hf(resolve("smollm2"))
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    for precision in ("fp32", "int4"):
        out = work / f"builder-{precision}"
        if not (reuse and (out / "model.onnx").is_file()):
            seconds[f"builder {precision}"] = builder_model(hf, out, precision)
    ours_fp32 = work / "compress-fp32"
    genai_fp32 = work / "genai-fp32"
    runs = {"compress-fp32": (str(hf), ["export.onnx"], None), "genai-fp32": (str(hf), [GENAI], None),
            "compress-edge": (ours_fp32 / "model.onnx", [EDGE], ours_fp32),
            "genai-int4": (genai_fp32 / "model.onnx", [INT4], genai_fp32),
            "genai-edge": (genai_fp32 / "model.onnx", [EDGE], genai_fp32),
            "genai-tied4": (genai_fp32 / "model.onnx", [TIED4], genai_fp32),
            **{f"genai-{m}": (str(hf), [calibrated(m), GENAI, SHARED4], None) for m in methods}}
    for name, (model, passes, tokenizer) in runs.items():
        out = work / name
        if reuse and (out / "model.onnx").is_file():
            continue
        t0 = time.perf_counter()
        Pipeline(passes).run(str(model), str(data_file), out, overwrite=True, tasks=False, max_length=64,
                             latency=settings, tokenizer=str(tokenizer) if tokenizer else None, console=console)
        seconds[name] = time.perf_counter() - t0
        console.print(f"[dim]{name}: {seconds[name]:.0f} s[/dim]")
    names = {"builder fp32": "builder-fp32", "builder int4": "builder-int4", "compress fp32": "compress-fp32",
             "compress int4 edge": "compress-edge", "builder graph fp32 (ours)": "genai-fp32",
             "builder graph + int4 (ours)": "genai-int4", "builder graph + int4 edge (ours)": "genai-edge",
             "builder graph + int4 tied 4-bit (ours)": "genai-tied4",
             **{f"builder graph + {m.upper()} sym int4 (ours)": f"genai-{m}" for m in methods}}
    return {label: work / folder for label, folder in names.items()}, seconds


def ort_speed(folders: dict[str, Path], ids, threads: int, new_tokens: int, rounds: int) -> dict[str, dict]:
    """smollm2_edge's timing: compress.generate's loop, one untimed run each, then rounds of one run per model."""
    from smollm2_edge import speed

    return speed({name: folder / "model.onnx" for name, folder in folders.items()}, ids, threads, new_tokens, rounds)


def genai_speed(folders: dict[str, Path], ids, threads: int, new_tokens: int, rounds: int) -> dict[str, dict]:
    import gc

    import numpy as np

    from compress.exporters import genai

    runs: dict[str, list] = {name: [] for name in folders}
    for _ in range(rounds):
        for name, folder in folders.items():
            model = genai.load(folder, threads)
            genai.generate_once(model, ids, new_tokens)  # warm-up
            runs[name].append(genai.generate_once(model, ids, new_tokens))
            del model
            gc.collect()
    return {name: {"og_ttft_ms": float(np.median([r[0] for r in rs]) * 1000),
                   "og_tokens_per_s": float(np.median([r[1] for r in rs]))} for name, rs in runs.items()}


def perplexity(folders: dict[str, Path], tok, threads: int, paragraphs: int) -> dict[str, float]:
    from compress import data, evaluate, runtime

    lee = data.lee_background()[:paragraphs]
    return {name: evaluate.perplexity(runtime.OnnxRunner(folder / "model.onnx", "causal-lm", threads=threads), tok, lee)
            for name, folder in folders.items()}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppl-paragraphs", type=int, default=40)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep models already built in --workdir")
    ap.add_argument("--calibrated", default="awq", help="comma-separated quant.weight_only methods for the calibrated "
                                                         "rows (awq, gptq, rtn; '' for none): 15-20 min each here")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from compress import data, profiling

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-genai-"))
    work.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.calibrated.split(",") if m]
    folders, seconds = build(work, args.threads, args.reuse, methods)
    tok = AutoTokenizer.from_pretrained(work / "hf")
    ids = profiling.prompt_ids(tok, data.load("wiki").eval, args.prompt_tokens)
    ort = ort_speed(folders, ids, args.threads, args.new_tokens, args.rounds)
    og = genai_speed(folders, ids, args.threads, args.new_tokens, args.rounds)
    ppl = perplexity(folders, tok, args.threads, args.ppl_paragraphs)
    peak = profiling.LatencySettings(threads=args.threads, new_tokens=args.new_tokens)
    rows = {name: {"bytes": profiling.file_bytes(folder / "model.onnx"), "ppl_lee": ppl[name], **ort[name], **og[name],
                   **profiling.peak_generation_memory_mb(folder / "model.onnx", ids, peak, work),
                   "build_s": seconds.get(name)} for name, folder in folders.items()}
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    table = Table("model", "MB", f"ppl lee {args.ppl_paragraphs}", "ORT TTFT ms", "ORT tok/s", "genai TTFT ms",
                  "genai tok/s", "peak MB",
                  title=f"SmolLM2-135M, CPU, {args.threads} threads: prompt {args.prompt_tokens} tokens, "
                        f"{args.new_tokens} new tokens, medians of {args.rounds} rounds")
    for name, r in rows.items():
        table.add_row(name, f"{r['bytes'] / 1e6:.1f}", f"{r['ppl_lee']:.2f}", f"{r['ttft_ms']:.1f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['og_ttft_ms']:.1f}", f"{r['og_tokens_per_s']:.1f}",
                      f"{r['peak_rss_mb']:.0f}")
    console = Console(width=170)
    console.print(table)
    theirs = rows["builder int4"]
    for name in [n for n in rows if n.startswith("builder graph +")]:
        r = rows[name]
        ok = (r["og_tokens_per_s"] >= theirs["og_tokens_per_s"] and r["ppl_lee"] < theirs["ppl_lee"]
              and r["bytes"] <= theirs["bytes"])
        console.print(f"  goal, {name} vs builder int4 under onnxruntime-genai: {r['og_tokens_per_s']:.1f} vs "
                      f"{theirs['og_tokens_per_s']:.1f} tok/s, ppl {r['ppl_lee']:.2f} vs {theirs['ppl_lee']:.2f}, "
                      f"{r['bytes'] / 1e6:.1f} vs {theirs['bytes'] / 1e6:.1f} MB: "
                      f"{'[green]met[/green]' if ok else '[red]not met[/red]'}")
    return rows


if __name__ == "__main__":
    main()
