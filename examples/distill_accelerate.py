"""Distillation with the same training loop as distill.kd, under `accelerate launch`.

The student is the teacher pruned one-shot (magnitude, half the heads and FFN neurons) unless
--student names a folder. Every process takes its share of each batch; gradients are averaged;
the main process writes the result. Single process:

    python examples/distill_accelerate.py --model minilm -o out/kd
Two CPU processes (or one per GPU):

    accelerate launch --num_processes 2 --cpu examples/distill_accelerate.py --model minilm -o out/kd
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="teacher: transformers folder or alias")
    ap.add_argument("--student", default=None, help="student folder (default: the teacher pruned one-shot)")
    ap.add_argument("--data", default=None, help="text / .jsonl file or built-in corpus (wiki, lee)")
    ap.add_argument("-o", "--output", required=True, help="output folder for the trained student")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--fast", action="store_true", help="a few short steps (for tests)")
    args = ap.parse_args(argv)

    from accelerate import PartialState
    from rich.console import Console

    from compress import data, models
    from compress.passes.lib import prunable
    from compress.passes.lib.losses import LossWeights
    from compress.passes.lib.trainer import TrainSettings, tokenized, train

    teacher, tokenizer, kind = models.load_hf(models.resolve(args.model))
    if args.student:
        student, _, _ = models.load_hf(Path(args.student))
    else:
        student = copy.deepcopy(teacher)
        fam, geo = prunable.family_of(student.config), prunable.Geometry.of(student.config)
        scores = {id(p): p.detach() ** 2 for p in student.parameters()}
        heads, ffn = prunable.unit_scores(student, fam, geo, scores)
        prunable.slice_model(student, fam, geo, prunable.top_masks(heads, ffn, math.ceil(geo.kv_heads / 2), geo.ffn // 2))
    steps, length = (6, 32) if args.fast else (args.steps, 128)
    text = data.load(args.data)
    settings = TrainSettings(steps=steps, batch_size=8, lr=1e-4, warmup=0.06, weight_decay=0.01, max_grad_norm=1.0,
                             seed=0, checkpoint_every=max(1, steps // 2))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    # The trainer creates the Accelerator (and so the process group); ask for the state only after.
    rank = int(os.environ.get("RANK", "0"))
    stats = train(student, teacher, kind, tokenized(tokenizer, text.train, length), settings, LossWeights(),
                  out, key="distill_accelerate", console=Console(stderr=True, quiet=rank != 0), label="distill")
    state = PartialState()
    if state.is_main_process:
        student.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        (out / "checkpoint.pt").unlink(missing_ok=True)
        (out / "train.json").write_text(json.dumps(stats, indent=2))
    state.wait_for_everyone()
    return stats


if __name__ == "__main__":
    main()
