"""Kind `image-classifier`: a plain torch module (a CNN: EfficientNet-Lite0, a VGG, ...) called as
`model(pixel_values)` on (batch, 3, H, W) float32, returning (batch, classes) logits.

It owns: image data instead of text (`ImageInputs`: the built-in photos or a folder of images,
sized for an exported graph's fixed H; batches of `pixel_values`; no tokenizer); fidelity as KL
and top-1 agreement with the teacher on held-out images; no task metrics; export.onnx as
`pixel_values -> logits` with a dynamic batch; saving and reloading a stage whose layers were
narrowed (images.save_module / load_module); distillation on random "function matching" views of
the training images, the student kept in eval mode (frozen BatchNorm statistics). The algorithms
(image loading, preprocessing, CNN save / load, matching views) stay in compress/images.py.
Detection: a torch module without a transformers config, or a graph with a `pixel_values` input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from compress.kinds.base import FALLBACK, NO, YES, Logits, LogitsOutput, ModelKind, TorchModule


@dataclass(frozen=True)
class ImageInputs:
    """Preprocessed images ((N, 3, H, W) float32, compress.images.ImageData); a feed is `pixel_values`."""

    uses_tokenizer: ClassVar[bool] = False
    default_data: ClassVar[str] = "photos"

    def load(self, spec: Any, model_path: Any = None) -> Any:
        from compress import images

        return images.load(spec or "photos", size=images.input_size(model_path))

    def batches(self, tokenizer: Any, samples: np.ndarray, max_length: int, batch_size: int = 16):
        from compress import images

        return images.batches(samples, batch_size)

    def latency_feed(self, tokenizer: Any, samples: np.ndarray, batch: int, seq: int) -> dict[str, np.ndarray]:
        from compress.profiling import image_feed

        return image_feed(samples, batch)

    def parity_feeds(self, tokenizer: Any, samples: np.ndarray, max_length: int) -> list[dict]:
        from compress.exporters.parity import image_feeds

        return image_feeds(samples)

    def calibration_feeds(self, tokenizer: Any, samples: np.ndarray, max_length: int, graph_inputs: Any) -> list[dict]:
        return [{"pixel_values": image[None]} for image in samples]

    def training_view(self, batch: dict, seed: int) -> dict:
        """A fresh random view of each photo, the same for teacher and student (images.matching_views)."""
        from compress.images import matching_views

        return {**batch, "pixel_values": matching_views(batch["pixel_values"], seed)}


class ImageClassifier(ModelKind):
    def torch_output(self, model: Any, feed: dict[str, np.ndarray], pooling: str = "mean") -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = model(torch.from_numpy(feed["pixel_values"]))
        return getattr(out, "logits", out).float().numpy()

    def train_forward(self, model: Any, batch: dict, attentions: bool) -> Any:
        out = model(batch["pixel_values"])
        return LogitsOutput(getattr(out, "logits", out))

    def export_onnx(self, state: Any, cfg: Any, ctx: Any) -> Any:
        from compress.exporters import onnx_export

        return onnx_export.export_pixels(state, cfg, ctx)

    def recognise_module(self, module: Any) -> int:
        return FALLBACK if getattr(module, "config", None) is None else NO

    def recognise_graph(self, inputs: list[str], outputs: list[tuple[str, tuple]]) -> int:
        return YES if "pixel_values" in inputs else NO


KIND = ImageClassifier(name="image-classifier", summary="CNN image classifier: pixel_values -> class logits",
                       inputs=ImageInputs(), fidelity=Logits(per_token=False), storage=TorchModule(),
                       train_in_eval_mode=True)
