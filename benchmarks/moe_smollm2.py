"""Expert pruning on the MoEfied SmolLM2 (issue 5), from ONE run on this machine.

The fixture: SmolLM2-135M turned into a transformers Mixtral MoE by examples/moefy_smollm2.py (8
experts of 192 neurons, top-2, routers trained, experts reconstructed block by block and then
distilled end to end from the dense model on wiki training text; see passes/lib/moefy.py and
passes/lib/moefy_refit.py), built here or taken from --moe-dir. Then, each as a compress
Pipeline run in a fresh process (so wall time and peak RSS belong to that run alone):
  prune.experts keep=0.5 (8 -> 4 experts per layer) for method in frequency / tcess / reconstruction /
  random, x protect_super_experts on / off, x merge on / off (16 runs), and prune.experts (the best of
  those) -> distill.kd against the unpruned MoE (the pipeline's teacher), --kd-steps steps.
Columns: held-out perplexity on the first --ppl-paragraphs lee_background paragraphs (256 tokens each
at most; news text, never in the wiki calibration / training text), its ratio to the unpruned MoE,
parameters, bytes of model.safetensors on disk, wall time of the run (pipeline + perplexity) and its
peak RSS. Then the issue's goals, met or NOT met.

    python benchmarks/moe_smollm2.py --moe-dir out/smollm2-moe/model      # fixture already built
    python benchmarks/moe_smollm2.py --workdir /tmp/bench-moe                # builds the fixture first
    python benchmarks/moe_smollm2.py --quick                                 # smoke check: tiny settings
    python benchmarks/moe_smollm2.py --show WORKDIR/results.json             # the table again

Measured at the defaults (40 paragraphs, 64 calibration samples, distill.kd 100 steps x 8 samples,
1 thread on 2 cores shared with other jobs), one run:
  python examples/moefy_smollm2.py --out /tmp/moe_s4/fixture --threads 1 --kd-steps 150   # 17 min
  python benchmarks/moe_smollm2.py --moe-dir /tmp/moe_s4/fixture/model --workdir /tmp/moe_s4/bench --threads 1
Fixture with end-to-end distillation (150 steps): unpruned MoE 214.56 on 40 paragraphs (230.5 on
20; dense SmolLM2 34.35 on 20). 134.65M params / 538.7 MB -> 94.77M / 379.2 MB for every pruned
run, 165-200 s per run (load ~3 on 2 cores). Perplexity (ratio to the unpruned MoE), protect on /
off, merge off / on:
  frequency       248.75 (1.159x) / 248.75    merge 365.10 (1.702x) / 770.64 (3.592x)
  tcess           246.55 (1.149x) / 246.55    merge 364.59 (1.699x) / 769.47 (3.586x)
  reconstruction  248.26 (1.157x) / 248.26    merge 363.11 (1.692x) / 363.11
  random          37631 / 124536              merge 185726 / 688754
Super experts: one each in layers 11 and 28 (of 30); the informed methods keep them anyway, so
protection changes nothing without merge, but unprotected they become merge targets and averaging
a dropped expert into them (frequency, tcess) doubles the perplexity; random is 3.3x better with.
tcess + protect (the best) + distill.kd 100 steps: 246.55 -> 225.50 (1.051x; 66% of the gap
closed), 1314 s, 7.1 GB peak RSS (pruned runs ~4.2 GB, unpruned 1.9 GB). Benchmark 73 min in all.
Goals: within 15% met by tcess (1.149x, a thin margin: frequency 1.159x, reconstruction 1.157x);
better than random met; recovery >= half the gap met.
Earlier (fixture without the distillation, unpruned 436.2 on 20 paragraphs; --ppl-paragraphs 20
--calibration-samples 32 --kd-steps 20 --kd-batch 4): frequency 505.7 (1.159x), tcess 509.0
(1.167x), reconstruction 508.3 (1.165x); frequency + 20 distill.kd steps 409.1."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("frequency", "tcess", "reconstruction", "random")


def fixture(args) -> Path:
    """The unpruned MoE folder: --moe-dir, or built by compress.fixtures.smollm2_moe (examples/moefy_smollm2.py)
    under the workdir."""
    if args.moe_dir:
        return Path(args.moe_dir)
    folder = args.workdir / "fixture" / "model"
    if not (folder / "config.json").is_file():
        from compress.fixtures.smollm2_moe import Options, build, print_summary

        options = Options(model=args.dense, threads=args.threads)
        print_summary(build(folder.parent, options.fast() if args.quick else options))
    return folder


def runs(args) -> list[dict]:
    """Every configuration: 16 prune.experts runs; the KD run is added once the best is known."""
    out = []
    for method in METHODS:
        for protect in (True, False):
            for merge in (False, True):
                out.append({"method": method, "protect": protect, "merge": merge})
    return out


def prune_config(row: dict, args) -> dict:
    return {"pass": "prune.experts", "keep": 0.5, "method": row["method"], "protect_super_experts": row["protect"],
            "merge": row["merge"], "calibration_samples": args.calibration_samples, "max_length": 128,
            "reconstruction_tokens": 512, "seed": 0}


def kd_config(args) -> dict:
    return {"pass": "distill.kd", "steps": args.kd_steps, "batch_size": args.kd_batch, "max_length": 128,
            "lr": args.kd_lr, "warmup": 0.1, "w_output": 1.0, "w_hidden": 1.0, "temperature": 1.0,
            "checkpoint_every": 10_000, "seed": 0}


def one(spec: dict) -> dict:
    """In the child process: run one pipeline, then the held-out perplexity of its final model."""
    import torch
    from rich.console import Console

    from compress import Pipeline
    from compress.data import lee_background
    from compress.evaluate import perplexity
    from compress.profiling import LatencySettings
    from compress.runtime import TorchRunner

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    out = Path(spec["out"])
    if spec["passes"]:
        settings = LatencySettings(batch=1, seq=32, threads=spec["threads"], warmup=1, runs=2)
        result = Pipeline(spec["passes"]).run(spec["model"], spec["data"], out, overwrite=True, tasks=False,
                                              max_length=64, latency=settings, console=Console(stderr=True, width=140))
        model, tok = result.state.model, result.state.tokenizer
        folder = out / result.report["final"]["path"]
        notes = [{k: s.get(k) for k in ("name", "seconds", "experts", "distill") if k in s} for s in result.report["stages"]]
    else:  # the unpruned MoE as it is
        from compress.models import load_hf

        model, tok, _ = load_hf(Path(spec["model"]))
        folder, notes = Path(spec["model"]), []
    ppl = perplexity(TorchRunner(model, "causal-lm"), tok, lee_background()[: spec["paragraphs"]], 256)
    return {"ppl": ppl, "params": sum(p.numel() for p in model.parameters()),
            "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            "experts": model.config.num_local_experts, "top_k": model.config.num_experts_per_tok,
            "seconds_in_process": time.perf_counter() - t0, "stages": notes}


def spawn(spec: dict, work: Path, name: str) -> dict:
    """Run `one(spec)` in a fresh Python; wall time and peak RSS (os.wait4: this child alone)."""
    spec_file, result_file = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec_file.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--one", str(spec_file), "--result", str(result_file)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}): see {work / (name + '.log')}")
    return {**json.loads(result_file.read_text()), "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": usage.ru_maxrss / 1024}  # Linux: kilobytes


def data_file(work: Path, samples: int) -> Path:
    """wiki *train* paragraphs (calibration, KD training, fidelity): never lee_background."""
    from compress import data

    path = work / "data.txt"
    path.write_text("\n".join(data.load("wiki").train[:samples]) + "\n")
    return path


def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def goals(base: dict, rows: list[dict], kd: dict | None) -> list[str]:
    pruned = [r for r in rows if r["name"] != "unpruned MoE" and "from_ppl" not in r]  # one-shot runs, no recovery
    best = min(pruned, key=lambda r: r["ppl"])
    lines = [f"best method within 15% of the unpruned MoE: {best['name']} {best['ppl']:.2f} vs {base['ppl']:.2f} "
             f"({best['ppl'] / base['ppl']:.3f}x): {_mark(best['ppl'] <= 1.15 * base['ppl'])}"]
    randoms, informed = [r for r in pruned if r["method"] == "random"], [r for r in pruned if r["method"] != "random"]
    if randoms and informed:
        rnd, good = min(randoms, key=lambda r: r["ppl"]), min(informed, key=lambda r: r["ppl"])
        lines.append(f"best method clearly better than random: {good['name']} {good['ppl']:.2f} vs best random "
                     f"{rnd['name']} {rnd['ppl']:.2f} (> 5% lower): {_mark(good['ppl'] < 0.95 * rnd['ppl'])}")
    if kd is not None:
        gap, left = kd["from_ppl"] - base["ppl"], kd["ppl"] - base["ppl"]
        closed = 1 - left / gap if gap > 0 else float("nan")
        lines.append(f"distill.kd recovery closes >= half of the gap: {kd['from_ppl']:.2f} -> {kd['ppl']:.2f} "
                     f"(unpruned {base['ppl']:.2f}; {closed * 100:.0f}% of the gap closed): {_mark(closed >= 0.5)}")
    return lines


def table(rows: list[dict], base: dict, args) -> Any:
    from rich.table import Table

    out = Table("run", "method", "protect", "merge", "experts", "ppl", "vs MoE", "params", "MB", "wall s", "peak MB",
                title=f"MoEfied SmolLM2 ({base['experts']} experts, top-{base['top_k']}), prune.experts keep=0.5: "
                      f"perplexity on {args.ppl_paragraphs} lee_background paragraphs")
    for r in rows:
        out.add_row(r["name"], r.get("method", "-"), str(r.get("protect", "-")), str(r.get("merge", "-")),
                    f"{r['experts']} (top-{r['top_k']})", f"{r['ppl']:.2f}", f"{r['ppl'] / base['ppl']:.3f}x",
                    f"{r['params'] / 1e6:.2f}M", f"{r['bytes'] / 1e6:.1f}", f"{r['wall_s']:.0f}", f"{r['peak_rss_mb']:.0f}")
    return out


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe-dir", default=None, help="the MoEfied model folder (default: build it under --workdir)")
    ap.add_argument("--dense", default="smollm2", help="dense model the fixture is built from (without --moe-dir)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every run (1: steadiest on busy cores)")
    ap.add_argument("--ppl-paragraphs", type=int, default=40, help="lee_background paragraphs for perplexity")
    ap.add_argument("--calibration-samples", type=int, default=64, help="wiki train paragraphs prune.experts sees")
    ap.add_argument("--kd-steps", type=int, default=100, help="distill.kd steps after the best method (0: skip)")
    ap.add_argument("--kd-batch", type=int, default=8, help="distill.kd samples (128 tokens) per step")
    ap.add_argument("--kd-lr", type=float, default=1e-4)
    ap.add_argument("--only", default=None, help="comma-separated methods to run (default: all four)")
    ap.add_argument("--quick", action="store_true", help="smoke check: fast fixture, 2 paragraphs, frequency and random, 2 KD steps")
    ap.add_argument("--show", type=Path, default=None, help="print the table and goals of a results.json again")
    ap.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the child process
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.ppl_paragraphs, args.calibration_samples, args.kd_steps, args.kd_batch = 2, 8, 2, 2
        args.only = args.only or "frequency,random"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    if args.one is not None:
        args.result.write_text(json.dumps(one(json.loads(args.one.read_text()))))
        return {}
    from rich.console import Console

    console = Console(width=170)
    if args.show is not None:
        saved = json.loads(args.show.read_text())
        show(console, saved["rows"], args, saved.get("fixture", "?"))
        return saved
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-moe-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    moe_dir = fixture(args)
    fixture_s = time.perf_counter() - t0
    data = data_file(args.workdir, max(args.calibration_samples, args.kd_steps * args.kd_batch) + 40)
    common = {"model": str(moe_dir), "data": str(data), "threads": args.threads, "paragraphs": args.ppl_paragraphs}
    base = {"name": "unpruned MoE", **spawn({**common, "passes": [], "out": ""}, args.workdir, "unpruned")}
    rows = [base]
    chosen = [r for r in runs(args) if args.only is None or r["method"] in args.only.split(",")]
    for r in chosen:
        name = f"{r['method']}{'+protect' if r['protect'] else ''}{'+merge' if r['merge'] else ''}"
        res = spawn({**common, "passes": [prune_config(r, args)], "out": str(args.workdir / name)}, args.workdir, name)
        rows.append({"name": name, **r, **res})
        console.print(f"[dim]{name}: ppl {res['ppl']:.2f}, {res['wall_s']:.0f} s[/dim]")
    kd = None
    if args.kd_steps > 0:
        best = min(rows[1:], key=lambda r: r["ppl"])
        cfg = {k: best[k] for k in ("method", "protect", "merge")}
        name = f"{best['name']}+kd{args.kd_steps}"
        res = spawn({**common, "passes": [prune_config(cfg, args), kd_config(args)], "out": str(args.workdir / name)},
                    args.workdir, name.replace("+", "_"))
        kd = {"name": name, **cfg, **res, "from_ppl": best["ppl"]}
        rows.append(kd)
    where = f"{moe_dir} ({'given' if args.moe_dir else f'built in {fixture_s:.0f} s'}); workdir {args.workdir}"
    (args.workdir / "results.json").write_text(json.dumps({"fixture": where, "rows": rows}, indent=2, default=str))
    show(console, rows, args, where)
    return {"rows": rows, "fixture_s": fixture_s}


def show(console, rows: list[dict], args, where: str) -> None:
    base, kd = rows[0], next((r for r in rows if "from_ppl" in r), None)
    console.print(table(rows, base, args))
    console.print(f"fixture: {where}")
    for line in goals(base, rows, kd):
        console.print("  " + line)


if __name__ == "__main__":
    main()
