"""Build the real-weight MoE benchmark fixture: SmolLM2-135M MoEfied into a transformers Mixtral
model (each FFN of 1536 neurons split into 8 experts of 192, top-2 routing, routers trained on
real hidden states, then each layer's experts refitted block by block to the dense FFN on the MoE's
own hidden states, then the experts and routers distilled end to end from the dense model's logits).
See passes/lib/moefy.py and passes/lib/moefy_refit.py for the method and the measured errors.

    python examples/moefy_smollm2.py --out out/smollm2-moe --threads 1     # 8 experts, top-2, seed 0
    python examples/moefy_smollm2.py --out out/x --kd-steps 0              # no distillation (refit only)
    python examples/moefy_smollm2.py --out out/x --recon-steps 100         # + Adam after the refit
    python examples/moefy_smollm2.py --out out/x --no-reconstruction --kd-steps 0   # routers only
    python examples/moefy_smollm2.py --model path/to/llama_folder --out out/x --fast   # seconds

Measured (seed 0, 1 thread on 2 busy cores; 20 lee_background paragraphs, dense 34.35): routers
only ppl 1894 (12 min); + least-squares down_proj refit, ridge 1e-3: 468 (+4 min); ridge 1e-2 (the
default): 436 (+1.5 min); ridge 1e-2 + 100 Adam steps: 412 (+12 min). With 2 threads on cores
other jobs use, small matrix work ran ~10x slower than with 1 (50 Adam steps of a block: 11.8 s vs
0.75 s): use --threads 1 there. With the distillation (the default since; 150 steps of 4 x 128
tokens, lr 3e-4), `--out /tmp/moe_s4/fixture --threads 1 --kd-steps 150`: 474.4 before it (this
build's refit; an earlier build gave the 436 above) -> 230.5 after, 759 s of distillation, 1038 s
(17 min) in all.

Prints parameters, held-out perplexity (the first --ppl-paragraphs lee_background paragraphs, 256
tokens at most each, never in the wiki training text) of the dense model and of the reloaded MoE
(and of the MoE before the distillation), the router's block-output errors, the distillation's
loss and the wall time. The model lands in OUT/model."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def _args(argv: list[str] | None) -> argparse.Namespace:
    from compress.passes.lib.moefy_refit import Distillation, Reconstruction

    R, D = Reconstruction(), Distillation()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="dense Llama-family folder or alias (default smollm2)")
    ap.add_argument("--data", default="wiki", help="training text (routers, refit, distillation): built-in corpus or text file")
    ap.add_argument("-o", "--out", "--output", dest="out", required=True, help="output directory")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer (must divide the FFN width)")
    ap.add_argument("--top-k", type=int, default=2, help="experts chosen per token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--router-steps", type=int, default=300, help="Adam steps per layer's router (half CE, half MSE)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens per layer (20%% held out)")
    ap.add_argument("--cluster-on", choices=("activations", "weights"), default="activations")
    ap.add_argument("--recon-steps", type=int, default=R.steps, help="Adam steps per layer of block-wise reconstruction "
                    "after the least-squares down_proj refit (0: refit only)")
    ap.add_argument("--no-reconstruction", action="store_true", help="routers only: experts stay exact FFN slices")
    ap.add_argument("--recon-tokens", type=int, default=R.tokens, help="training tokens of the reconstruction")
    ap.add_argument("--recon-lr", type=float, default=R.lr)
    ap.add_argument("--recon-target", choices=("ffn", "residual"), default=R.target)
    ap.add_argument("--ridge", type=float, default=R.ridge, help="ridge of the least-squares down_proj refit")
    ap.add_argument("--kd-steps", type=int, default=D.steps, help="end-to-end logit distillation from the dense model "
                    "after the refit: AdamW steps (0: off)")
    ap.add_argument("--kd-batch", type=int, default=D.batch, help=f"distillation rows of {D.seq_len} tokens per step")
    ap.add_argument("--kd-lr", type=float, default=D.lr, help="distillation peak learning rate")
    ap.add_argument("--kd-shared", action="store_true", help="distillation also trains attention, norms, embeddings")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (on busy cores 1 was ~10x faster than 2)")
    ap.add_argument("--ppl-paragraphs", type=int, default=20, help="lee_background paragraphs for perplexity")
    ap.add_argument("--fast", action="store_true", help="few tokens, steps and paragraphs (for tests)")
    args = ap.parse_args(argv)
    if args.fast:
        args.router_steps, args.max_tokens, args.ppl_paragraphs = min(args.router_steps, 20), 256, 4
        args.recon_steps, args.recon_tokens = min(args.recon_steps, 20), 1024
        args.kd_steps, args.kd_batch = min(args.kd_steps, 4), min(args.kd_batch, 2)
    return args


def _reconstruction(args):
    from compress.passes.lib.moefy import Reconstruction

    if args.no_reconstruction:
        return None
    return Reconstruction(steps=args.recon_steps, tokens=args.recon_tokens, seq_len=32 if args.fast else 128,
                          lr=args.recon_lr, target=args.recon_target, ridge=args.ridge)


def _distillation(args):
    from compress.passes.lib.moefy_refit import Distillation

    return Distillation(steps=args.kd_steps, batch=args.kd_batch, seq_len=32 if args.fast else 128, lr=args.kd_lr,
                        shared=args.kd_shared)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _active_params(moe_model) -> int:
    """Parameters one token uses: everything except the unchosen experts' weights."""
    cfg = moe_model.config
    experts = sum(p.numel() for n, p in moe_model.named_parameters() if ".experts." in n)
    return _params(moe_model) - experts + experts * cfg.num_experts_per_tok // cfg.num_local_experts


def _perplexity(model, tokenizer, paragraphs: int, max_length: int) -> float:
    from compress.data import lee_background
    from compress.evaluate import perplexity
    from compress.runtime import TorchRunner

    return perplexity(TorchRunner(model, "causal-lm"), tokenizer, lee_background()[:paragraphs], max_length)


def main(argv: list[str] | None = None) -> dict:
    import torch
    from compress.data import load
    from compress.models import load_hf, resolve
    from compress.passes.lib.moefy import MoefyReport, moefy
    from compress.passes.lib.moefy_refit import distill_moe

    args, start = _args(argv), time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    dense, tokenizer, _ = load_hf(resolve(args.model))
    report, texts, max_length = MoefyReport(), load(args.data).train, 64 if args.fast else 256
    moe_model = moefy(dense, texts, tokenizer, experts=args.experts, top_k=args.top_k,
                      router_steps=args.router_steps, max_length=32 if args.fast else 128, seed=args.seed,
                      max_tokens=args.max_tokens, cluster_on=args.cluster_on, reconstruction=_reconstruction(args),
                      report=report)
    kd = {}
    if args.kd_steps > 0:  # as moefy(distillation=...) does, with the perplexity before it measured
        kd = {"ppl_before_kd": _perplexity(moe_model, tokenizer, args.ppl_paragraphs, max_length),
              "kd_start_s": time.perf_counter() - start}
        kd.update({f"kd_{k}": v for k, v in distill_moe(dense, moe_model, tokenizer, texts, _distillation(args),
                                                          args.seed).items() if k != "final_parts"})
    folder = Path(args.out) / "model"
    moe_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded, _, _ = load_hf(folder)  # AutoModelForCausalLM.from_pretrained, eager attention like the dense model
    ids = torch.tensor([tokenizer("The router picks two experts per token.")["input_ids"]])
    with torch.no_grad():
        reload_diff = float((reloaded(input_ids=ids).logits - moe_model(input_ids=ids).logits).abs().max())
    result = {
        "out": str(folder), "experts": args.experts, "top_k": args.top_k, "seed": args.seed,
        "params_dense": _params(dense), "params_moe": _params(reloaded), "params_active": _active_params(reloaded),
        "ppl_paragraphs": args.ppl_paragraphs, "ppl_max_length": max_length,
        "ppl_dense": _perplexity(dense, tokenizer, args.ppl_paragraphs, max_length),
        "ppl_moe": _perplexity(reloaded, tokenizer, args.ppl_paragraphs, max_length),
        **kd, "calibration_tokens": report.tokens, "router_steps": args.router_steps,
        **{f"mean_{k}": report.mean(k) for k in ("error_init", "error_ce", "error_final", "error_oracle", "block_before",
                                                  "block_refit", "block_after") if k in report.layers[0]},
        "final_loss": report.mean("final_loss"), "all_experts_max_diff": report.all_experts_max_diff,
        "reload_max_diff": reload_diff, "layers": report.layers, "wall_s": time.perf_counter() - start,
    }
    _print(result)
    return result


def _print(r: dict) -> None:
    print(f"saved {r['out']}: Mixtral, {r['experts']} experts, top-{r['top_k']}, seed {r['seed']}")
    print(f"params: dense {r['params_dense']:,}  moe {r['params_moe']:,}  active per token {r['params_active']:,}")
    print(f"perplexity on {r['ppl_paragraphs']} lee_background paragraphs (<= {r['ppl_max_length']} tokens): "
          f"dense {r['ppl_dense']:.2f}  moe {r['ppl_moe']:.2f}")
    print(f"relative block-output error (held-out tokens, mean over layers; {r['calibration_tokens']} calibration "
          f"tokens, {r['router_steps']} steps): random router {r['mean_error_init']:.3f}  after CE "
          f"{r.get('mean_error_ce', float('nan')):.3f}  after MSE {r['mean_error_final']:.3f}  "
          f"norm-oracle {r['mean_error_oracle']:.3f}")
    if "mean_block_after" in r:
        print(f"block-wise reconstruction (held-out tokens of the MoE's own stream, target dense FFN): before "
              f"{r['mean_block_before']:.3f}  after least-squares down_proj {r.get('mean_block_refit', float('nan')):.3f}  "
              f"after Adam {r['mean_block_after']:.3f}")
    if "kd_steps" in r:
        print(f"end-to-end distillation ({r['kd_steps']} steps, {r['kd_rows']} packed rows, {r['kd_seconds']:.0f} s): "
              f"logit KL {r['kd_first_loss']:.3f} -> {r['kd_final_loss']:.3f} (training loss, moving average); "
              f"perplexity {r['ppl_before_kd']:.2f} -> {r['ppl_moe']:.2f}")
    for i, row in enumerate(r["layers"]):
        print(f"  layer {i:2d}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    print(f"all-experts parity max |logit diff| {r['all_experts_max_diff']:.2e}; reload max |logit diff| "
          f"{r['reload_max_diff']:.2e}; wall {r['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
