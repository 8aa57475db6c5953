"""Where a distillation step's time goes, and what each speed-up buys (MiniLM, prune.homodistil's loop).

Part 1 times the parts of one training step of prune.homodistil (heads 0.5, ffn 0.5) on real
training text: teacher forward, student forward, losses, backward, PLATON's importance update,
optimizer step, mask refresh. Part 2 runs the real training loop (passes/lib/trainer.train) under
each setting for the same number of steps, interleaved in rounds so machine noise hits every
setting alike, and prints steps per second and tokens per second against the baseline.

    python benchmarks/distill_speed.py [--steps 20] [--rounds 2] [--threads 2] [--data mix]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from compress import data as data_mod
from compress import kinds
from compress.models import alias_path, load_hf
from compress.passes.lib import prunable
from compress.passes.lib.losses import distill_loss
from compress.passes.lib.trainer import attention_for_training, tokenized, train, trim_padding
from compress.passes.prune_homodistil import HomoDistil, Platon


def _timer() -> dict[str, float]:
    return {k: 0.0 for k in ("teacher forward", "student forward", "losses", "backward", "importance (PLATON)",
                             "optimizer", "masks")}


def breakdown(model, tokenizer, texts: list[str], steps: int, max_length: int, batch: int, trim: bool) -> dict[str, float]:
    """Seconds per step of each part of the homodistil step (after 3 warm-up steps)."""
    kind = kinds.get("encoder")
    cfg = HomoDistil(steps=steps + 3, heads=0.5, ffn=0.5, batch_size=batch, max_length=max_length,
                     initial_warmup=0.0, final_phase=0.0, mask_every=1)
    student, teacher = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
    fam, geo = prunable.family_of(student.config), prunable.Geometry.of(student.config)
    platon = Platon(student, cfg, fam, geo)
    weights = cfg.loss_weights()
    data = tokenized(tokenizer, texts, max_length)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times, tokens = _timer(), 0
    with attention_for_training([student, teacher], False):
        for step in range(steps + 3):
            b = {k: v[step * batch:(step + 1) * batch] for k, v in data.items()}
            b = trim_padding(b) if trim else b
            marks = [time.perf_counter()]
            with torch.no_grad():
                t_out = kind.train_forward(teacher, b, False)
            marks.append(time.perf_counter())
            s_out = kind.train_forward(student, b, False)
            marks.append(time.perf_counter())
            loss, _ = distill_loss(kind, s_out, t_out, b["attention_mask"], weights, None, None, b["input_ids"])
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            platon.after_backward(step, student)
            marks.append(time.perf_counter())
            opt.step()
            opt.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            platon.after_step(step, student)
            marks.append(time.perf_counter())
            if step >= 3:
                tokens += int(b["attention_mask"].sum())
                for key, a, z in zip(times, marks, marks[1:]):
                    times[key] += (z - a) / steps
    times["real tokens per step"] = tokens / steps
    return times


SETTINGS = {  # name -> HomoDistil fields; the baseline is today's loop at 64 tokens
    "baseline (padded to 64, batch 16)": {},
    "trimmed padding": {"trim": True},
    "trimmed + frozen embeddings": {"trim": True, "freeze_embeddings": True},
    "trimmed + frozen + batch 32": {"trim": True, "freeze_embeddings": True, "batch_size": 32},
}


def end_to_end(model, tokenizer, texts: list[str], steps: int, rounds: int, max_length: int, console: Console) -> dict:
    """Steps/s and real tokens/s of trainer.train under each setting, interleaved over `rounds`."""
    from compress.passes.lib import trainer

    results = {name: {"seconds": 0.0, "steps": 0, "tokens": 0} for name in SETTINGS}
    data = tokenized(tokenizer, texts, max_length)
    plain_trim = trainer.trim_padding
    for _ in range(rounds):
        for name, extra in SETTINGS.items():
            extra = dict(extra)
            trim = extra.pop("trim", False)
            trainer.trim_padding = plain_trim if trim else (lambda b: b)
            cfg = HomoDistil(steps=steps, heads=0.5, ffn=0.5, max_length=max_length, checkpoint_every=10_000,
                             initial_warmup=0.0, final_phase=0.0, mask_every=10, **extra)
            student, teacher = copy.deepcopy(model), copy.deepcopy(model).eval()
            fam, geo = prunable.family_of(student.config), prunable.Geometry.of(student.config)
            with tempfile.TemporaryDirectory() as work:
                stats = train(student, teacher, "encoder", data, cfg.settings(), cfg.loss_weights(), Path(work), "speed",
                              Console(quiet=True), Platon(student, cfg, fam, geo))
            bs = cfg.batch_size
            seen = sum(int(trim_padding({k: v[i * bs:(i + 1) * bs] for k, v in data.items()})["attention_mask"].sum())
                       for i in range(steps))
            results[name]["seconds"] += stats["seconds"]
            results[name]["steps"] += steps
            results[name]["tokens"] += seen
            console.print(f"  {name}: {steps / stats['seconds']:.2f} steps/s")
    trainer.trim_padding = plain_trim
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--data", default="mix")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    model, tokenizer, _ = load_hf(alias_path("minilm"))
    texts = data_mod.load(args.data).train
    console.print(f"MiniLM, {args.data} training text ({len(texts)} samples), {args.max_length} tokens, "
                  f"{args.threads} threads")
    for trim in (False, True):
        parts = breakdown(model, tokenizer, texts, args.steps, args.max_length, 16, trim)
        total = sum(v for k, v in parts.items() if k != "real tokens per step")
        console.print(f"\n### One step, batch 16{', padding trimmed' if trim else ''}: {total * 1000:.0f} ms, "
                      f"{parts['real tokens per step']:.0f} real tokens\n")
        console.print("| part | ms | share |\n|---|---|---|")
        for key, value in parts.items():
            if key != "real tokens per step":
                console.print(f"| {key} | {value * 1000:.1f} | {value / total:.0%} |")
    console.print("\n### The training loop under each setting (interleaved)\n")
    results = end_to_end(model, tokenizer, texts, args.steps, args.rounds, args.max_length, console)
    base = results[next(iter(SETTINGS))]
    base_rate = base["steps"] / base["seconds"]
    console.print("| setting | steps/s | real tokens/s | speed-up (steps) |\n|---|---|---|---|")
    for name, r in results.items():
        rate = r["steps"] / r["seconds"]
        console.print(f"| {name} | {rate:.2f} | {r['tokens'] / r['seconds']:.0f} | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    main()
