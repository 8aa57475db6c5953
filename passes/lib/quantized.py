"""What the quantization passes share: the dequantized value of recorded int4 codes (quant.weight_only
writes it into the torch model, quant.int4 finds it again in the ONNX graph), and which earlier passes
leave int8 weights behind (after them quant.int4 and quant.riq find no float weight to quantize)."""
from __future__ import annotations

import torch


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group: int) -> torch.Tensor:
    """scale * (code - zero point), float32 (N, K): the weight the torch model and the ONNX export
    carry, and what quant.int4 compares MatMul weights against."""
    k = codes.shape[1]
    steps = codes.float() - zero_points.float().repeat_interleave(group, dim=1)[:, :k]
    return (steps * scales.repeat_interleave(group, dim=1)[:, :k]).contiguous()


def int8_weights_before(earlier: list) -> tuple[int, str] | None:
    """(position, what) of the last earlier pass that leaves int8 weights in the graph: quant.int8, or
    export.riq weights=int8. After it, quant.int4 and quant.riq find no float weight to quantize."""
    for j in range(len(earlier) - 1, -1, -1):
        cfg = earlier[j]
        if cfg is not None and cfg.pass_name == "quant.int8":
            return j, "quant.int8"
        if cfg is not None and cfg.pass_name == "export.riq" and getattr(cfg, "weights", None) == "int8":
            return j, "export.riq weights=int8"
    return None
