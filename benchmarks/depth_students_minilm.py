"""Which layers a depth-pruned MiniLM should keep, what longer distillation buys, and what wider
training text buys: for each set of kept layers (--keep, one or more) and each training corpus
(--data: the built-in `mix`, or `wide` = mix + docstring prose of installed packages), the
teacher's other layers are sliced away and the student is distilled with distill.kd (frozen token
embeddings, 128-token windows), then compared with the fp32 teacher in torch: mean cosine of the
sentence embeddings (compress.evaluate.fidelity, as in the reports) on 64 held-out `mix` samples
(the same for both corpora), the 32 held-out docstring chunks of `wide`, and two domains no
training sample comes from: 64 chunks of the Python language reference (technical documentation,
like the docstrings) and 64 chunks of the installed packages' licence texts (legal English). One
line of JSON per student, then a table.

    python benchmarks/depth_students_minilm.py --keep 0,4,5 1,3,5 0,3,5 [--steps 300] [--lr 3e-4] [--data mix wide]
"""
from __future__ import annotations

import argparse
import copy
import json
import time


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", nargs="+", default=["0,4,5"], help="kept layers, comma-separated, one set per student")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=64, help="held-out and unseen-domain samples each")
    ap.add_argument("--data", nargs="+", default=["mix"], choices=["mix", "wide"], help="training corpora, one student each")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from compress import corpora, data, evaluate, models
    from compress.passes import distill_kd
    from compress.passes.lib import depth, prunable
    from compress.runtime import TorchRunner

    torch.set_num_threads(args.threads)
    teacher, tok, _ = models.load_hf(models.alias_path("minilm"))
    teacher.eval()
    mix, wide = data.load("mix"), data.load("wide")  # mix's held-out text and wide's docstrings are measured either way
    corpus = {"mix": mix, "wide": wide}
    docs = [t for t in wide.eval if t not in set(mix.eval)]
    licences = list(dict.fromkeys(data._chunks(" ".join(corpora.licence_prose()).split(), data.CHUNK_WORDS)))
    texts_of = {"mix held-out": list(mix.eval)[:args.samples], "docstrings held-out": docs[:args.samples],
                "unseen": data.unseen_domain()[:args.samples], "licences": licences[:args.samples]}
    sets = {name: (texts, evaluate.outputs(TorchRunner(teacher, "encoder"), tok, texts, 128, kind="encoder"))
            for name, texts in texts_of.items()}  # the teacher's embeddings, once

    def cosines(model) -> dict[str, float]:  # what every report's fidelity column measures
        return {name: round(evaluate.fidelity("encoder", TorchRunner(model, "encoder"), ref, tok, texts, 128)["cosine"], 4)
                for name, (texts, ref) in sets.items()}

    fam = prunable.family_of(teacher.config)
    results = []
    for keep_text, corpus_name in [(k, c) for k in args.keep for c in args.data]:
        keep = [int(x) for x in keep_text.split(",")]
        student = copy.deepcopy(teacher)
        depth.drop_layers(student, fam, [i for i in range(teacher.config.num_hidden_layers) if i not in keep])
        before = cosines(student)
        cfg = distill_kd.DistillKD(steps=args.steps, lr=args.lr, freeze_embeddings=True, max_length=128)
        notes: dict = {}
        t0 = time.perf_counter()
        trained = distill_kd.apply(student, teacher, tok, corpus[corpus_name], cfg, notes=notes, progress=False)
        row = {"keep": keep, "data": corpus_name, "steps": args.steps, "lr": args.lr, "one_shot": before,
               "trained": cosines(trained),
               "train_s": round(time.perf_counter() - t0), "tokens_seen": notes["distill"].get("tokens_seen")}
        print(json.dumps(row), flush=True)
        results.append(row)
    cols = list(texts_of)
    table = Table("kept layers", "data", "steps", "lr", "one-shot: " + " / ".join(cols), "trained: " + " / ".join(cols),
                  "train s", "tokens seen", title="MiniLM depth students, distill.kd (torch cosine against the fp32 teacher)")
    for r in results:
        table.add_row(",".join(map(str, r["keep"])), r["data"], str(r["steps"]), f"{r['lr']:g}",
                      " / ".join(f"{r['one_shot'][c]:.4f}" for c in cols),
                      " / ".join(f"{r['trained'][c]:.4f}" for c in cols), str(r["train_s"]), f"{r['tokens_seen']:,}")
    Console(width=160).print(table)
    return results


if __name__ == "__main__":
    main()
