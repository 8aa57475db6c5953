"""SmolLM2-135M: depth pruning against FFN pruning of the same parameter count, each recovered by the
same steps of distill.kd, from ONE run on this machine; every model then exported and quantized to
int4 (export.onnx -> quant.int4, the KV-cache graph) next to the unpruned teacher's int4 graph.

  depth   prune.structured layers=LAYERS (block influence, ShortGPT) -> distill.kd
  ffn     prune.structured ffn=F, heads 0, activation importance, F solved so both remove the same
          parameters (params budget) -> distill.kd
Both distil on the built-in `mix` corpus (training split; wiki held-out text and lee paragraphs never
trained on). Columns: parameters, perplexity on the first PPL lee_background paragraphs (256 tokens
each at most) and on the wiki held-out samples that mix does not train on (100 of 128), int4 decode tokens/s over 64 greedy new tokens after a
64-token prompt (medians of rounds alternating between the models), training seconds; the
'one-shot' rows are the same prunings before training.

    python benchmarks/pruning_smollm2.py [--layers 0.34] [--steps 200] [--threads 2] [--workdir DIR] [--rows "depth + kd"]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

INT4 = {"pass": "quant.int4", "block_size": 32}


def recipes(layers: float, keep: float, steps: int, max_length: int) -> dict[str, list]:
    kd = {"pass": "distill.kd", "steps": steps, "max_length": max_length, "batch_size": 8, "w_hidden": 1.0}
    depth = {"pass": "prune.structured", "layers": layers, "heads": 0, "ffn": 0, "max_length": 128}
    ffn = {"pass": "prune.structured", "params": keep, "heads": 0, "importance": "activation", "max_length": 128}
    return {"teacher": ["export.onnx", INT4],
            "depth one-shot": [depth, "export.onnx", INT4],
            "ffn one-shot": [ffn, "export.onnx", INT4],
            "depth + kd": [depth, kd, "export.onnx", INT4],
            "ffn + kd": [ffn, kd, "export.onnx", INT4]}


def perplexity_texts(lee_paragraphs: int) -> tuple[list[str], list[str]]:
    """The texts perplexity is measured on: the first `lee_paragraphs` lee_background paragraphs, and
    the wiki held-out samples that `mix` (the students' training corpus) does not train on: the two
    corpora are split apart, and 28 of wiki's 128 held-out texts are in mix's training part."""
    from compress import data

    mix_train = set(data.load("mix").train)
    return data.lee_background()[:lee_paragraphs], [t for t in data.load("wiki").eval if t not in mix_train]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=float, default=0.34, help="fraction of the 30 layers removed (0.34: 10)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ppl", type=int, default=100, help="lee_background paragraphs for perplexity")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--rows", default="", help="comma-separated recipe names to run (default: all): teacher, depth "
                                                "one-shot, ffn one-shot, depth + kd, ffn + kd")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from compress import Pipeline, models
    from compress.passes.lib import depth, prunable
    from compress.profiling import LatencySettings
    from smollm2_edge import speed

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prune-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, width=160)
    model, tok, _ = models.load_hf(models.alias_path("smollm2"))
    geo = prunable.Geometry.of(model.config)
    per_layer = sum(p.numel() for p in prunable.layers(model, prunable.family_of(model.config))[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    removed = depth.removal_count(geo.layers, args.layers) * per_layer
    keep = round((total - removed) / total, 6)
    console.print(f"depth removes {removed:,} of {total:,} parameters ({removed / total:.1%}); ffn matches with params={keep}")
    settings = LatencySettings(batch=1, seq=64, threads=args.threads, warmup=1, runs=5, new_tokens=16, generate_runs=2)
    reports, seconds = {}, {}
    chosen = recipes(args.layers, keep, args.steps, args.max_length)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()] or list(chosen)
    unknown = sorted(set(wanted) - set(chosen))
    if unknown:
        ap.error(f"unknown rows {unknown}: choose from {', '.join(chosen)}")
    for name, passes in {n: p for n, p in chosen.items() if n in wanted}.items():
        out = work / name.replace(" ", "_").replace("+", "plus")
        console.rule(name)
        t0 = time.perf_counter()
        reports[name] = Pipeline(passes).run("smollm2", "mix", out, overwrite=True, tasks=False, latency=settings,
                                             console=console, measure="off").report
        seconds[name] = time.perf_counter() - t0
        reports[name]["_dir"] = out

    from compress import evaluate, runtime

    lee, wiki = perplexity_texts(args.ppl)
    paths = {name: rep["_dir"] / "model.onnx" for name, rep in reports.items()}
    ids = tok(" ".join(wiki[:4]), return_tensors="np")["input_ids"][:, :64]
    fast = speed({k: v for k, v in paths.items() if "one-shot" not in k}, ids, args.threads, 64, args.rounds)
    table = Table("model", "params", "int4 MB", "ppl lee", "ppl wiki", "decode tok/s", "vs teacher", "train s",
                  title=f"SmolLM2-135M: depth vs FFN pruning, same parameters, distill.kd {args.steps} steps on mix")
    result = {}
    for name, rep in reports.items():
        run = runtime.OnnxRunner(paths[name], "causal-lm", threads=args.threads)
        torch_stage = [s for s in rep["stages"] if s["form"] == "torch"][-1]
        train = sum(s["seconds"] for s in rep["stages"] if s["name"].startswith("distill"))
        row = {"params": torch_stage["params"], "mb": paths[name].stat().st_size / 1e6 + sum(
            f.stat().st_size for f in paths[name].parent.glob("*.data")) / 1e6,
               "ppl_lee": evaluate.perplexity(run, tok, lee), "ppl_wiki": evaluate.perplexity(run, tok, wiki),
               **fast.get(name, {}), "train_s": train}
        result[name] = row
        tps = row.get("tokens_per_s")
        table.add_row(name, f"{row['params']:,}", f"{row['mb']:.1f}", f"{row['ppl_lee']:.2f}", f"{row['ppl_wiki']:.2f}",
                      f"{tps:.1f}" if tps else "",
                      f"{tps / fast['teacher']['tokens_per_s']:.2f}x" if tps and "teacher" in fast else "",
                      f"{train:.0f}" if train else "")
    Console(width=170).print(table)
    return result


if __name__ == "__main__":
    main()
