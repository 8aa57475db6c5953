"""Error-compensating rounding (GPTQ, Frantar et al., arXiv 2210.17323) onto any grid, and the block grid
onnxruntime's MatMulNBits reads.

A Linear's weight W (N outputs, K inputs) sees inputs X; the output error of a rounded W' is
tr((W - W') H (W - W')^T) with H = X^T X / tokens. GPTQ rounds one input column at a time and moves
that column's rounding error onto the columns not rounded yet, weighted by the inverse Hessian (its
upper Cholesky factor), so later columns absorb what earlier ones lost. The grid is a parameter:
`BlockGrid` (blocks of `group` input weights at `bits` bits, a scale per block and row, searched to minimise
the activation-weighted error: llama.cpp's importance-matrix idea) or any object with the same two methods
(RIQ's uniform bins: passes/riq.py). `Hessians` collects H for Linear and Conv2d layers on calibration
inputs; `gptq` rounds one weight; `rtn` is the same grid without error feedback (the baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Grid(Protocol):
    """Where the weights of one group of input columns may go. `fit(w, importance)` (w: (N, g) the
    group's current weights, importance: (g,) how much each column's error costs) returns the group's
    parameters; `round(w, params)` maps (N,) or (N, g) weights onto the grid (their dequantized values)."""

    group: int

    def fit(self, w: torch.Tensor, importance: torch.Tensor) -> tuple: ...

    def round(self, w: torch.Tensor, params: tuple) -> torch.Tensor: ...


@dataclass(frozen=True)
class BlockGrid:
    """MatMulNBits' grid: codes 0 .. 2^bits - 1, value = scale * (code - zero point), one scale (and zero
    point) per row and block of `group` input columns. Symmetric: the zero point is 2^(bits-1) and the
    scale may be negative (the block's extreme may sit on either end, as onnxruntime's own quantizer
    does). The scale is searched over `candidates` clipping ratios from 1 down to `lowest` (1 candidate =
    no clipping: the block's min / max), keeping per row the one with the least
    importance-weighted squared error. Symmetric blocks try the extreme on either end even with one
    candidate (onnxruntime's quantizer puts it on code 0 only)."""

    bits: int = 4
    group: int = 32
    symmetric: bool = True
    candidates: int = 20
    lowest: float = 0.6

    @property
    def top(self) -> int:
        return 2 ** self.bits - 1

    def _ratios(self) -> torch.Tensor:
        return torch.linspace(1.0, self.lowest, self.candidates) if self.candidates > 1 else torch.ones(1)

    def _trials(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, N) candidate scales and zero points for the rows of w (N, g)."""
        ratios = self._ratios().to(w)[:, None]
        if self.symmetric:
            mid = 2 ** (self.bits - 1)
            extreme = w.gather(1, w.abs().argmax(1, keepdim=True))[:, 0]  # signed value of largest magnitude
            # the extreme on the long (negative) end, -mid * scale, or on the short one, (mid - 1) * scale
            scales = torch.cat([extreme / -mid * ratios, extreme / (mid - 1) * ratios])
            return _nonzero(scales), torch.full_like(scales, float(mid))
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        scales = _nonzero((hi - lo) * ratios / self.top)
        zeros = torch.round(-lo * ratios / scales).clamp(0, self.top)
        return scales, zeros

    def fit(self, w: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scales, zeros = self._trials(w)  # (C, N)
        values = self._value(w[None], scales[..., None], zeros[..., None])  # (C, N, g)
        err = ((values - w[None]) ** 2 * importance.to(w)).sum(-1)  # (C, N)
        best = err.argmin(0)
        rows = torch.arange(w.shape[0], device=w.device)
        return scales[best, rows], zeros[best, rows]

    def _value(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(torch.round(w / scale) + zero, 0, self.top) - zero) * scale

    def round(self, w: torch.Tensor, params: tuple) -> torch.Tensor:
        scale, zero = params
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return self._value(w, scale, zero)


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    """An all-zero block gets scale 1 (its codes are the zero point either way)."""
    return torch.where(scales == 0, torch.ones_like(scales), scales)


@dataclass
class Rounded:
    """A rounded weight (N, K) and each group's grid parameters, in input-column order."""

    weight: torch.Tensor
    params: list[tuple]


def _damped(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H with dead inputs (never active: diagonal 0) set to 1 and percdamp x mean diagonal added; and
    the mask of dead inputs (their weights are zeroed: they never reach the output)."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += torch.eye(len(h), dtype=h.dtype) * percdamp * torch.diag(h).mean()
    return h, dead


def _inverse_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, raising the dampening until H is positive definite."""
    for attempt in range(6):
        try:
            inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            h = h + torch.eye(len(h), dtype=h.dtype) * percdamp * torch.diag(h).mean() * 10 ** attempt
    raise ValueError("the calibration Hessian is not positive definite even with strong dampening: give more "
                     "calibration text (samples / max_length)")


@dataclass(frozen=True)
class Factored:
    """What GPTQ needs of a Hessian, whatever the weight and grid: the damped diagonal (importance), the dead
    inputs and the upper Cholesky factor of H^-1. One per layer serves every rounding of it (RIQ's k search)."""

    importance: torch.Tensor
    dead: torch.Tensor
    u: torch.Tensor


def factor(hessian: torch.Tensor, percdamp: float = 0.01) -> Factored:
    """H damped (`_damped`) and its inverse's upper Cholesky factor, for `gptq`."""
    h, dead = _damped(hessian, percdamp)
    return Factored(torch.diag(h).float(), dead, _inverse_factor(h, percdamp))


def gptq(weight: torch.Tensor, hessian: torch.Tensor | Factored, grid: Grid, percdamp: float = 0.01, block: int = 128,
         zeros: torch.Tensor | None = None) -> Rounded:
    """GPTQ of one (N, K) weight onto `grid` given its (K, K) input Hessian, or that Hessian's `factor`
    (reused across roundings; `percdamp` is then the factor's). Each group's grid parameters are fitted
    on the group's weights as the earlier columns' errors have left them (importance: H's diagonal);
    columns are taken in order (groups stay contiguous, as MatMulNBits' blocks are).
    `zeros` (N, K) bool: weights that stay exactly 0 (pruned: SparseGPT's mask), their error fed forward too."""
    n, k = weight.shape
    g = grid.group
    block = max(g, block // g * g)  # a lazy-update block holds whole groups
    f = hessian if isinstance(hessian, Factored) else factor(hessian, percdamp)
    importance, dead, u = f.importance, f.dead, f.u
    w = weight.detach().double().clone()
    w[:, dead] = 0
    out = torch.zeros_like(w)
    params: list[tuple] = []
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i % g == 0:
                cols = slice(i, min(i + g, i2 - i1))
                params.append(grid.fit(w1[:, cols].float(), importance[i1 + cols.start:i1 + cols.stop]))
            q = grid.round(w1[:, i].float(), params[-1]).double()
            if zeros is not None:
                q = q.masked_fill(zeros[:, i1 + i], 0.0)
            out[:, i1 + i] = q
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return Rounded(out.float(), params)


def rtn(weight: torch.Tensor, grid: Grid, importance: torch.Tensor | None = None) -> Rounded:
    """Round to nearest onto `grid`, each group fitted on its own weights (weighted by `importance`
    per input column when given: diag(H))."""
    n, k = weight.shape
    imp = torch.ones(k) if importance is None else importance.float()
    w, out, params = weight.detach().float(), torch.empty(n, k), []
    for c in range(0, k, grid.group):
        cols = slice(c, min(c + grid.group, k))
        params.append(grid.fit(w[:, cols], imp[cols]))
        out[:, cols] = grid.round(w[:, cols], params[-1])
    return Rounded(out, params)


def block_codes(rounded: Rounded, grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (N, K), scales float32 (N, K/group), zero points uint8 (N, K/group)) of a weight rounded
    onto a BlockGrid: what MatMulNBits stores (passes/lib/quantized.dequantize gives the weight back)."""
    scales = torch.stack([p[0] for p in rounded.params], 1).float()
    zeros = torch.stack([p[1] for p in rounded.params], 1)
    k = rounded.weight.shape[1]
    s_full = scales.repeat_interleave(grid.group, 1)[:, :k]
    z_full = zeros.repeat_interleave(grid.group, 1)[:, :k]
    codes = torch.clamp(torch.round(rounded.weight / s_full) + z_full, 0, grid.top)
    return codes.to(torch.uint8), scales.contiguous(), zeros.to(torch.uint8)


def columns_of(module: torch.nn.Module) -> int:
    """Input columns of a layer's weight seen as a matrix: a Linear's in_features, a Conv2d's
    in_channels / groups x kernel height x kernel width (its weight reshaped to (out, -1))."""
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


def _rows(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its weight's columns: a Conv2d's input unfolded into patches (one row
    per output position; grouped convolutions: the groups' patches stacked, each group's own H summed)."""
    if isinstance(module, torch.nn.Conv2d):
        patches = torch.nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        g, cols = module.groups, columns_of(module)
        return patches.view(x.shape[0], g, cols, -1).permute(0, 1, 3, 2).reshape(-1, cols)
    return x.reshape(-1, x.shape[-1])


class Hessians:
    """Accumulates H = X^T X / rows of the inputs of Linear (and Conv2d: patches) layers with forward hooks, on
    the CPU in float64. `root`: the model the calibration batches go into; the `attention_mask` it is called
    with keeps padding tokens out of H (a Linear's input of shape (batch, seq, features) is masked)."""

    def __init__(self, linears: dict[str, torch.nn.Module], root: torch.nn.Module | None = None):
        self.sums = {name: torch.zeros(columns_of(m), columns_of(m), dtype=torch.float64) for name, m in linears.items()}
        self.count = dict.fromkeys(linears, 0)
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]
        if root is not None:
            self.handles.append(root.register_forward_pre_hook(self._batch, with_kwargs=True))

    def _batch(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = None if mask is None else torch.as_tensor(mask).bool()

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach()
            if self.mask is not None and isinstance(module, torch.nn.Linear) and x.shape[:-1] == self.mask.shape:
                x = x[self.mask.to(x.device)]  # real tokens only
            x = _rows(module, x).double().cpu()
            self.sums[name] += x.T @ x
            self.count[name] += x.shape[0]
        return hook

    def result(self) -> dict[str, torch.Tensor]:
        return {name: s / max(1, self.count[name]) for name, s in self.sums.items()}

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self) -> "Hessians":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W') H (W - W')^T) / tr(W H W^T): the relative output error on the calibration inputs."""
    d = (weight - rounded).double()
    w = weight.double()
    h = hessian.double()
    return float(torch.einsum("nk,kl,nl->", d, h, d) / torch.einsum("nk,kl,nl->", w, h, w).clamp(min=1e-30))


__all__ = ["BlockGrid", "Grid", "Hessians", "Rounded", "block_codes", "gptq", "output_error", "rtn"]
