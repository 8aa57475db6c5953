"""Parity checks: an exported or rewritten graph must reproduce its reference (PyTorch, or the
graph it was made from) on held-out real inputs, output by output, or the pass fails with a
per-output table (max abs diff, cosine, tolerances)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from compress.errors import OutputMatchError


def compare_outputs(name: str, ref: np.ndarray, got: np.ndarray, atol: float, min_cosine: float, rtol: float = 0.0) -> dict:
    """OK when max |got - ref| <= atol + rtol * max |ref| and the cosine is high enough."""
    if ref.shape != got.shape:
        return {"name": name, "max_abs_diff": float("inf"), "cosine": 0.0, "atol": atol,
                "min_cosine": min_cosine, "ok": False, "shape": f"{got.shape} != {ref.shape}"}
    ref64, got64 = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    diff = float(np.abs(ref64 - got64).max()) if ref64.size else 0.0
    denom = np.linalg.norm(ref64) * np.linalg.norm(got64)
    cos = float(ref64 @ got64 / denom) if denom > 0 else float(np.array_equal(ref64, got64))
    tol = atol + rtol * (float(np.abs(ref64).max()) if ref64.size else 0.0)
    return {"name": name, "max_abs_diff": diff, "cosine": cos, "atol": tol, "min_cosine": min_cosine,
            "ok": bool(diff <= tol and cos >= min_cosine)}


def check(what: str, reference: Callable[[dict], dict], candidate: Callable[[dict], dict], feeds: list[dict],
          atol: float, min_cosine: float, rtol: float = 0.0) -> list[dict]:
    """Run both on every feed; aggregate per output (worst diff, lowest cosine); raise on failure."""
    worst: dict[str, dict] = {}
    for feed in feeds:
        ref_out, got_out = reference(feed), candidate(feed)
        for name, ref in ref_out.items():
            if name not in got_out:
                row = {"name": name, "max_abs_diff": float("inf"), "cosine": 0.0, "atol": atol,
                       "min_cosine": min_cosine, "ok": False}
            else:
                row = compare_outputs(name, ref, got_out[name], atol, min_cosine, rtol)
            prev = worst.get(name)  # keep the worst row: a failure over a pass, then the largest diff
            if prev is None or (prev["ok"], row["max_abs_diff"]) > (row["ok"], prev["max_abs_diff"]):
                worst[name] = row
    rows = list(worst.values())
    if not all(r["ok"] for r in rows):
        raise OutputMatchError(what, rows)
    return rows


def feeds_from_texts(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """Two batches of different sizes and lengths, so dynamic axes are exercised (images, an (N, 3,
    H, W) array: batches of 2 and 3 images). (Passes ask the model's kind: `kind.inputs.parity_feeds`,
    which is one of the two below.)"""
    if isinstance(texts, np.ndarray):
        return image_feeds(texts)
    return text_feeds(tokenizer, texts, max_length)


def image_feeds(images: np.ndarray) -> list[dict]:
    """Batches of 2 and 3 of the (N, 3, H, W) images (repeated when fewer) as pixel_values."""
    return [{"pixel_values": np.ascontiguousarray(images[idx], dtype=np.float32)}
            for idx in (np.arange(2) % len(images), (2 + np.arange(3)) % len(images))]


def text_feeds(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """Two token batches of different sizes and lengths; random ids without a tokenizer."""
    from compress.runtime import tokenize

    if tokenizer is None:
        rng = np.random.default_rng(0)
        out = []
        for b, s in ((2, 16), (3, 37)):
            ids = rng.integers(5, 100, size=(b, s), dtype=np.int64)
            out.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return out
    texts = texts or ["a short sample sentence for parity checks."]
    first, second = texts[:4], texts[4:7] or texts[:3]
    return [tokenize(tokenizer, first, max_length), tokenize(tokenizer, [t[:200] for t in second], max_length)]
