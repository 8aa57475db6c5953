"""MiniLM and EfficientNet-Lite0 on the runtimes apps ship them with, from ONE run on this machine (issue 18):
onnxruntime CPU (the desktop / ORT Mobile kernels), onnxruntime's XNNPACK execution provider when the installed
wheel has it, and ExecuTorch with the XNNPACK delegate; fp32 and int8 each.

Rows, every one a compress Pipeline from the original model:
  ORT CPU fp32     MiniLM: export.onnx + optimize.ort; EfficientNet: export.onnx
  ORT CPU int8     MiniLM: + quant.int8 (dynamic, per channel: the default recipe); EfficientNet: export.onnx +
                   quant.int8 static (QDQ calibrated on the training photos): the baseline of the ratios
  ORT XNNPACK      the int8 / fp32 graphs under the XNNPACK EP (only when onnxruntime has it; the PyPI wheel does not)
  ExecuTorch fp32  export.executorch (torch.export + XNNPACK partitioner)
  ExecuTorch int8  export.executorch quantize=int8 (PT2E XNNPACK quantizer, calibrated on training samples)
Columns: file MB; p50 latency (batch 1; MiniLM 128 tokens of real held-out text, EfficientNet one 224 x 224
held-out photo) and its ratio to ORT CPU int8, all models of one network timed interleaved in one process with
pinned threads; fidelity against the original from each run's report (MiniLM: held-out cosine of the sentence
embedding on the `mix` split; EfficientNet: top-1 agreement on the 40 held-out photos). Then the issue's goal:
ExecuTorch int8 within 1.5x of ORT int8 latency at held-out cosine >= 0.99.

Needs ExecuTorch: pip install -e '.[executorch]' (its wheel pulls torchao; keep it in its own environment).

    python benchmarks/mobile_runtimes.py [--models minilm,efficientnet-lite0] [--threads 2] [--runs 200] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ROWS = {
    "minilm": {"ORT CPU fp32": ["export.onnx", "optimize.ort"],
               "ORT CPU int8": ["export.onnx", "optimize.ort", "quant.int8"],
               "ExecuTorch fp32": ["export.executorch"],
               "ExecuTorch int8": [{"pass": "export.executorch", "quantize": "int8"}]},
    "efficientnet-lite0": {"ORT CPU fp32": ["export.onnx"],
                           "ORT CPU int8": ["export.onnx", {"pass": "quant.int8", "mode": "static"}],
                           "ExecuTorch fp32": ["export.executorch"],
                           "ExecuTorch int8": [{"pass": "export.executorch", "quantize": "int8"}]},
}
BASELINE = "ORT CPU int8"


def build(model: str, work: Path, threads: int) -> dict[str, dict]:
    """Run each row's pipeline; name -> {path, bytes, fidelity} from its report."""
    from rich.console import Console

    from compress import Pipeline, images
    from compress.profiling import LatencySettings

    data = images.load("photos") if model == "efficientnet-lite0" else "mix"
    quick = LatencySettings(batch=1, seq=128, threads=threads, warmup=1, runs=3)
    console = Console(stderr=True, width=160)
    from compress.errors import PassFailed

    rows = {}
    for name, passes in ROWS[model].items():
        out = work / model / name.replace(" ", "_")
        console.rule(f"{model}: {name}")
        try:
            rep = Pipeline(passes).run(model, data, out, overwrite=True, latency=quick, tasks=False, console=console).report
        except PassFailed as exc:  # e.g. an int8 program whose outputs miss the parity check: a row that says so
            console.print(f"[red]{name} failed[/red]: {exc}")
            rows[name] = {"failed": str(exc).splitlines()[-1].strip()}
            continue
        final = rep["stages"][-1]
        rows[name] = {"path": out / rep["final"]["path"], "bytes": final["bytes"], "fidelity": final.get("fidelity") or {}}
    return rows


def feed_of(model: str, runner_kind: str):
    from compress import data, images, kinds, models
    from compress.profiling import text_feed

    if model == "efficientnet-lite0":
        photos = images.load("photos")
        return kinds.get(runner_kind).inputs.latency_feed(None, photos.eval, 1, 1)
    tok = models.load_tokenizer(models.alias_path(model))
    return text_feed(tok, data.load("mix").eval, 1, 128)


def time_rows(model: str, rows: dict[str, dict], threads: int, runs: int) -> dict[str, dict]:
    import onnxruntime as ort

    from compress.exporters import ort_mobile
    from compress.profiling import LatencySettings, time_interleaved
    from compress.runtime import OnnxRunner, PteRunner

    kind = "image-classifier" if model == "efficientnet-lite0" else "encoder"
    feed = feed_of(model, kind)
    calls = {}
    for name, row in rows.items():
        if "failed" in row:
            continue
        if row["path"].suffix == ".pte":
            calls[name] = PteRunner(row["path"], kind, threads=threads).bound(feed)
        else:
            runner = OnnxRunner(row["path"], kind, threads=threads)
            inputs = runner.feed(feed)
            calls[name] = lambda r=runner, x=inputs: r.sess.run(None, x)
            if ort_mobile.XNNPACK in ort.get_available_providers():
                sess = ort_mobile.xnnpack_session(row["path"], threads)
                calls[name.replace("ORT CPU", "ORT XNNPACK")] = lambda s=sess, x=inputs: s.run(None, x)
    settings = LatencySettings(batch=1, seq=128, threads=threads, warmup=10, runs=runs)
    return time_interleaved(calls, settings, rounds=10)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,efficientnet-lite0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    import importlib.util

    import onnxruntime as ort
    import torch
    from rich.console import Console
    from rich.table import Table

    from compress.exporters import ort_mobile

    if importlib.util.find_spec("executorch") is None:
        ap.error("ExecuTorch is not installed: pip install -e '.[executorch]'")
    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-mobile-"))
    console = Console(width=170)
    if ort_mobile.XNNPACK not in ort.get_available_providers():
        console.print(f"onnxruntime {ort.__version__} has no XNNPACK execution provider (the PyPI CPU wheel): "
                      "no ORT XNNPACK rows")
    results = {}
    for model in args.models.split(","):
        rows = build(model, work, args.threads)
        lat = time_rows(model, rows, args.threads, args.runs)
        base = lat[BASELINE]["p50"]
        metric = "top1" if model == "efficientnet-lite0" else "cosine"
        table = Table("runtime", "MB", "p50 ms", f"vs {BASELINE}", f"held-out {metric}",
                      title=f"{model}: batch 1, {args.threads} threads, {args.runs} runs in 10 interleaved rounds")
        for name, timing in lat.items():
            row = rows[name.replace("ORT XNNPACK", "ORT CPU")]
            value = row["fidelity"].get(metric)
            table.add_row(name, f"{row['bytes'] / 1e6:.1f}", f"{timing['p50']:.2f}", f"{timing['p50'] / base:.2f}x",
                          f"{value:.4f}" if isinstance(value, float) else "-")
        for name, row in rows.items():
            if "failed" in row:
                table.add_row(name, "-", "-", "-", f"failed: {row['failed'][:70]}")
        console.print(table)
        if "failed" in rows["ExecuTorch int8"]:
            console.print(f"  ExecuTorch int8 failed: {rows['ExecuTorch int8']['failed']}")
            results[model] = {"latency": lat}
            continue
        et = lat["ExecuTorch int8"]["p50"] / base
        fid = rows["ExecuTorch int8"]["fidelity"].get(metric)
        if model == "minilm":
            ok = et <= 1.5 and isinstance(fid, float) and fid >= 0.99
            console.print(f"  goal: ExecuTorch int8 within 1.5x of ORT int8 at held-out cosine >= 0.99: {et:.2f}x, "
                          f"cosine {fid}: {'[green]met[/green]' if ok else '[red]not met[/red]'}")
        results[model] = {"latency": lat, "rows": {k: {**v, "path": str(v.get("path"))} for k, v in rows.items()}}
    return results


if __name__ == "__main__":
    main()
