"""quant.weight_only: calibrated weight-only int4 / int8 quantization of Linear layers with Intel
Neural Compressor (RTN, GPTQ, AWQ), carried into onnxruntime's MatMulNBits by quant.int4.

Methods (neural-compressor-pt 3.x, `neural_compressor.torch.quantization`):
- `rtn`: round-to-nearest per block of `group_size` input weights (the baseline);
- `gptq`: GPTQ (Frantar et al., arXiv 2210.17323): each layer's weights are rounded column by
  column and the rounding error is pushed onto the columns not yet rounded, weighted by the inverse
  Hessian of the layer's inputs on calibration tokens (`percdamp` dampening);
- `awq`: AWQ (Lin et al., arXiv 2306.00978): per-input-channel scales s searched on calibration
  activations so that salient channels lose less to rounding, W diag(s) quantized and 1/s folded into
  the op before (RMSNorm weights for q/k/v and gate/up, up_proj rows for down_proj), then a clip
  search. Llama-family decoders (Llama, Mistral, Qwen2).
- `mse`, `gptq-mse` (compress's own, passes/lib/gptq.py): each block's scale searched among `candidates`
  clipping ratios for the least squared error weighted by the input Hessian's diagonal (how much each
  input channel's error costs on calibration tokens), then round to nearest (mse) or GPTQ onto those
  scales (gptq-mse), layer by layer with the earlier layers already rounded; any BERT- or
  Llama-family model; `lm_head=true` also rounds the lm_head (and the tied embedding with it).
Calibration: `samples` windows of `max_length` tokens cut from the state's training text (never the
held-out part), concatenated like GPTQ's C4 windows (no padding enters the statistics).

The pass works on the torch model. Each quantized Linear gets back a plain nn.Linear whose weight is
the exact dequantized value scale * (code - zero point), so the model still saves, reloads and
exports as a normal transformers model, and its outputs are the quantized model's. The codes,
scales and zero points are kept (weight_only.safetensors in the stage folder); after export.onnx,
quant.int4 finds the MatMuls whose weights are bit-for-bit those dequantized values and writes them
as MatMulNBits with these codes, so GPTQ's / AWQ's choices, not a fresh rounding, reach the ONNX
file. The lm_head stays float here (quant.int4's lm_head options apply to it) unless lm_head=true
with mse / gptq-mse. Run export.onnx and quant.int4 in the same run: a model saved after this pass holds the dequantized fp32 weights only,
and a later quant.int4 would round them afresh (to the same grid only where a block uses its end codes).
When to use: decoder LLMs going to int4 where round-to-nearest loses too much perplexity.
Measured (SmolLM2-135M, asymmetric group 32, 26 windows of 128 wiki training tokens, then export.onnx
and quant.int4 lm_head_bits=8 embeddings=true; perplexity on 100 lee_background paragraphs / 128
held-out wiki samples, fp32 31.24 / 26.80; benchmarks/smollm2_edge.py): rtn 39.14 / 33.92, gptq
37.18 / 32.00, awq 35.01 / 30.00; all 101.3 MB (fp32 539.3), decode ~2x fp32. GPTQ took 966 s and AWQ
1118 s on 2 loaded cores (the layer-by-layer calibration forwards dominate)."""
from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.config import BlockSize, PassConfig
from compress.context import PassContext
from compress.passes.lib import bare, prunable, sequential
from compress.passes.lib.quantized import dequantize
from compress.passes.lib.quiet import quiet_root_logger
from compress.registry import PassSpec
from compress.report import stage_label
from compress.state import ModelState

LLAMA = next(f for f in prunable.FAMILIES if f.name == "llama")  # the models AWQ's absorb map fits
# AWQ: the op each group of Linears takes its input from, relative to a decoder layer
AWQ_ABSORB = {"input_layernorm": (LLAMA.q, LLAMA.k, LLAMA.v), "post_attention_layernorm": (LLAMA.gate, LLAMA.up),
              LLAMA.up: (LLAMA.down,)}
CODES_FILE = "weight_only.safetensors"


class QuantWeightOnly(PassConfig):
    pass_name = "quant.weight_only"
    method: Literal["rtn", "gptq", "awq", "mse", "gptq-mse"] = Field("gptq", description=(
        "Neural Compressor's rtn (no calibration), gptq or awq; or compress's own: mse (each block's scale searched "
        "for the least activation-weighted error, then round to nearest) or gptq-mse (GPTQ onto those searched "
        "scales; measured best on SmolLM2)"))
    bits: Literal[4, 8] = Field(4, description="bits per weight")
    group_size: BlockSize = Field(32, ge=16, le=256, description="input weights sharing one scale (power of two, >= 16)")
    symmetric: bool = Field(False, description="symmetric blocks (zero point fixed at the middle code)")
    samples: int = Field(32, ge=1, le=4096, description="every method but rtn: calibration windows of max_length tokens")
    max_length: int = Field(256, ge=16, le=8192, description="every method but rtn: tokens per calibration window")
    percdamp: float = Field(0.01, gt=0, lt=1, description="gptq / gptq-mse: dampening added to the Hessian diagonal (fraction of its mean)")
    candidates: int = Field(20, ge=1, le=200, description=(
        "mse / gptq-mse: clipping ratios tried per block (from 1 down to 0.6); 1 = no clipping"))
    lm_head: bool = Field(False, description=(
        "mse / gptq-mse: also quantize the lm_head (first, so the layers after see it; a tied embedding shares "
        "it): for a graph whose tied matrix is stored once in 4 bits (quant.int4 lm_head_bits=4 embeddings=true)"))


@contextlib.contextmanager
def _quiet_inc():
    """Neural Compressor logs every step at INFO (and torchao, which it imports, warns about torch
    internals through torch.utils._pytree): keep errors only while it runs."""
    loggers = [logging.getLogger(name) for name in ("torch.utils._pytree", "neural_compressor")]
    levels = [lg.level for lg in loggers]
    loggers[0].setLevel(logging.ERROR)
    from neural_compressor.common.utils.logger import Logger

    Logger()  # its first use resets the level from $LOGLEVEL: make that happen before ours
    loggers[1].setLevel(logging.ERROR)
    try:
        with quiet_root_logger():
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _inc_config(cfg: QuantWeightOnly, workdir):
    from neural_compressor.torch.quantization import AWQConfig, GPTQConfig, RTNConfig

    common = dict(bits=cfg.bits, group_size=cfg.group_size, use_sym=cfg.symmetric)
    if cfg.method == "rtn":
        return RTNConfig(use_layer_wise=False, **common)
    if cfg.method == "gptq":  # model_path: a folder GPTQ may use for layer-wise loading (unused here)
        return GPTQConfig(percdamp=cfg.percdamp, act_order=False, model_path=str(workdir), **common)
    return AWQConfig(folding=True, absorb_layer_dict=AWQ_ABSORB, **common)


def _inc_quantize(model: torch.nn.Module, cfg: QuantWeightOnly, windows: torch.Tensor | None,
                  causal: bool) -> torch.nn.Module:
    """Neural Compressor's prepare -> calibration forwards -> convert, on `model` in place."""
    with tempfile.TemporaryDirectory() as scratch, _quiet_inc(), torch.no_grad():
        from neural_compressor.torch.quantization import convert, prepare

        config = _inc_config(cfg, scratch)
        extra = {"example_inputs": windows[:1]} if cfg.method == "awq" else {}
        model = prepare(model, config, **extra)
        if windows is not None:
            extra = {"use_cache": False} if causal else {}
            for row in windows:
                model(input_ids=row[None], **extra)
        return convert(model)


OWN = sequential.METHODS  # compress's own methods -> sequential.quantize's rounding


def _own_quantize(model: torch.nn.Module, cfg: QuantWeightOnly, windows: torch.Tensor, kind: Any,
                  console: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """compress's mse / gptq-mse, layer by layer (passes/lib/sequential.py) on `model` in place; each rounded
    Linear's weight is set to exactly dequantize(codes, scales, zero points), the value quant.int4 looks for.
    Returns the codes, scales and zero points by '<module name>.<part>', and the median and worst relative
    output error of a layer on the calibration tokens."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from compress.passes.lib.gptq import BlockGrid, block_codes

    grid = BlockGrid(cfg.bits, cfg.group_size, cfg.symmetric, cfg.candidates)
    stages = sequential.stage_count(model, cfg.lm_head)
    columns = (TextColumn("    {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"quant.weight_only {cfg.method}", total=stages)

        def step(done: int, label: str) -> None:
            bar.update(task, completed=done, description=f"quant.weight_only {cfg.method}: {label}")

        rounded = sequential.quantize(model, windows, grid, OWN[cfg.method], lm_head=cfg.lm_head,
                                      forward_kwargs={"use_cache": False} if kind.is_generative else {},
                                      percdamp=cfg.percdamp, progress=step)
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name, (r, _) in rounded.items():
        codes, scales, zp = block_codes(r, grid)
        if not torch.equal(modules[name].weight.data, dequantize(codes, scales, zp, cfg.group_size)):
            raise AssertionError(f"{name}: the rounded weight is not its codes' dequantized value bit for bit")
        tensors.update({f"{name}.codes": codes, f"{name}.scales": scales, f"{name}.zero_points": zp})
    errors = sorted(e for _, e in rounded.values())
    error = {"median": errors[len(errors) // 2], "worst": errors[-1]}
    console.print(f"quant.weight_only: {cfg.method} rounded {len(rounded)} Linear layers; relative output error on the "
                  f"calibration tokens median {error['median']:.2e}, worst {error['worst']:.2e}")
    return tensors, error


def _unpack(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (N, K), scales float32 (N, K/group), zero points uint8 (N, K/group)) of an
    INCWeightOnlyLinear; symmetric blocks get their implicit zero point (2^(bits-1))."""
    params = module.unpack()
    codes, scales, zp = params["int_weight"], params["scales"].float(), params["zp"]
    if zp is None:
        zp = torch.full(scales.shape, 2 ** (module.bits - 1))
    if codes.min() < 0:  # signed codes: shift to the unsigned form MatMulNBits reads
        codes, zp = codes + 2 ** (module.bits - 1), zp + 2 ** (module.bits - 1)
    return codes.to(torch.uint8), scales.contiguous(), zp.to(torch.uint8)


def _to_linears(model: torch.nn.Module, group: int, biased: set[str]) -> dict[str, torch.Tensor]:
    """Replace every INCWeightOnlyLinear by an nn.Linear holding its dequantized weight, with a bias
    only where the original had one (`biased`: INC adds zero biases everywhere); returns the codes,
    scales and zero points by '<module name>.<part>'."""
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    tensors: dict[str, torch.Tensor] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, INCWeightOnlyLinear):
            continue
        codes, scales, zp = _unpack(module)
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=name in biased)
        linear.weight.data = dequantize(codes, scales, zp, group)
        if name in biased:
            linear.bias.data = module.bias.detach().float().clone()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        tensors.update({f"{name}.codes": codes, f"{name}.scales": scales, f"{name}.zero_points": zp})
    return tensors


def apply(model: nn.Module, tokenizer: Any = None, data: Any = None, cfg: QuantWeightOnly | None = None, *,
          notes: dict | None = None, workdir: Path | str | None = None, progress: bool = True,
          kind: str | None = None, ctx: PassContext | None = None) -> nn.Module:
    """Weight-only quantization of a bare transformers model's Linear layers (the lm_head only with
    method mse / gptq-mse and cfg.lm_head):
    returns a new float32 model in eval mode whose quantized weights are exactly
    scale * (code - zero point); `model` is left as it is.

    tokenizer and data (calibration text: a list of strings or a `compress.data.TextData`, its train
    part) are needed for every method but rtn. cfg: default `QuantWeightOnly()` (gptq).
    notes: a dict to receive notes["weight_only"] (method, bits, layers, calibration tokens), what
    the pipeline's report records. workdir: when given, the codes, scales and zero points are
    saved there as weight_only.safetensors ('<module name>.codes' / '.scales' / '.zero_points'),
    the file quant.int4 writes as MatMulNBits; without it nothing is written. progress: False for no
    status line. kind: default read from the model. ctx: the pipeline's context, given by run();
    leave it None."""
    from safetensors.torch import save_file

    cfg = cfg or QuantWeightOnly()
    kind = bare.prepare(cfg, model, data, ctx, kind)
    if cfg.method == "awq":
        awq_family(model.config)
    if cfg.method in OWN:
        own_family(model.config)
    biased = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    with bare.context(ctx, workdir, progress) as c:
        windows = None
        if cfg.method != "rtn":
            windows = sequential.calibration_windows(tokenizer, bare.texts(data, cfg.pass_name), cfg.samples, cfg.max_length)
            c.console.print(f"quant.weight_only: {cfg.method} calibration on {windows.shape[0]} x {windows.shape[1]} "
                            "training tokens")
        error = None
        if cfg.method in OWN:
            quantized = copy.deepcopy(model).float().eval()  # a tied embedding stays tied to its lm_head
            tensors, error = _own_quantize(quantized, cfg, windows, kind, c.console)
        else:
            with c.console.status(f"quant.weight_only: {cfg.method} over every Linear layer (minutes for a 100M-parameter "
                                  "LLM on a few cores)"):
                quantized = _inc_quantize(copy.deepcopy(model).float().eval(), cfg, windows, kind.is_generative)
            tensors = _to_linears(quantized, cfg.group_size, biased)
        if not tensors:
            raise ValueError(f"quant.weight_only {cfg.method} quantized no Linear layer of this model (nothing to carry into "
                         "MatMulNBits)")
        if ctx is not None or workdir is not None:
            save_file(tensors, str(c.workdir / CODES_FILE))
    if notes is not None:
        own = {"lm_head": cfg.lm_head, "output_error": error} if cfg.method in OWN else {}
        notes["weight_only"] = {"method": cfg.method, **own, "bits": cfg.bits, "group_size": cfg.group_size,
                                "symmetric": cfg.symmetric, "layers": len(tensors) // 3,
                                "calibration_tokens": 0 if windows is None else windows.numel()}
    return quantized


def run(state: ModelState, cfg: QuantWeightOnly, ctx: PassContext) -> ModelState:
    model = apply(state.model, state.tokenizer, state.data, cfg, notes=ctx.notes, kind=state.kind, ctx=ctx)
    info = {"file": str(ctx.workdir / CODES_FILE), "bits": cfg.bits, "group_size": cfg.group_size,
            "method": cfg.method, "layers": ctx.notes["weight_only"]["layers"]}
    return state.with_torch(model, weight_only=info)


def awq_family(config) -> prunable.Family:
    return prunable.by_model_type(config, (LLAMA,), "quant.weight_only method=awq supports Llama-family decoders "
                                                    "({supported}), not model_type '{model_type}': use method=gptq or rtn")


def own_family(config) -> prunable.Family:
    """The layer layouts compress's own methods walk layer by layer (BERT and Llama families)."""
    return prunable.by_model_type(config, prunable.FAMILIES, "quant.weight_only method=mse / gptq-mse supports "
                                  "{supported}, not model_type '{model_type}': use method=gptq or rtn (Neural Compressor)")


INSTALL = "pip install --no-deps neural-compressor-pt==3.10"


def _check(cfg: QuantWeightOnly, info) -> list[str]:
    import importlib.util

    if cfg.method in OWN:
        return prunable.supported_problems(info, own_family)
    if cfg.lm_head:
        return [f"quant.weight_only lm_head=true is for method=mse or gptq-mse (compress's own); {cfg.method} (Neural "
                "Compressor) keeps the lm_head float: drop lm_head, or use method=gptq-mse"]
    problems = [] if importlib.util.find_spec("neural_compressor") else [
        f"quant.weight_only needs Intel Neural Compressor: {INSTALL} (without its torchao dependency)"]
    return problems + (prunable.supported_problems(info, awq_family) if cfg.method == "awq" else [])


def _check_order(cfg: QuantWeightOnly, form: str | None, earlier: list) -> list[str]:
    """A second quant.weight_only fails at run time (transformers refuses `.float()` on a quantized model)."""
    first = next((j for j, c in enumerate(earlier) if c is not None and c.pass_name == "quant.weight_only"), None)
    if first is None:
        return []
    return [f"quant.weight_only runs twice (also passes[{first}]): the model is already quantized after the first, and "
            "a second run fails; keep one quant.weight_only"]


def _report(stage: dict) -> list[str]:
    """report.md's line for the `weight_only` note: method, grid and calibration (under the heading it shares
    with quant.int4, which says how many of these layers it wrote with their codes)."""
    w = stage.get("weight_only")
    if not w:
        return []
    calib = f", calibrated on {w['calibration_tokens']:,} training tokens" if w.get("calibration_tokens") else ""
    return [f"- {stage_label(stage)}: {w['method']} int{w['bits']} (group {w['group_size']}, "
            f"{'symmetric' if w['symmetric'] else 'asymmetric'}) on {w['layers']} Linear layers{calib}"]


PASS = PassSpec(name="quant.weight_only", config=QuantWeightOnly, run=run, takes=("torch",), gives="torch",
                needs_data=lambda cfg: cfg.method != "rtn", check=_check, check_order=_check_order,
                report=_report, report_group="Weight-only quantization",
                summary="Weight-only int4/int8: compress's GPTQ onto searched block scales (gptq-mse, mse) or Neural Compressor (RTN, GPTQ, AWQ); quant.int4 writes the codes as MatMulNBits.")
