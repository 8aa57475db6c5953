"""Time finished ONNX models against a baseline, interleaved in one process (ratios, not absolute ms): to
re-measure models a benchmark already built, e.g. after a change to how sessions are timed.

    python benchmarks/retime.py BASELINE.onnx NAME=MODEL.onnx [NAME=MODEL.onnx ...] [--kind encoder]
        [--tokenizer minilm] [--data mix] [--seq 128] [--threads 2] [--runs 400] [--rounds 10]

Feed: one real held-out sample of DATA (filled to SEQ tokens), batch 1. Prints p50 ms and the baseline's p50
over each model's (the speed-up)."""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=Path)
    ap.add_argument("models", nargs="+", help="NAME=PATH of each model to time")
    ap.add_argument("--kind", default="encoder")
    ap.add_argument("--tokenizer", default="minilm", help="alias or folder")
    ap.add_argument("--data", default="mix")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from compress import data, models
    from compress.profiling import LatencySettings, text_feed, time_interleaved
    from compress.runtime import OnnxRunner

    tok = models.load_tokenizer(models.alias_path(args.tokenizer) if not Path(args.tokenizer).exists() else Path(args.tokenizer))
    feed = text_feed(tok, data.load(args.data).eval, 1, args.seq)
    named = [item.split("=", 1) for item in args.models]
    if any(len(pair) != 2 or pair[0] == "baseline" for pair in named):
        ap.error("models are NAME=PATH, and NAME may not be 'baseline'")
    paths = {"baseline": args.baseline, **{name: Path(path) for name, path in named}}
    calls = {}
    for name, path in paths.items():
        runner = OnnxRunner(path, args.kind, threads=args.threads)
        inputs = runner.feed(feed)
        calls[name] = lambda r=runner, x=inputs: r.sess.run(None, x)
    settings = LatencySettings(batch=1, seq=args.seq, threads=args.threads, warmup=10, runs=args.runs)
    lat = time_interleaved(calls, settings, rounds=args.rounds)
    base = lat["baseline"]["p50"]
    table = Table("model", "p50 ms", "p90 ms", "speed-up vs baseline", "latency ratio",
                  title=f"{args.threads} threads, batch 1, seq {args.seq}, {args.runs} runs in {args.rounds} interleaved rounds")
    for name, row in lat.items():
        table.add_row(name, f"{row['p50']:.2f}", f"{row['p90']:.2f}", f"{base / row['p50']:.2f}x", f"{row['p50'] / base:.3f}")
    Console(width=150).print(table)
    return lat


if __name__ == "__main__":
    main()
