"""RIQ on all-MiniLM-L6-v2 next to the usual formats, from ONE run on this machine.

Rows (all from the same fp32 ONNX export of the built-in MiniLM):
- fp32 ONNX, and zstd (level 19) of that file: lossless;
- int8: quant.int8 (dynamic, per-channel; every weight incl. the embeddings, via onnxruntime's quantizer);
- int4: quant.int4 (MatMulNBits, block 32; embeddings stay fp32);
- RIQ at deviation D: the `.riq` file of export.riq (every weight tensor entropy coded), its decoded
  int8-weight ONNX (weight-only DequantizeLinear where the codes fit in int8, float elsewhere: what
  runs on a device), its packed ONNX (`compress decode --weights packed`: each tensor in the narrowest of 4-bit
  MatMulNBits, int8, int16 or float that holds its codes), and the same after
  prune.homodistil (heads 0.5, FFN 0.5) unless --prune-steps 0;
- --sparse S1,S2 (e.g. 0.5,0.7,2:4): prune.sparse (SparseGPT, every layer's Linears; embeddings dense) at each
  sparsity or n:m pattern, then distill.kd --sparse-kd steps (zeros kept; 0: none), then quant.riq rounding=gptq
  on the torch form and export.riq. Cosine of the sparse model against the dense teacher, and of its `.riq`
  against the sparse model it quantized ("that model"), both on the held-out split.
Ratio = 32 x parameters / bits of the file (graph, tables and float tensors included); for the pruned
model also against the dense model's parameters. Fidelity = mean cosine of sentence embeddings
against fp32 PyTorch on the held-out split of the built-in wiki text; Lee-50 and polarity-200 as in
the reports. Latency: batch 1, seq 128, pinned threads, interleaved rounds; peak memory of a fresh
process (VmHWM).

    python benchmarks/riq_minilm.py [--deviation 0.005] [--prune-steps 600] [--threads 2] [--runs 100] [--workdir DIR]
                                    [--torch-rounding nearest,gptq] [--only-torch] [--sparse 0.5,2:4 --sparse-kd 300]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def zstd_bytes(path: Path, level: int = 19) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(path.read_bytes()))


def _folder(name: str) -> str:
    """A row's run folder under --workdir ('sparse 2:4' -> 'sparse_2of4')."""
    return name.replace(" ", "_").replace(":", "of")


def _file_info(q: dict, e: dict) -> dict:
    """What the summary lines print of a quant.riq stage and its export.riq stage."""
    return {**e["riq_file"], "k": q["riq"]["k"], "search_s": q["riq"]["search_seconds"],
            "evaluations": q["riq"]["evaluations"]}


def _stage(result, name: str) -> dict:
    return next(s for s in result.report["stages"] if s["name"] == name)


def _row(name: str, stage: dict, nbytes: int, params: int, dense_params: int, path: Path | None) -> dict:
    fid, met = stage.get("fidelity") or {}, stage.get("metrics") or {}
    return {"format": name, "bytes": nbytes, "params": params, "ratio": 32 * params / (8 * nbytes),
            "ratio_vs_dense": 32 * dense_params / (8 * nbytes), "cosine": fid.get("cosine"),
            "cosine_min": fid.get("cosine_min"), "lee50": met.get("lee50"), "polarity": met.get("polarity"), "path": path}


def run_all(args, work: Path, console) -> tuple[list[dict], dict]:
    from compress import Pipeline

    riq = [{"pass": "quant.riq", "deviation": args.deviation}, {"pass": "export.riq", "weights": "int8"}]
    runs = {"riq": ["export.onnx", *riq], "int8": ["export.onnx", "quant.int8"],
            "int4": ["export.onnx", {"pass": "quant.int4", "block_size": 32}]}
    if args.only_torch:
        runs = {"riq": ["export.onnx"]}  # the fp32 reference row only
    if args.prune_steps and not args.only_torch:
        prune = {"pass": "prune.homodistil", "heads": 0.5, "ffn": 0.5, "steps": args.prune_steps, "lr": 3e-4,
                 "max_length": 64}
        runs["pruned riq"] = [prune, "export.onnx", *riq]
    for rounding in args.torch_rounding:  # quant.riq on the torch form, where rounding=gptq can measure inputs
        runs[f"riq torch {rounding}"] = [{"pass": "quant.riq", "deviation": args.deviation, "rounding": rounding},
                                         "export.riq"]
    for spec in args.sparse:
        prune = {"pass": "prune.sparse", "method": "sparsegpt", **({"pattern": spec} if ":" in spec else
                                                                  {"sparsity": float(spec)})}
        kd = [{"pass": "distill.kd", "steps": args.sparse_kd, "max_length": 128, "freeze_embeddings": True}] \
            if args.sparse_kd else []
        runs[f"sparse {spec}"] = [prune, *kd, {"pass": "quant.riq", "deviation": args.deviation, "rounding": "gptq"},
                                  "export.riq"]
    results = {}
    for name, passes in runs.items():
        console.rule(f"{name}: {' -> '.join(p if isinstance(p, str) else p['pass'] for p in passes)}")
        results[name] = Pipeline(passes).run("minilm", outdir=work / _folder(name), console=console)

    fp32 = _stage(results["riq"], "export.onnx")
    fp32_path = work / "riq" / "stages" / "01-export.onnx" / "model.onnx"
    dense = fp32["params"]
    rows = [_row("fp32 ONNX", fp32, fp32_path.stat().st_size, dense, dense, fp32_path),
            _row("zstd-19 of fp32 ONNX", fp32, zstd_bytes(fp32_path), dense, dense, None)]
    for name in [n for n in ("int8", "int4") if n in results]:
        stage = results[name].report["stages"][-1]
        rows.append(_row(f"{name} ({'per-channel' if name == 'int8' else 'MatMulNBits b32'})", stage,
                         stage["bytes"], dense, dense, work / name / "model.onnx"))
    files = {}
    for name in [n for n in ("riq", "pruned riq") if n in results and not args.only_torch]:
        res, folder = results[name], work / _folder(name)
        q, e = _stage(res, "quant.riq"), _stage(res, "export.riq")
        params = e["riq_file"]["params"]
        rows.append(_row(f"{name} .riq (D={args.deviation})", q, e["riq_file"]["bytes"], params, dense, None))
        rows.append(_row(f"{name} decoded int8-weight ONNX", e, (folder / "model.onnx").stat().st_size, params, dense,
                         folder / "model.onnx"))
        rows.append(_packed_row(name, folder, work, params, dense))
        files[name] = {**_file_info(q, e), "float_onnx": folder / "stages" / "02-quant.riq" / "model.onnx"
                       if name == "riq" else None}
    for name in [n for n in results if n.startswith("riq torch")]:
        q, e = _stage(results[name], "quant.riq"), _stage(results[name], "export.riq")
        rows.append(_row(f"{name} .riq (D={args.deviation})", q, e["riq_file"]["bytes"], e["riq_file"]["params"],
                         dense, None))
        files[name] = _file_info(q, e)
    for name in [n for n in results if n.startswith("sparse ")]:
        res, folder = results[name], work / _folder(name)
        q, e = _stage(res, "quant.riq"), _stage(res, "export.riq")
        row = _row(f"{name} + kd {args.sparse_kd} + riq gptq .riq (D={args.deviation})", q, e["riq_file"]["bytes"],
                   e["riq_file"]["params"], dense, None)
        before = res.report["stages"][_index(res, "quant.riq") - 1]
        row["sparse_cosine"] = (before.get("fidelity") or {}).get("cosine")
        row["cosine_vs_sparse"] = _cosine_vs_input(folder)
        rows.append(row)
        files[name] = {**_file_info(q, e), "zeros": _stage(res, "prune.sparse")["sparse"]["zeros_of_model"]}
    return rows, files


def _packed_row(name: str, folder: Path, work: Path, params: int, dense: int) -> dict:
    """`compress decode --weights packed` of the run's .riq (4-bit MatMulNBits / int8 / int16 / float per tensor),
    its held-out cosine against fp32 PyTorch measured here (the pipeline measured the other rows)."""
    from compress import data, evaluate, models
    from compress.exporters.riq_export import decode
    from compress.runtime import OnnxRunner, TorchRunner

    out = work / f"{_folder(name)}_packed"
    info = decode(folder / "model.riq", out, "packed", overwrite=True)
    teacher, tok, _ = models.load_hf(models.alias_path("minilm"))
    cos = evaluate.fidelity("encoder", OnnxRunner(out / "model.onnx", "encoder"), TorchRunner(teacher, "encoder"), tok,
                            data.load("wiki").eval, 128)["cosine"]
    widths = ", ".join(f"{n} {w}" for w, n in info["widths"].items() if n)
    return _row(f"{name} decoded packed ONNX ({widths})", {"fidelity": {"cosine": cos}}, (out / "model.onnx").stat().st_size,
                params, dense, out / "model.onnx")


def _index(result, name: str) -> int:
    return next(i for i, s in enumerate(result.report["stages"]) if s["name"] == name)


def _cosine_vs_input(folder: Path) -> float:
    """Held-out cosine of the quant.riq stage's torch model against the stage before it (the model it quantized)."""
    from compress import data, evaluate, models
    from compress.runtime import TorchRunner

    stages = sorted((folder / "stages").iterdir())
    riq = next(i for i, s in enumerate(stages) if s.name.endswith("quant.riq"))
    (before, tok, _), (after, _, _) = (models.load_hf(stages[i] / "model") for i in (riq - 1, riq))
    return evaluate.fidelity("encoder", TorchRunner(after, "encoder"), TorchRunner(before, "encoder"), tok,
                             data.load("wiki").eval, 128)["cosine"]


def timings(rows: list[dict], files: dict, args, work: Path) -> dict:
    from compress import data, models
    from compress.profiling import LatencySettings, peak_memory_mb, real_feed, time_interleaved
    from compress.runtime import OnnxRunner

    tok = models.load_tokenizer(models.alias_path("minilm"))
    feed = real_feed(tok, data.load("wiki").eval, 1, 128)
    settings = LatencySettings(batch=1, seq=128, threads=args.threads, warmup=10, runs=args.runs)
    paths = {r["format"]: r["path"] for r in rows if r["path"] is not None}
    if files.get("riq", {}).get("float_onnx"):
        paths["riq decoded fp32 ONNX"] = files["riq"]["float_onnx"]
    calls, inputs = {}, {}
    for name, path in paths.items():
        runner = OnnxRunner(path, "encoder", threads=args.threads)
        inputs[name] = runner.feed(feed)
        calls[name] = (lambda r=runner, i=inputs[name]: r.sess.run(None, i))
    lat = time_interleaved(calls, settings, rounds=10)
    return {name: {"p50_ms": lat[name]["p50"], **peak_memory_mb(path, inputs[name], settings, work)}
            for name, path in paths.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deviation", type=float, default=0.005)
    ap.add_argument("--prune-steps", type=int, default=600, help="prune.homodistil steps; 0 skips the pruned model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--torch-rounding", default="", help="comma-separated quant.riq roundings (nearest, gptq) to run "
                                                         "on the torch form too, each a .riq row")
    ap.add_argument("--only-torch", action="store_true", help="the --torch-rounding rows and the fp32 reference only")
    ap.add_argument("--sparse", default="", help="comma-separated prune.sparse sparsities or n:m patterns (0.5,2:4), "
                                                 "each a row: SparseGPT -> distill.kd -> quant.riq gptq -> export.riq")
    ap.add_argument("--sparse-kd", type=int, default=300, help="distill.kd steps after prune.sparse (0: none)")
    args = ap.parse_args(argv)
    args.torch_rounding = [r for r in args.torch_rounding.split(",") if r]
    args.sparse = [s for s in args.sparse.split(",") if s]

    import torch
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-riq-"))
    for sub in ("riq", "int8", "int4", "pruned_riq", *(f"riq_torch_{r}" for r in args.torch_rounding),
                *(_folder(f"sparse {s}") for s in args.sparse)):
        shutil.rmtree(work / sub, ignore_errors=True)
    console = Console(stderr=True)
    rows, files = run_all(args, work, console)
    lat = timings(rows, files, args, work)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    table = Table("format", "MB", "params", "ratio", "ratio vs dense", "held-out cos", "min cos", "Lee-50", "polarity",
                  "p50 ms", "peak MB", title=f"MiniLM: RIQ at D={args.deviation} vs usual formats (ratio = 32 x params / file bits)")
    for r in rows:
        t = lat.get(r["format"], {})
        table.add_row(r["format"], f"{r['bytes'] / 1e6:.2f}", f"{r['params']:,}", f"{r['ratio']:.2f}",
                      f"{r['ratio_vs_dense']:.2f}", fmt(r["cosine"], ".4f"), fmt(r["cosine_min"], ".4f"),
                      fmt(r["lee50"], ".4f"), fmt(r["polarity"], ".3f"), fmt(t.get("p50_ms"), ".2f"),
                      fmt(t.get("peak_rss_mb"), ".0f"))
    for r in [r for r in rows if "cosine_vs_sparse" in r]:
        out_note = (f"{r['format']}: the sparse model's held-out cosine vs the dense teacher {fmt(r['sparse_cosine'], '.4f')}; "
                    f"its .riq vs the sparse model {r['cosine_vs_sparse']:.4f}")
        table.caption = ((table.caption + "\n") if table.caption else "") + out_note
    if "riq decoded fp32 ONNX" in lat:
        t = lat["riq decoded fp32 ONNX"]
        table.add_row("riq decoded fp32 ONNX", "-", "-", "-", "-", "-", "-", "-", "-", f"{t['p50_ms']:.2f}",
                      f"{t['peak_rss_mb']:.0f}")
    out = Console(width=180)
    out.print(table)
    for name, f in files.items():
        out.print(f"{name}: k={f['k']:.1f} after {f['evaluations']} evaluations ({f['search_s']:.0f} s search); "
                  f".riq encode {f['encode_seconds']:.2f} s, decode + bit-exact check {f['decode_seconds']:.2f} s; "
                  f"{f['bits_per_param']:.2f} bits/param; {f.get('int8_tensors', 0)} tensors deployed as int8")
    result = {"rows": [{k: v for k, v in r.items() if k != "path"} for r in rows], "latency": lat,
              "files": {n: {k: v for k, v in f.items() if k != "float_onnx"} for n, f in files.items()}}
    (work / "riq_minilm.json").write_text(json.dumps(result, indent=2, default=str))
    out.print(f"json: {work / 'riq_minilm.json'}")
    return result


if __name__ == "__main__":
    main()
