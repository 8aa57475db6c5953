"""Structured pruning of MiniLM, heads 0.5 and FFN 0.5, from ONE run on this machine:
(a) prune.homodistil, (b) one-shot magnitude pruning + distill.kd with the same steps,
(c) one-shot magnitude pruning, no training; each then exported, fused and quantized to int8
in the same recipe (every stage is in its report under WORKDIR/<name>/report.md).

Prints params, fp32-ONNX latency ratio against the unpruned export, Lee-50, polarity, held-out
cosine and wall time per method, then the int8 models against the plain ORT dynamic-int8 MiniLM
(legacy export + optimize_model + quantize_dynamic), latencies timed interleaved in one process.

    python benchmarks/pruning_minilm.py [--steps 600] [--lr 3e-4] [--max-length 64] [--workdir /tmp/bench-prune]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

TAIL = ["export.onnx", "optimize.ort", "quant.int8"]


def recipes(steps: int, lr: float, max_length: int) -> dict[str, list]:
    train = {"steps": steps, "lr": lr, "max_length": max_length}
    one_shot = {"pass": "prune.structured", "heads": 0.5, "ffn": 0.5, "importance": "magnitude"}
    return {
        "teacher": TAIL,
        "(a) homodistil": [{"pass": "prune.homodistil", "heads": 0.5, "ffn": 0.5, **train}, *TAIL],
        "(b) one-shot + kd": [one_shot, {"pass": "distill.kd", **train}, *TAIL],
        "(c) one-shot": [one_shot, *TAIL],
    }


def _outdir(work: Path, name: str) -> Path:
    """'(a) homodistil' -> WORKDIR/a, 'teacher' -> WORKDIR/teacher."""
    return work / name.split()[0].strip("()")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=64, help="training tokens per sample (evaluation uses 128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from compress import Pipeline, data, evaluate, models
    from compress.profiling import LatencySettings, real_feed, time_interleaved
    from compress.runtime import OnnxRunner, TorchRunner
    from int8_vs_plain_ort import plain_ort_int8

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prune-"))
    console = Console(stderr=True)
    settings = LatencySettings(batch=1, seq=128, threads=args.threads, warmup=10, runs=args.runs)
    reports = {}
    for name, passes in recipes(args.steps, args.lr, args.max_length).items():
        out = _outdir(work, name)
        shutil.rmtree(out, ignore_errors=True)
        console.rule(name)
        reports[name] = Pipeline(passes).run("minilm", outdir=out, latency=settings, console=console).report
    plain = plain_ort_int8(models.alias_path("minilm"), work)

    tok = models.load_tokenizer(models.alias_path("minilm"))
    feed = real_feed(tok, data.load("wiki").eval, 1, 128)
    calls = {}
    for name, rep in reports.items():
        base = _outdir(work, name)
        for label, stage_name in (("fp32", "optimize.ort"), ("int8", "quant.int8")):
            stage = next(s for s in rep["stages"] if s["name"] == stage_name)
            path = base / "stages" / f"{stage['index']:02d}-{stage_name}" / "model.onnx"
            runner = OnnxRunner(path, "encoder", threads=args.threads)
            inputs = runner.feed(feed)
            calls[f"{name} {label}"] = (lambda r=runner, i=inputs: r.sess.run(None, i))
    plain_runner = OnnxRunner(plain, "encoder", threads=args.threads)
    plain_inputs = plain_runner.feed(feed)
    calls["plain ORT int8"] = lambda: plain_runner.sess.run(None, plain_inputs)
    lat = time_interleaved(calls, settings, rounds=10)

    t_stage = reports["teacher"]["stages"][0]
    table = Table("method", "params", "fp32 ONNX speed-up", "Lee-50", "% of teacher", "polarity", "% of teacher",
                  "held-out cos", "train+prune s", title=f"MiniLM heads 0.5 + FFN 0.5, {args.steps} steps (torch models)")
    rows = {}
    for name, rep in reports.items():
        torch_stage = [s for s in rep["stages"] if s["form"] == "torch"][-1]
        seconds = sum(s["seconds"] for s in rep["stages"] if s["name"].startswith(("prune", "distill")))
        speed = lat["teacher fp32"]["p50"] / lat[f"{name} fp32"]["p50"]
        m, tm = torch_stage["metrics"], t_stage["metrics"]
        rows[name] = {"params": torch_stage["params"], "fp32_speedup": speed, **m, "cosine": torch_stage["fidelity"]["cosine"],
                      "seconds": seconds}
        table.add_row(name, f"{torch_stage['params']:,}", f"{speed:.2f}x", f"{m['lee50']:.4f}", f"{m['lee50'] / tm['lee50']:.1%}",
                      f"{m['polarity']:.3f}", f"{m['polarity'] / tm['polarity']:.1%}", f"{torch_stage['fidelity']['cosine']:.4f}",
                      f"{seconds:.0f}")
    out = Console(width=170)
    out.print(table)

    q = Table("int8 model", "p50 ms", "speed vs plain ORT int8", "MB", "Lee-50", "polarity", "held-out cos",
              title="after export.onnx + optimize.ort + quant.int8 (batch 1, seq 128, interleaved)")
    base = lat["plain ORT int8"]["p50"]
    teacher, _, _ = models.load_hf(models.alias_path("minilm"))
    texts = data.load("wiki").eval
    fid = evaluate.fidelity("encoder", plain_runner, TorchRunner(teacher, "encoder"), tok, texts, 128)
    q.add_row("plain ORT int8 (unpruned)", f"{base:.2f}", "1.00x", f"{plain.stat().st_size / 1e6:.1f}",
              f"{evaluate.lee50(plain_runner, tok):.4f}", f"{evaluate.polarity(plain_runner, tok):.3f}", f"{fid['cosine']:.4f}")
    for name, rep in reports.items():
        final = rep["stages"][-1]
        p50 = lat[f"{name} int8"]["p50"]
        q.add_row(name, f"{p50:.2f}", f"{base / p50:.2f}x", f"{final['bytes'] / 1e6:.1f}", f"{final['metrics']['lee50']:.4f}",
                  f"{final['metrics']['polarity']:.3f}", f"{final['fidelity']['cosine']:.4f}")
    out.print(q)
    return {"rows": rows, "latency": lat}


if __name__ == "__main__":
    main()
