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
loss and the wall time. The model lands in OUT/model. The fixture itself is `compress.fixtures.smollm2_moe`
(the tests and the MoE benchmark import it); this is its command line."""
from __future__ import annotations

import argparse


def _options(argv: list[str] | None):
    from compress.fixtures.smollm2_moe import Options
    from compress.passes.lib.moefy_refit import Distillation, Reconstruction

    O, R, D = Options(), Reconstruction(), Distillation()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=O.model, help="dense Llama-family folder or alias (default smollm2)")
    ap.add_argument("--data", default=O.data, help="training text (routers, refit, distillation): built-in corpus or text file")
    ap.add_argument("-o", "--out", "--output", dest="out", required=True, help="output directory")
    ap.add_argument("--experts", type=int, default=O.experts, help="experts per layer (must divide the FFN width)")
    ap.add_argument("--top-k", type=int, default=O.top_k, help="experts chosen per token")
    ap.add_argument("--seed", type=int, default=O.seed)
    ap.add_argument("--router-steps", type=int, default=O.router_steps, help="Adam steps per layer's router (half CE, half MSE)")
    ap.add_argument("--max-tokens", type=int, default=O.max_tokens, help="calibration tokens per layer (20%% held out)")
    ap.add_argument("--cluster-on", choices=("activations", "weights"), default=O.cluster_on)
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
    ap.add_argument("--ppl-paragraphs", type=int, default=O.ppl_paragraphs, help="lee_background paragraphs for perplexity")
    ap.add_argument("--fast", action="store_true", help="few tokens, steps and paragraphs (for tests)")
    a = ap.parse_args(argv)
    recon = None if a.no_reconstruction else Reconstruction(steps=a.recon_steps, tokens=a.recon_tokens, lr=a.recon_lr,
                                                            target=a.recon_target, ridge=a.ridge)
    options = Options(model=a.model, data=a.data, experts=a.experts, top_k=a.top_k, seed=a.seed,
                      router_steps=a.router_steps, max_tokens=a.max_tokens, cluster_on=a.cluster_on,
                      reconstruction=recon, threads=a.threads, ppl_paragraphs=a.ppl_paragraphs,
                      distillation=Distillation(steps=a.kd_steps, batch=a.kd_batch, lr=a.kd_lr, shared=a.kd_shared))
    return a.out, options.fast() if a.fast else options


def main(argv: list[str] | None = None) -> dict:
    from compress.fixtures.smollm2_moe import build, print_summary

    out, options = _options(argv)
    result = build(out, options)
    print_summary(result)
    return result


if __name__ == "__main__":
    main()
