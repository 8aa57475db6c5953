"""Channel pruning of the pretrained EfficientNet-Lite0 (prune.structured through Torch-Pruning),
from ONE run on this machine: importance magnitude / taylor / random at --ratios of the channels,
one-shot, and taylor at --kd-ratio + distill.kd (--kd-steps of 16 of the 100 training images);
every recipe ends with export.onnx (parity-checked against PyTorch on held-out photos).

Columns: parameters; fp32 ONNX latency ratio against the unpruned export (batch 1, 224 x 224,
--threads threads, all models timed interleaved in one process); top-1 agreement with the unpruned
model and KL(teacher || model) on the 40 held-out images (4 photos x 10 crops, never calibrated or
trained on: compress/images.py); wall time of the pipeline. Each run's report is in WORKDIR/NAME/.
No ImageNet labels ship offline, so accuracy is measured as agreement with the unpruned model.

    python benchmarks/pruning_cnn.py [--ratios 0.1,0.25] [--kd-steps 60] [--kd-ratio 0.25] [--workdir /tmp/bench-cnn]

Measured (2026-11-26, `--ratios 0.1,0.25 --kd-steps 100 --kd-ratio 0.1 --kd-lr 3e-4`, 2 threads; round_to 8):
unpruned 7.66 ms; channels 0.1 (3,934,400 params) 1.05-1.07x, top-1 agreement magnitude 0.000 / taylor
0.600 / random 0.000; channels 0.25 (2,908,504) 1.29-1.32x, agreement 0 for all three; taylor 0.1 + 100
KD steps 0.675 (KL 0.413 -> 0.385, 154 s). Table and reading in README "Pruning a CNN".
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def recipes(ratios: list[float], kd_steps: int, kd_lr: float, kd_ratio: float) -> dict[str, list]:
    out: dict[str, list] = {"unpruned": ["export.onnx"]}
    for r in ratios:
        for imp in ("magnitude", "taylor", "random"):
            out[f"{imp} {r:g}"] = [{"pass": "prune.structured", "channels": r, "importance": imp}, "export.onnx"]
    if kd_steps:
        out[f"taylor {kd_ratio:g} + kd {kd_steps}"] = [
            {"pass": "prune.structured", "channels": kd_ratio, "importance": "taylor"},
            {"pass": "distill.kd", "steps": kd_steps, "batch_size": 16, "lr": kd_lr}, "export.onnx"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.1,0.25", help="fractions of channels removed, comma-separated")
    ap.add_argument("--kd-steps", type=int, default=60, help="distill.kd steps (batch 16) after taylor pruning (0: none)")
    ap.add_argument("--kd-ratio", type=float, default=0.25, help="the channel fraction pruned before distill.kd")
    ap.add_argument("--kd-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=100, help="timed runs per model (interleaved)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from compress import Pipeline, images
    from compress.profiling import LatencySettings, real_feed, time_interleaved
    from compress.runtime import session

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cnn-"))
    console = Console(stderr=True)
    data = images.load("photos")
    quick = LatencySettings(batch=1, seq=1, threads=args.threads, warmup=1, runs=3)
    rows: dict[str, dict] = {}
    for name, passes in recipes([float(r) for r in args.ratios.split(",")], args.kd_steps, args.kd_lr, args.kd_ratio).items():
        out = work / name.replace(" ", "_").replace("+", "")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        rep = Pipeline(passes).run("efficientnet-lite0", data, out, latency=quick, tasks=False, console=console).report
        final = rep["stages"][-1]
        rows[name] = {"params": final["params"], "top1": final["fidelity"]["top1"], "kl": final["fidelity"]["kl"],
                      "seconds": time.perf_counter() - t0, "onnx": out / "model.onnx"}
        console.print(f"{name}: top1 {rows[name]['top1']:.3f} kl {rows[name]['kl']:.3f}")

    feed = real_feed(None, data.eval, 1, 1)
    sessions = {n: session(r["onnx"], args.threads) for n, r in rows.items()}
    timing = time_interleaved({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()},
                              LatencySettings(batch=1, seq=1, threads=args.threads, warmup=10, runs=args.runs))
    base = timing["unpruned"]["p50"]

    table = Table(title=f"EfficientNet-Lite0 channel pruning ({len(data.eval)} held-out images, {args.threads} threads)")
    for col in ("method", "params", "ONNX p50 ms", "speed-up", "top-1 agreement", "KL", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, r in rows.items():
        p50 = timing[name]["p50"]
        r.update(p50_ms=p50, speedup=base / p50)
        table.add_row(name, f"{r['params']:,}", f"{p50:.2f}", f"{base / p50:.2f}x", f"{r['top1']:.3f}", f"{r['kl']:.3f}",
                      f"{r['seconds']:.0f}")
    Console().print(table)
    return {n: {k: v for k, v in r.items() if k != "onnx"} for n, r in rows.items()}


if __name__ == "__main__":
    main()
