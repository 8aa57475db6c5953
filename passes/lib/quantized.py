"""What the quantization passes share: the dequantized value of recorded int4 codes (quant.weight_only
writes it into the torch model, quant.int4 finds it again in the ONNX graph), MatMulNBits' storage layout
(quant.int4 and export.riq's packed decode write it), and which earlier passes leave int8 weights behind
(after them quant.int4 and quant.riq find no float weight to quantize)."""
from __future__ import annotations

from typing import Any

import numpy as np
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


def matmul_nbits(inputs: list[str], output: str, name: str, k: int, n: int, bits: int, block: int,
                 accuracy_level: int) -> Any:
    """A com.microsoft MatMulNBits node (accuracy_level 0 left out: the kernel's default)."""
    from onnx import helper

    level = {"accuracy_level": accuracy_level} if accuracy_level else {}
    return helper.make_node("MatMulNBits", inputs, [output], name=name, domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, **level)


def pack_blocks(codes: np.ndarray, zero_points: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, K) and zero points (N, K/block), unsigned, as MatMulNBits stores them: codes
    (N, blocks, block * bits / 8) with K zero-padded to whole blocks, low nibble first at 4 bits;
    zero points (N, ceil(blocks * bits / 8))."""
    n, k = codes.shape
    blocks = -(-k // block)
    codes = np.pad(codes, ((0, 0), (0, blocks * block - k))).reshape(n, blocks, block)
    if bits == 8:
        return codes, zero_points.astype(np.uint8)
    zero_points = np.pad(zero_points, ((0, 0), (0, blocks % 2)))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4),
            zero_points[:, 0::2] | (zero_points[:, 1::2] << 4))
