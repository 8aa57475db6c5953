"""What each pruning axis buys on MiniLM, from ONE run on this machine: every row is a recipe that
ends with export.onnx + optimize.ort + quant.int8, timed interleaved against the plain ORT
dynamic-int8 MiniLM (legacy export + optimize_model + quantize_dynamic) in one process.

Rows (pick with --rows; names are the keys of ROWS): width only, depth only, depth + width, at
about 1.5x, 2x and 3x the plain int8 speed, distilled by prune.homodistil on the built-in `mix`
corpus (every real English corpus the installed packages ship; held-out split never trained on).
Columns: int8 latency ratio against plain ORT int8, held-out cosine on the training domain (mix)
and on an unseen domain (the Python language reference: no training sample came from it), Lee-50,
polarity, parameters, MB, training seconds. Every stage's report is under WORKDIR/<row>/report.md.

    python benchmarks/pruning_axes_minilm.py [--rows depth-2x,width-1.5x] [--steps 600] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

TAIL = ["export.onnx", "optimize.ort", "quant.int8"]


def rows(steps: int, max_length: int) -> dict[str, list]:
    train = {"pass": "prune.homodistil", "steps": steps, "max_length": max_length, "freeze_embeddings": True}
    return {
        "int8 (unpruned)": TAIL,
        "width-1.2x": [{**train, "heads": 0.5, "ffn": 0.5}, *TAIL],
        "depth-1.5x": [{**train, "layers": 0.34, "heads": 0, "ffn": 0}, *TAIL],
        "depth-2x": [{**train, "layers": 0.5, "heads": 0, "ffn": 0}, *TAIL],
        "depth+width-2x": [{**train, "layers": 0.34, "heads": 0.25, "ffn": 0.5}, *TAIL],
        "depth-3x": [{**train, "layers": 0.67, "heads": 0, "ffn": 0}, *TAIL],
        "depth+width-3x": [{**train, "layers": 0.5, "heads": 0.5, "ffn": 0.5}, *TAIL],
    }


def axis_latency(threads: int, runs: int) -> dict[str, float]:
    """int8 latency of MiniLM cut along one axis at a time (the model's own weights sliced to shape:
    values do not matter for timing), each over the unpruned int8 graph, timed interleaved."""
    import torch

    from compress import data, models
    from compress.passes.lib import budget, hidden, prunable

    model, tok, _ = models.load_hf(models.alias_path("minilm"))
    fam = prunable.family_of(model.config)
    shapes = {"unpruned": budget.Shape(0, 0, 0), "layers 0.5 (3 of 6)": budget.Shape(0.5, 0, 0),
              "heads 0.5": budget.Shape(0, 0.5, 0), "ffn 0.5": budget.Shape(0, 0, 0.5),
              "heads 0.5 + ffn 0.5": budget.Shape(0, 0.5, 0.5), "layers 0.5 + heads 0.5 + ffn 0.5": budget.Shape(0.5, 0.5, 0.5)}
    cands = {name: budget.sliced(model, fam, shape) for name, shape in shapes.items()}
    narrow = budget.sliced(model, fam, budget.Shape(0, 0, 0))
    hidden.slice_hidden(narrow, fam, torch.arange(192))  # timing only: an encoder's training refuses hidden
    cands["hidden 0.5 (384 -> 192)"] = narrow
    lat = budget.int8_latencies(cands, tok, data.load("mix").train, 128, threads, runs=runs)
    return {name: v / lat["unpruned"] for name, v in lat.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--max-length", type=int, default=128, help="training tokens per sample (evaluation uses 128)")
    ap.add_argument("--data", default="mix")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--axes-only", action="store_true", help="only the one-axis latency table (no training)")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from compress import Pipeline, data, evaluate, models
    from compress.profiling import LatencySettings, real_feed, time_interleaved
    from compress.runtime import OnnxRunner, TorchRunner
    from int8_vs_plain_ort import plain_ort_int8

    torch.set_num_threads(args.threads)
    axes = Table("cut (int8 ONNX, batch 1, seq 128)", "latency vs unpruned int8",
                 title="What each axis buys on its own (weights sliced to shape, timed interleaved)")
    for name, ratio in axis_latency(args.threads, args.runs).items():
        axes.add_row(name, f"{ratio:.2f}x")
    Console(width=170).print(axes)
    if args.axes_only:
        return {}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-axes-"))
    work.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    settings = LatencySettings(batch=1, seq=128, threads=args.threads, warmup=10, runs=args.runs)
    chosen = rows(args.steps, args.max_length)
    if args.rows:
        wanted = ["int8 (unpruned)", *args.rows.split(",")]
        chosen = {k: chosen[k] for k in wanted}
    reports = {}
    for name, passes in chosen.items():
        out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
        shutil.rmtree(out, ignore_errors=True)
        console.rule(name)
        reports[name] = (out, Pipeline(passes).run("minilm", args.data, outdir=out, latency=settings, console=console,
                                                   measure="off").report)  # the final models are measured below
    plain = plain_ort_int8(models.alias_path("minilm"), work)

    tok = models.load_tokenizer(models.alias_path("minilm"))
    text = data.load(args.data)
    feed = real_feed(tok, text.eval, 1, 128)
    calls = {}
    for name, (out, _) in reports.items():
        runner = OnnxRunner(out / "model.onnx", "encoder", threads=args.threads)
        inputs = runner.feed(feed)
        calls[name] = lambda r=runner, i=inputs: r.sess.run(None, i)
    plain_runner = OnnxRunner(plain, "encoder", threads=args.threads)
    plain_inputs = plain_runner.feed(feed)
    calls["plain ORT int8"] = lambda: plain_runner.sess.run(None, plain_inputs)
    lat = time_interleaved(calls, settings, rounds=10)

    teacher = TorchRunner(models.load_hf(models.alias_path("minilm"))[0], "encoder")
    unseen = data.unseen_domain()

    def quality(runner) -> dict:
        return {"cos": evaluate.fidelity("encoder", runner, teacher, tok, text.eval, 128)["cosine"],
                "cos_unseen": evaluate.fidelity("encoder", runner, teacher, tok, unseen, 128)["cosine"],
                "lee50": evaluate.lee50(runner, tok), "polarity": evaluate.polarity(runner, tok)}

    base = lat["plain ORT int8"]["p50"]
    table = Table("recipe", "params", "MB", "p50 ms", "vs plain int8", f"cos {args.data}", "cos unseen", "Lee-50",
                  "polarity", "train s", "tokens seen", title=f"MiniLM, every row + export + optimize.ort + quant.int8 "
                                                             f"({args.steps} steps at {args.max_length} tokens; batch 1, seq 128)")
    q = quality(plain_runner)
    table.add_row("plain ORT int8", "", f"{plain.stat().st_size / 1e6:.1f}", f"{base:.2f}", "1.00x", f"{q['cos']:.4f}",
                  f"{q['cos_unseen']:.4f}", f"{q['lee50']:.4f}", f"{q['polarity']:.3f}", "", "")
    result = {"plain ORT int8": {"p50": base, **q}}
    for name, (out, rep) in reports.items():
        train = next((s.get("pruning", {}).get("train", {}) for s in rep["stages"] if s["name"].startswith("prune")), {})
        torch_stage = [s for s in rep["stages"] if s["form"] == "torch"][-1]
        p50 = lat[name]["p50"]
        q = quality(OnnxRunner(out / "model.onnx", "encoder", threads=args.threads))
        mb = (out / "model.onnx").stat().st_size / 1e6
        result[name] = {"p50": p50, "ratio": base / p50, **q, "params": torch_stage["params"], "mb": mb,
                        "seconds": train.get("seconds", 0), "tokens_seen": train.get("tokens_seen", 0)}
        table.add_row(name, f"{torch_stage['params']:,}", f"{mb:.1f}", f"{p50:.2f}", f"{base / p50:.2f}x", f"{q['cos']:.4f}",
                      f"{q['cos_unseen']:.4f}", f"{q['lee50']:.4f}", f"{q['polarity']:.3f}", f"{train.get('seconds', 0):.0f}",
                      f"{train.get('tokens_seen', 0):,}")
    Console(width=170).print(table)
    return result


if __name__ == "__main__":
    main()
