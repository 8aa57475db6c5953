"""Train a distilled SmolLM2 student further: `distill.kd` for --steps more steps against the unpruned SmolLM2
teacher (a second warm-up and decay; --seed picks another order of the `mix` training windows), then
`export.onnx` + `quant.int4` (block 32), and the perplexity of the teacher's int4 graph, the student's
previous int4 graph (--previous, optional) and the new one on the first --ppl lee_background paragraphs
and on the wiki held-out samples that `mix` never trains on. How the 1200-step row of the README's
SmolLM2 depth table was made from the 600-step run of benchmarks/pruning_smollm2.py:

    python benchmarks/continue_kd_smollm2.py WORK/depth_plus_kd/stages/02-distill.kd/model --steps 600 --seed 1 \\
        --previous WORK/depth_plus_kd/model.onnx --out /tmp/smol1200
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from pruning_smollm2 import INT4, perplexity_texts  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", type=Path, help="a saved student (transformers folder with kept_layers in its config)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ppl", type=int, default=40, help="lee_background paragraphs for perplexity")
    ap.add_argument("--previous", type=Path, default=None, help="the student's earlier int4 model.onnx, measured too")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="a new folder for the student, the int4 graphs and result.json")
    args = ap.parse_args(argv)

    import torch

    from compress import Pipeline, data, evaluate, models, runtime
    from compress.passes import distill_kd

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=False)
    teacher, tok, _ = models.load_hf(models.alias_path("smollm2"))
    student, _, _ = models.load_hf(args.student)
    cfg = distill_kd.DistillKD(steps=args.steps, max_length=args.max_length, batch_size=args.batch_size, w_hidden=1.0,
                               seed=args.seed)
    notes: dict = {}
    t0 = time.perf_counter()
    trained = distill_kd.apply(student, teacher, tok, data.load("mix"), cfg, notes=notes, workdir=args.out / "ckpt")
    train_s = time.perf_counter() - t0
    trained.save_pretrained(args.out / "student")
    tok.save_pretrained(args.out / "student")
    del teacher, student, trained
    for name, src in (("teacher_int4", "smollm2"), ("student_int4", str(args.out / "student"))):
        Pipeline(["export.onnx", INT4]).run(src, "mix", args.out / name, tasks=False, measure="off")

    lee, wiki = perplexity_texts(args.ppl)
    graphs = {"teacher int4": args.out / "teacher_int4/model.onnx", "previous int4": args.previous,
              "student int4": args.out / "student_int4/model.onnx"}
    result: dict = {"train_s": round(train_s, 1), "distill": notes["distill"], "wiki_samples": len(wiki)}
    for name, path in graphs.items():
        if path is None:
            continue
        run = runtime.OnnxRunner(path, "causal-lm", threads=args.threads)
        result[name] = {"ppl_lee": evaluate.perplexity(run, tok, lee), "ppl_wiki": evaluate.perplexity(run, tok, wiki)}
        print(f"{name}: ppl lee {result[name]['ppl_lee']:.2f}  wiki {result[name]['ppl_wiki']:.2f}", flush=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
