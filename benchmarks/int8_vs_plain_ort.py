"""Our default recipe against the plain ORT path a user would take, from ONE run on this machine.

Plain path: legacy torch.onnx export of MiniLM -> onnxruntime.transformers optimize_model(bert)
-> quantize_dynamic with default options. Ours: `compress run -o OUT` (default recipe).
Prints latency (batch 1, seq 128, pinned threads, interleaved rounds), the ratio plain/ours,
bytes, Lee-50 Spearman, polarity-200 probe accuracy and held-out cosine against fp32 PyTorch.

    python benchmarks/int8_vs_plain_ort.py [--threads 2] [--runs 200] [--workdir /tmp/bench]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path



def plain_ort_int8(model_dir: Path, work: Path) -> Path:
    """What a user does by hand with torch.onnx + onnxruntime tools."""
    import onnx
    import torch
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager", trust_remote_code=False).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(1, 16, dtype=torch.int64)
    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "last_hidden_state")}
    torch.onnx.export(Wrapper().eval(), (ids, ids), str(work / "plain.onnx"), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"], dynamic_axes=axes)
    opt = optimize_model(str(work / "plain.onnx"), model_type="bert", num_heads=12, hidden_size=384)
    opt.save_model_to_file(str(work / "plain_opt.onnx"))
    quantize_dynamic(str(work / "plain_opt.onnx"), str(work / "plain_int8.onnx"),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return work / "plain_int8.onnx"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from compress import Pipeline, data, evaluate, models, runtime
    from compress.profiling import LatencySettings, real_feed, time_interleaved
    from compress.recipe import default_recipe_path

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-int8-"))
    shutil.rmtree(work / "ours", ignore_errors=True)
    model_dir = models.alias_path("minilm")
    console = Console(stderr=True)

    ours = Pipeline.from_recipe(default_recipe_path()).run("minilm", outdir=work / "ours", console=console)
    plain = plain_ort_int8(model_dir, work)

    teacher, tok, _ = models.load_hf(model_dir)
    eval_texts = data.load("wiki").eval
    runners = {"fp32 PyTorch": runtime.TorchRunner(teacher, "encoder"),
               "plain ORT int8": runtime.OnnxRunner(plain, "encoder", threads=args.threads),
               "compress int8": runtime.OnnxRunner(work / "ours" / "model.onnx", "encoder", threads=args.threads)}
    ref = evaluate.outputs(runners["fp32 PyTorch"], tok, eval_texts, 128)
    settings = LatencySettings(batch=1, seq=128, threads=args.threads, warmup=10, runs=args.runs)
    feed = real_feed(tok, eval_texts, 1, 128)
    # Two timings: the graph alone (session.run), and a sentence embedding per call, which for the
    # plain graph (hidden states only) includes the user's mean pooling in numpy.
    calls = {"fp32 PyTorch": lambda: runners["fp32 PyTorch"](feed)}
    for name in ("plain ORT int8", "compress int8"):
        r = runners[name]
        inputs = r.feed(feed)
        calls[name] = (lambda r=r, inputs=inputs: r.sess.run(None, inputs))
        calls[name + " embed"] = (lambda r=r: r(feed))
    lat = time_interleaved(calls, settings, rounds=10)
    sizes = {"fp32 PyTorch": ours.report["stages"][0]["bytes"], "plain ORT int8": plain.stat().st_size,
             "compress int8": (work / "ours" / "model.onnx").stat().st_size}

    rows = []
    for name, run in runners.items():
        fid = evaluate.fidelity("encoder", run, ref, tok, eval_texts, 128)
        embed = lat.get(name + " embed", lat[name])
        rows.append({"model": name, "p50_ms": lat[name]["p50"], "p90_ms": lat[name]["p90"], "embed_p50_ms": embed["p50"],
                     "bytes": sizes[name],
                     "lee50": evaluate.lee50(run, tok), "polarity": evaluate.polarity(run, tok),
                     "cosine": fid["cosine"], "cosine_min": fid["cosine_min"]})
    base, base_embed = lat["plain ORT int8"]["p50"], lat["plain ORT int8 embed"]["p50"]
    table = Table("model", "graph p50 ms", "p90 ms", "speed vs plain", "embedding p50 ms", "speed vs plain", "MB",
                  "Lee-50", "polarity", "held-out cos", "min cos",
                  title=f"MiniLM int8: batch 1, seq 128, {args.threads} threads, {args.runs} runs in 10 interleaved rounds")
    for r in rows:
        table.add_row(r["model"], f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{base / r['p50_ms']:.2f}x",
                      f"{r['embed_p50_ms']:.2f}", f"{base_embed / r['embed_p50_ms']:.2f}x",
                      f"{r['bytes'] / 1e6:.1f}", f"{r['lee50']:.4f}", f"{r['polarity']:.3f}", f"{r['cosine']:.4f}",
                      f"{r['cosine_min']:.4f}")
    Console(width=160).print(table)
    return rows


if __name__ == "__main__":
    main()
