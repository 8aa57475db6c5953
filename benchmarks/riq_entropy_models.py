"""Would a context-dependent entropy model make `.riq` files smaller? Measured on the codes of a real file.

export.riq codes each tensor under one i.i.d. categorical model (its own code histogram), so a tensor costs
its empirical entropy H0. A per-row or per-column model would pay off if the codes' spread changes along
rows or columns (row norms, outlier input channels). For every coded tensor of the file this prints the
ideal code length, in bits per weight, of:
  H0          the format's model (empirical entropy of the tensor's codes; the table is not counted)
  laplace     one discretised Laplace / Gaussian (whichever is shorter) fitted to the tensor
  rows        a Laplace / Gaussian scale per output row (one float per row, not counted)
  columns     a scale per input column
  rows x cols a scale per element, row scale x column scale / tensor scale (separable variance)
and, over the whole file, the best of them per tensor against H0. Models whose side information is not
counted are optimistic: a gain of a few percent would not survive it.

    python benchmarks/riq_entropy_models.py MODEL.riq
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def empirical_bits(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def parametric_bits(codes: np.ndarray, scale: np.ndarray) -> float:
    """Ideal length of integer codes under a discretised Laplace and under a Gaussian of the same mean absolute
    value (per element `scale` = E|x|), whichever is shorter."""
    from scipy.stats import laplace, norm

    x = codes.astype(np.float64)
    b = np.maximum(np.broadcast_to(scale, x.shape), 1e-3)
    best = np.inf
    for cdf, s in ((laplace.cdf, b), (norm.cdf, b * np.sqrt(np.pi / 2))):
        p = cdf(x + 0.5, scale=s) - cdf(x - 0.5, scale=s)
        best = min(best, float(-np.log2(np.maximum(p, 1e-300)).sum()))
    return best


def models(codes: np.ndarray) -> dict[str, float]:
    c = codes.reshape(codes.shape[0], -1)
    a = np.abs(c).astype(np.float64)
    mean, rows, cols = a.mean(), a.mean(1, keepdims=True), a.mean(0, keepdims=True)
    return {"H0": empirical_bits(c), "laplace": parametric_bits(c, np.full((1, 1), mean)),
            "rows": parametric_bits(c, rows), "columns": parametric_bits(c, cols),
            "rows x cols": parametric_bits(c, rows * cols / max(mean, 1e-12))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("riq", type=Path)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from compress.exporters import riq_format

    tensors, _ = riq_format.read(args.riq)
    coded = [t for t in tensors if isinstance(t, riq_format.CodedTensor) and len(t.shape) > 1]
    names = ["H0", "laplace", "rows", "columns", "rows x cols"]
    table = Table("tensor", "shape", *names, title=f"{args.riq.name}: ideal bits per weight under each model")
    totals = dict.fromkeys([*names, "best"], 0.0)
    weights = 0
    for t in coded:
        bits = models(t.codes)
        n = t.codes.size
        table.add_row(t.name, "x".join(map(str, t.shape)), *(f"{bits[k] / n:.3f}" for k in names))
        for k in names:
            totals[k] += bits[k]
        totals["best"] += min(bits.values())
        weights += n
    table.add_row("all coded matrices", f"{weights:,}", *(f"{totals[k] / weights:.3f}" for k in names))
    console = Console(width=150)
    console.print(table)
    console.print(f"best model per tensor: {totals['best'] / weights:.3f} bits/weight against the format's "
                  f"{totals['H0'] / weights:.3f} ({1 - totals['best'] / totals['H0']:.1%} smaller, side information "
                  "not counted)")
    return {k: v / weights for k, v in totals.items()}


if __name__ == "__main__":
    main()
