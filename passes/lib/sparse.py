"""Unstructured and N:M sparsity of one Linear weight (N outputs, K inputs): which weights become exactly 0,
and what the others become.

- `magnitude`: the smallest |W| of the whole matrix (unstructured) or of every group of m consecutive input
  weights of a row (n:m), the classic baseline (Han et al. 2015, arXiv 1506.02626);
- `wanda`: |W_ij| * ||X_j||_2, compared within each output row (Sun et al., "A Simple and Effective Pruning
  Approach for Large Language Models", arXiv 2306.11695): an input channel that carries large activations
  keeps its weights; no weight update;
- `sparsegpt`: SparseGPT (Frantar & Alistarh, arXiv 2301.00774): columns are taken in order as in GPTQ; the
  mask of each block of 128 columns is chosen by w^2 / [H^-1]_jj^2 on the weights as earlier columns' errors
  left them (n:m: every m columns, per row), each pruned weight's error is moved onto the columns not yet
  pruned through the inverse Hessian's upper Cholesky factor, so the kept weights compensate.
H = X^T X / tokens, the layer's input Hessian on calibration tokens (passes/lib/gptq.Hessians)."""
from __future__ import annotations

import torch

from compress.passes.lib.gptq import Factored, factor


def _lowest(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the `fraction` lowest scores of each row of `score` (ties broken by position)."""
    count = int(score.shape[1] * fraction)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count:
        mask.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, True)
    return mask


def _n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the n lowest scores in every group of m consecutive columns of each row (K divisible by m)."""
    rows, k = score.shape
    groups = score.reshape(rows, k // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, k)


def mask(weight: torch.Tensor, method: str, sparsity: float, nm: tuple[int, int] | None = None,
         hessian: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) bool, True where a weight is pruned, for magnitude (the whole matrix compared) and wanda (each
    row compared; needs `hessian`). n:m (`nm`) ignores `sparsity` (it is n / m)."""
    score = weight.detach().abs().float()
    if method == "wanda":
        score = score * torch.diag(hessian).float().clamp(min=0).sqrt()[None]
    elif method != "magnitude":
        raise ValueError(f"mask(): {method} is not magnitude or wanda (sparsegpt chooses its mask while it prunes)")
    if nm is not None:
        return _n_of_m(score, *nm)
    if method == "magnitude":  # the whole matrix, one threshold
        return _lowest(score.reshape(1, -1), sparsity).reshape(score.shape)
    return _lowest(score, sparsity)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor | Factored, sparsity: float,
              nm: tuple[int, int] | None = None, percdamp: float = 0.01, block: int = 128) -> torch.Tensor:
    """SparseGPT of one (N, K) weight: the pruned weight (exact zeros where pruned, the others updated to
    compensate). Unstructured: `sparsity` of each block of `block` columns (all rows together, as the
    reference implementation) by w^2 / [H^-1]_jj^2; n:m: every m columns of each row lose their n lowest.
    Inputs never active (H's diagonal 0) get weight 0: they never reach the output."""
    n_rows, k = weight.shape
    if nm is not None:
        block = max(nm[1], block // nm[1] * nm[1])  # a block holds whole groups
    f = hessian if isinstance(hessian, Factored) else factor(hessian, percdamp)
    u = f.u
    w = weight.detach().double().clone()
    w[:, f.dead] = 0
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.zeros(n_rows, i2 - i1, dtype=w.dtype)
        u1 = u[i1:i2, i1:i2]
        d = torch.diag(u1)
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            score = (w1 ** 2 / d[None] ** 2).reshape(1, -1)
            pruned = _lowest(score, sparsity).reshape(w1.shape)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                cols = slice(i, i + nm[1])
                pruned[:, cols] = _n_of_m(w1[:, cols] ** 2 / d[cols][None] ** 2, *nm)
            q = w1[:, i].masked_fill(pruned[:, i], 0.0)
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None]
            w1[:, i] = q  # exactly: the update above leaves rounding noise on the pruned entries
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w.to(weight.dtype)


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); None or '' -> None. Raises ValueError naming the form expected."""
    if not text:
        return None
    n, sep, m = str(text).partition(":")
    try:
        pair = (int(n), int(m)) if sep else None
    except ValueError:
        pair = None
    if pair is None or not 0 < pair[0] < pair[1] <= 64:
        raise ValueError(f"pattern '{text}' is not n:m with 0 < n < m <= 64 (e.g. 2:4: two of every four weights "
                         "pruned)")
    return pair


__all__ = ["mask", "parse_nm", "sparsegpt"]
