"""quant.riq: rotation-invariant mixed-precision quantization (RIQ).

Paper: "Rotation Invariant Quantization for Model Compression", Kampeas et al., arXiv 2303.03106.
"Rotation invariant" is the distortion measure (cosine distance). Its optimum gives every layer a
bin width proportional to its norm, and ONE scalar `k` sets the rate of the whole model:

    delta_l(k) = ||w_l||_2 * (1/k + eps * sqrt(24 / n_l)),   eps = 0.01,   codes = round(w / delta_l)

so layers get different bit widths. A worked number (all-MiniLM-L6-v2 near the k this pass finds,
k ~ 2000): the 384x384 attention matrices (n = 147k) get delta ~ 0.24 rms (about 4.5 bits of
entropy per weight), the 30522x384 word embedding (n = 11.7M) delta ~ 1.7 rms (about 1.5 bits).

The pass searches the smallest k (coarsest bins) whose quantized model keeps the mean output
cosine against the unquantized model >= 1 - D on calibration text from the state (training part,
never the held-out part): a coarse-to-fine scan from k_lo = sqrt(n_max/24)/(1-eps) with step
s = sqrt(k_hi - k_lo), narrowing s <- sqrt(s) below each first feasible k until s <= 3 (a few
dozen forward passes). When k_lo itself meets D (the paper's grid ends there; a pruned VGG did), the
scan goes on below it in steps of 0.8x down to k_lo / 16, then bisects to within 3%. During the
search the size is estimated by the codes' empirical entropy.

Quantized: floating tensors with > 512 elements and > 1 dimension (embeddings included), or the
subset chosen by `include` / `exclude` (names or `re:` patterns). Zeros stay exactly zero, so
pruned weights cost almost nothing once `export.riq` entropy-codes the codes (prune first).
Output: the same form with the weights replaced by codes * delta (float), and the per-tensor bin
widths in the state for `export.riq`, which writes the entropy-coded `.riq` file.
When to use: to make the smallest file to ship or store (download size), with one accuracy knob."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field

from compress.config import PassConfig
from compress.context import PassContext
from compress.passes.lib import bare
from compress.passes.lib.selection import Patterns, matches
from compress.registry import PassSpec
from compress.report import DASH, fmt, md_table, stage_label
from compress.state import ModelState

EPS = 0.01
BELOW_STEP, BELOW_FLOOR = 0.8, 1 / 16  # the scan below k_lo (Search._below)
MIN_ELEMENTS = 512
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


class QuantRiq(PassConfig):
    pass_name = "quant.riq"
    deviation: float = Field(0.005, gt=0, lt=1, description="allowed output deviation D: keep mean output cosine >= 1 - D on calibration text")
    calibration_samples: int = Field(64, ge=1, le=4096, description="training samples the output deviation is measured on")
    include: Patterns = Field(default_factory=list, description="tensor names or 're:' patterns to quantize; empty = every float tensor with > 512 elements and > 1 dim")
    exclude: Patterns = Field(default_factory=list, description="tensor names or 're:' patterns to keep in float")
    rounding: Literal["nearest", "gptq"] = Field("nearest", description=(
        "nearest: each weight to its nearest bin (the paper); gptq: the codes of every Linear / Conv2d weight chosen "
        "with GPTQ's error feedback on the calibration inputs (same bins, lower output error, so coarser bins pass "
        "D); torch form (quant.riq before export.onnx)"))



# ---- the quantizer itself: numpy only ---------------------------------------------------------

def eligible(name: str, array: np.ndarray, include: list[str] = (), exclude: list[str] = ()) -> bool:
    if array.dtype not in FLOAT_DTYPES or matches(name, list(exclude)):
        return False
    if include:
        return matches(name, list(include))
    return array.size > MIN_ELEMENTS and array.ndim > 1


def bin_width(norm: float, n: int, k: float) -> np.float32:
    """delta_l(k); float32 because the codes are multiplied by exactly this value on decode."""
    return np.float32(norm * (1.0 / k + EPS * math.sqrt(24.0 / n)))


def quantize(w: np.ndarray, delta: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """codes = round(w / delta) (half to even), w_hat = codes * delta in float32 (the decode rule)."""
    codes = np.rint(w.astype(np.float32) / delta).astype(np.int32)
    return codes, codes.astype(np.float32) * delta


def entropy_bits(codes: np.ndarray) -> float:
    """n * H(codes), the size an ideal entropy coder reaches (tables not counted)."""
    flat = codes.ravel()
    if flat.size == 0:
        return 0.0
    lo, hi = int(flat.min()), int(flat.max())
    counts = np.bincount(flat - lo) if hi - lo < 1 << 24 else np.unique(flat, return_counts=True)[1]
    p = counts[counts > 0] / flat.size
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.clip(den, 1e-30, None)


class InfeasibleDeviation(ValueError):
    """Even the finest bins of the k grid leave the outputs further than D from the original."""

    def __init__(self, message: str, best_cosine: float):
        super().__init__(message)
        self.best_cosine = best_cosine


@dataclass
class Search:
    """The k search over a model's tensors. `apply(weights)` puts float weights into the model;
    `outputs()` runs the calibration data and returns 2-D rows (samples or tokens, features)."""

    originals: dict[str, np.ndarray]
    apply: Callable[[dict[str, np.ndarray]], None]
    outputs: Callable[[], np.ndarray]
    deviation: float
    progress: Callable[[str], None] = lambda msg: None
    trace: list[dict] = field(default_factory=list)
    # name -> codes for (weight, bin width): another rounding onto the same bins (GPTQ); default: nearest
    rounders: dict[str, Callable[[np.ndarray, np.float32], np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.originals:
            raise ValueError("no tensor to quantize: no float tensor has > 512 elements and > 1 dim "
                             "(or include/exclude left none)")
        self.norms = {n: float(np.linalg.norm(w.astype(np.float64))) for n, w in self.originals.items()}
        self.reference = self.outputs()
        self._memo: dict[float, float] = {}
        self._smallest: tuple[float, tuple] | None = None  # the smallest feasible k so far and its quantization

    def quantized(self, k: float) -> tuple[dict[str, np.ndarray], dict[str, np.float32], dict[str, np.ndarray]]:
        weights, deltas, codes = {}, {}, {}
        for name, w in self.originals.items():
            deltas[name] = bin_width(self.norms[name], w.size, k)
            if name in self.rounders:
                codes[name] = self.rounders[name](w, deltas[name])
                weights[name] = codes[name].astype(np.float32) * deltas[name]  # the decode rule
            else:
                codes[name], weights[name] = quantize(w, deltas[name])
        return weights, deltas, codes

    def cosine(self, k: float) -> float:
        if k not in self._memo:
            result = self.quantized(k)
            weights, _, codes = result
            self.apply(weights)
            cos = float(row_cosines(self.outputs(), self.reference).mean())
            if self._meets(cos) and (self._smallest is None or k < self._smallest[0]):
                self._smallest = (k, result)  # what run() returns: kept, not rounded again (GPTQ is slow)
            bits = sum(entropy_bits(c) for c in codes.values())
            n = sum(c.size for c in codes.values())
            self._memo[k] = cos
            self.trace.append({"k": round(k, 3), "cosine": cos, "bits_per_weight": bits / n})
            self.progress(f"k={k:.1f}: cosine {cos:.5f}, {bits / n:.2f} bits/weight (entropy)")
        return self._memo[k]

    def result(self, k: float) -> tuple[dict[str, np.ndarray], dict[str, np.float32], dict[str, np.ndarray]]:
        """quantized(k), without rounding again when k is the smallest feasible k evaluated."""
        if self._smallest is not None and self._smallest[0] == k:
            return self._smallest[1]
        return self.quantized(k)

    def _meets(self, cosine: float) -> bool:
        return cosine >= 1.0 - self.deviation

    def feasible(self, k: float) -> bool:
        return self._meets(self.cosine(k))

    def run(self) -> float:
        """Smallest feasible k on the paper's coarse-to-fine grid, or below its end (_below) when k_lo is feasible."""
        root = math.sqrt(max(w.size for w in self.originals.values()) / 24.0)
        k_lo, k_hi = root / (1 - EPS), root / EPS**1.5
        step, start, best = math.sqrt(k_hi - k_lo), k_lo, None
        if not self.feasible(k_hi):  # one pass tells whether any k can do (else the scan would try them all)
            raise InfeasibleDeviation(
                f"even the finest bins (k={k_hi:.0f}; a bin never gets finer than eps*sqrt(24) = 0.049 of a "
                f"tensor's rms) give a mean output cosine of {self._memo[k_hi]:.5f} < {1 - self.deviation:.5f}: "
                "raise the deviation D, or exclude the most sensitive tensors", self._memo[k_hi])
        while True:
            k, stop = start, best if best is not None else k_hi
            while k < stop:
                if self.feasible(k):
                    best = k
                    break
                k += step
            best = k_hi if best is None else best  # only k_hi itself was feasible
            if best <= k_lo:
                return self._below(k_lo)
            if step <= 3:
                return best
            start, step = max(k_lo, best - step), math.sqrt(step)

    def _below(self, k_lo: float) -> float:
        """k_lo itself meets D, where the paper's grid ends (the largest tensor's bins are then about 5 of its rms
        wide): keep coarsening by BELOW_STEP while D holds, down to k_lo * BELOW_FLOOR, then bisect between the last
        feasible k and the first infeasible one to within 3%. Feasibility is measured, as everywhere."""
        good, k = k_lo, k_lo * BELOW_STEP
        while k >= k_lo * BELOW_FLOOR and self.feasible(k):
            good, k = k, k * BELOW_STEP
        if k < k_lo * BELOW_FLOOR:
            return good
        bad = k
        while good / bad > 1.03:
            mid = math.sqrt(good * bad)
            good, bad = (mid, bad) if self.feasible(mid) else (good, mid)
        return good


def layer_table(originals: dict[str, np.ndarray], deltas: dict[str, np.float32],
                codes: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for name, c in codes.items():
        peak = int(np.abs(c).max()) if c.size else 0
        rows.append({"name": name, "shape": list(originals[name].shape), "params": int(c.size),
                     "delta": float(deltas[name]), "symbols": int(np.unique(c).size),
                     "bits_per_weight": round(entropy_bits(c) / max(c.size, 1), 4),
                     "zeros": round(float((c == 0).mean()), 4),
                     "fits": "int4" if peak <= 7 else "int8" if peak <= 127 else "int16" if peak < 1 << 15 else "int32"})
    return rows


def quantize_model(originals: dict[str, np.ndarray], apply: Callable[[dict[str, np.ndarray]], None],
                   outputs: Callable[[], np.ndarray], deviation: float = 0.005,
                   progress: Callable[[str], None] = lambda msg: None,
                   rounders: dict[str, Callable[[np.ndarray, np.float32], np.ndarray]] | None = None) -> dict:
    """Search k, leave the model holding the quantized weights, return what export.riq and the
    report need: k, per-tensor deltas, codes, the layer table and the search trace. `rounders`:
    name -> codes(weight, bin width) for tensors rounded otherwise than to nearest (gptq_rounders)."""
    t0 = time.perf_counter()
    search = Search(originals, apply, outputs, deviation, progress, rounders=rounders or {})
    k = search.run()
    weights, deltas, codes = search.result(k)
    apply(weights)
    n = sum(c.size for c in codes.values())
    return {"k": k, "deviation": deviation, "calibration_cosine": search._memo[k], "deltas": deltas,
            "codes": codes, "weights": weights, "layers": layer_table(originals, deltas, codes),
            "trace": search.trace, "evaluations": len(search.trace), "quantized_params": n,
            "entropy_bits_per_weight": sum(entropy_bits(c) for c in codes.values()) / n,
            "search_seconds": time.perf_counter() - t0}


# ---- the pass: torch and ONNX forms -----------------------------------------------------------

def _calibration_feeds(state: ModelState, cfg: QuantRiq, max_length: int) -> list[dict[str, np.ndarray]]:
    from compress.runtime import batches

    return list(batches(state.tokenizer, state.data.train[: cfg.calibration_samples], max_length))


def _rows(kind: Any, out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Outputs compared by cosine (the kind's `output_rows`, a ModelKind or its name): an embedding /
    logit vector per sample, per real token for an LM."""
    from compress import kinds

    return kinds.get(kind).output_rows(out, mask)


def torch_tensors(model) -> dict[str, "object"]:
    """name -> parameter, each shared (tied) tensor once, under its first state_dict name."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t
    return out


class UniformBins:
    """RIQ's bins as a GPTQ grid (passes/lib/gptq.py): one width for the whole tensor, codes unbounded."""

    def __init__(self, delta: np.float32, columns: int):
        # fit() has nothing to fit, so the group only sets GPTQ's lazy-update block: 128 columns, the same result
        self.delta, self.group = float(delta), min(columns, 128)

    def fit(self, w, importance) -> tuple:
        return ()

    def round(self, w, params: tuple):
        import torch

        return torch.round(w / self.delta) * self.delta  # delta is a float32 value: float32 arithmetic, as on decode


def _plain_conv(module) -> bool:
    """A Conv2d whose input patches F.unfold gives as the layer sees them (numeric zero padding); a grouped
    or depthwise one gets one H summed over its groups (an approximation: each group sees its own channels)."""
    import torch

    return (isinstance(module, torch.nn.Conv2d) and not isinstance(module.padding, str)
            and module.padding_mode == "zeros")


def gptq_rounders(model, outputs: Callable[[], np.ndarray], names: set[str]) -> dict[str, Callable]:
    """For each nn.Linear / nn.Conv2d whose weight is in `names`: its input Hessian on the calibration data
    (one pass of `outputs()` over the unquantized model; a convolution's input patches), and a rounder giving
    GPTQ's codes for a bin width (a convolution's weight as (out channels, the rest))."""
    import torch

    from compress.passes.lib.gptq import Hessians, factor, gptq

    linears = {f"{n}.weight": m for n, m in model.named_modules()
               if (isinstance(m, torch.nn.Linear) or _plain_conv(m)) and f"{n}.weight" in names}
    with Hessians(linears, root=model) as hess, torch.no_grad():  # padding tokens stay out of H
        outputs()
    factors = {name: factor(h) for name, h in hess.result().items()}  # once per layer, not once per k tried

    def rounder(name: str) -> Callable[[np.ndarray, np.float32], np.ndarray]:
        def codes(w: np.ndarray, delta: np.float32) -> np.ndarray:
            matrix = torch.from_numpy(w).float().reshape(w.shape[0], -1)
            rounded = gptq(matrix, factors[name], UniformBins(delta, matrix.shape[1]), zeros=matrix == 0)  # zeros stay
            return np.rint(rounded.weight.numpy() / delta).astype(np.int32).reshape(w.shape)
        return codes

    return {name: rounder(name) for name in linears}


def quantize_module(model, outputs: Callable[[], np.ndarray], deviation: float = 0.005, include: list[str] = (),
                    exclude: list[str] = (), progress: Callable[[str], None] = lambda msg: None,
                    rounding: str = "nearest") -> dict:
    """RIQ on any torch module in place: `outputs()` runs the calibration data through `model`
    and returns 2-D rows (e.g. a CNN's logits on calibration images). rounding="gptq": the Linear and
    Conv2d weights' codes by GPTQ onto the same bins (gptq_rounders)."""
    import torch

    params = {n: t for n, t in torch_tensors(model).items()
              if t.is_floating_point() and eligible(n, t.detach().cpu().numpy(), include, exclude)}
    rounders = gptq_rounders(model, outputs, set(params)) if rounding == "gptq" else None

    def apply(weights: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, w in weights.items():
                params[name].copy_(torch.from_numpy(w))

    originals = {n: t.detach().cpu().numpy().copy() for n, t in params.items()}
    return quantize_model(originals, apply, outputs, deviation, progress, rounders)


def _run_torch(model, kind: str, pooling: str, cfg: QuantRiq, feeds: list, progress) -> tuple[Any, dict]:
    import copy

    from compress.runtime import TorchRunner

    model = copy.deepcopy(model).eval()
    run = TorchRunner(model, kind, pooling)

    def outputs() -> np.ndarray:
        return np.concatenate([_rows(kind, run(f), f["attention_mask"]) for f in feeds])

    result = quantize_module(model, outputs, cfg.deviation, cfg.include, cfg.exclude, progress, cfg.rounding)
    return model, result


def _run_onnx(state: ModelState, cfg: QuantRiq, feeds: list, progress, dst) -> tuple[ModelState, dict]:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from compress.runtime import OnnxRunner

    model = onnx.load(str(state.path))  # read once: the weights to search over, then rewritten in place
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    originals = {n: a for n, a in arrays.items() if eligible(n, a, cfg.include, cfg.exclude)}
    current: dict = {"runner": OnnxRunner(state.path, state.kind, state.meta.get("pooling", "mean"))}

    def apply(weights: dict[str, np.ndarray]) -> None:
        # Session-level initializer overrides: no re-serialisation of the graph per k.
        so = ort.SessionOptions()
        values = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w)) for n, w in weights.items()}
        for name, value in values.items():
            so.add_initializer(name, value)
        sess = ort.InferenceSession(str(state.path), so, providers=["CPUExecutionProvider"])
        current["runner"] = OnnxRunner.from_session(sess, state.kind, state.meta.get("pooling", "mean"))
        current["values"] = values  # the session reads these buffers: keep them alive with it

    def outputs() -> np.ndarray:
        return np.concatenate([_rows(state.kind, current["runner"](f), f["attention_mask"]) for f in feeds])

    result = quantize_model(originals, apply, outputs, cfg.deviation, progress)
    for init in model.graph.initializer:
        if init.name in result["weights"]:
            init.CopyFrom(numpy_helper.from_array(result["weights"][init.name].astype(originals[init.name].dtype), init.name))
    onnx.save(model, str(dst), save_as_external_data=model.ByteSize() > 1_800_000_000, location=dst.name + ".data")
    return state.with_file(dst, "onnx"), result


def _search(console, cfg: QuantRiq, samples: int, search: Callable) -> Any:
    """`search(progress)` under a status line that follows the k search."""
    with console.status(f"searching the RIQ scale k on {samples} training samples (D={cfg.deviation})") as status:
        def progress(msg: str) -> None:
            status.update(f"searching the RIQ scale k: {msg}")

        return search(progress)


def _record(result: dict, notes: dict, console) -> None:
    notes["riq"] = {k: result[k] for k in ("k", "deviation", "calibration_cosine", "evaluations",
                                           "quantized_params", "entropy_bits_per_weight", "search_seconds")}
    notes["riq"]["estimated_ratio"] = 32 / result["entropy_bits_per_weight"]
    notes["riq_layers"] = result["layers"]
    notes["riq_search"] = result["trace"]
    console.print(f"    RIQ k={result['k']:.1f} after {result['evaluations']} evaluations: calibration cosine "
                  f"{result['calibration_cosine']:.5f}, {result['entropy_bits_per_weight']:.2f} bits/weight (entropy)")


def apply(model: Any, tokenizer: Any, data: Any, cfg: QuantRiq | None = None, *, notes: dict | None = None,
          progress: bool = True, pooling: str = "mean", kind: str | None = None, ctx: PassContext | None = None) -> Any:
    """RIQ on a bare transformers model (the torch form of quant.riq): returns a new model in eval
    mode whose quantized tensors hold codes * delta (one bin width delta per tensor, codes
    integers); `model` is left as it is.

    tokenizer: the model's. data: calibration text, a list of strings or a `compress.data.TextData`
    (its train part; the first cfg.calibration_samples, 128 tokens each). cfg: default `QuantRiq()`.
    notes: a dict to receive notes["riq"] (k, calibration cosine, entropy bits per weight),
    notes["riq_layers"] (per tensor: name, shape, delta, symbols, bits) and notes["riq_search"] (the
    k trace), what the pipeline's report records. progress: False for no status line. pooling:
    encoders: "mean" or "cls", how the embeddings compared are pooled. kind: default read from the
    model. ctx: the pipeline's context, given by run(); leave it None.
    For any other torch module (a CNN) call `quantize_module(model, outputs)` with your own outputs."""
    from compress.runtime import batches

    cfg = cfg or QuantRiq()
    kind = bare.prepare(cfg, model, data, ctx, kind)
    texts = bare.texts(data, cfg.pass_name)[: cfg.calibration_samples]  # training part only, never held-out
    with bare.context(ctx, None, progress) as c:
        feeds = list(batches(tokenizer, texts, c.max_length))
        model, result = _search(c.console, cfg, len(texts), lambda p: _run_torch(model, kind, pooling, cfg, feeds, p))
        _record(result, notes if notes is not None else {}, c.console)
    return model


def run(state: ModelState, cfg: QuantRiq, ctx: PassContext) -> ModelState:
    if state.form == "torch":
        new = state.with_torch(apply(state.model, state.tokenizer, state.data, cfg, notes=ctx.notes,
                                     pooling=state.meta.get("pooling", "mean"), kind=state.kind, ctx=ctx))
    else:
        feeds = _calibration_feeds(state, cfg, ctx.max_length)
        samples = min(cfg.calibration_samples, len(state.data.train))
        new, result = _search(ctx.console, cfg, samples,
                              lambda p: _run_onnx(state, cfg, feeds, p, ctx.workdir / "model.onnx"))
        _record(result, ctx.notes, ctx.console)
    # The layer table's delta is float(bin width), the value the codes are multiplied by on decode.
    deltas = {row["name"]: row["delta"] for row in ctx.notes["riq_layers"]}
    return replace(new, meta={**new.meta, "riq": {"k": ctx.notes["riq"]["k"], "deviation": cfg.deviation,
                                                  "form": new.form, "deltas": deltas}})


def _check_order(cfg: QuantRiq, form: str | None, earlier: list) -> list[str]:
    """RIQ quantizes float weights: after int8 weights (quant.int8, export.riq weights=int8) it finds
    none and fails at run time, so that order is refused before any work starts."""
    from compress.passes.lib.quantized import int8_weights_before

    if cfg.rounding == "gptq" and form not in (None, "torch"):
        return [f"quant.riq rounding=gptq needs the torch form (it measures each Linear's inputs), but the model is "
                f"{form} here: put quant.riq before export.onnx, or use rounding=nearest"]
    int8 = int8_weights_before(earlier)
    if int8 is None:
        return []
    j, what = int8
    fix = "put quant.riq before quant.int8" if what == "quant.int8" else "keep one quant.riq, or use export.riq weights=float"
    return [f"the weights are int8 after passes[{j}] ({what}), so quant.riq finds no float weight to quantize and "
            f"fails: {fix}"]


def _report(stage: dict) -> list[str]:
    """report.md's section for the `riq` and `riq_layers` notes: the scale k found and each tensor's bin width."""
    riq = stage.get("riq")
    if not riq:
        return []
    lines = [f"## RIQ: {stage_label(stage)}", "",
             f"- k = {fmt(riq.get('k'), '.1f')} after {riq.get('evaluations', DASH)} evaluations "
             f"({fmt(riq.get('search_seconds'), '.1f')} s); calibration cosine {fmt(riq.get('calibration_cosine'), '.5f')} "
             f"(D = {riq.get('deviation', DASH)}); {fmt(riq.get('entropy_bits_per_weight'), '.2f')} bits/weight "
             f"(entropy) over {fmt(riq.get('quantized_params'), ',')} quantized weights"]
    layers = stage.get("riq_layers") or []
    if layers:
        rows = [[str(r["name"]), "x".join(map(str, r["shape"])), fmt(r["delta"], ".3g"), str(r["symbols"]),
                 fmt(r["bits_per_weight"], ".2f"), f"{r['zeros'] * 100:.1f}%", str(r["fits"])] for r in layers]
        lines += ["", *md_table(["tensor", "shape", "bin width", "symbols", "bits/weight", "zeros", "codes fit"], rows)]
    return lines + [""]


PASS = PassSpec(name="quant.riq", config=QuantRiq, run=run, takes=("torch", "onnx"), gives=None,
                needs_data=lambda cfg: True, check_order=_check_order, report=_report,
                summary="RIQ mixed-precision quantization: one scale k, per-layer bin widths, meets an output deviation D.")
