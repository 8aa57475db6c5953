"""quant.int4: weight-only int4 quantization of MatMul weights into onnxruntime's MatMulNBits.

Each weight matrix is split into blocks of `block_size` values along the input dimension; each
block stores 4-bit codes and one scale (and a zero point when asymmetric), so a (384, 1536) fp32
weight of 2.36 MB becomes ~0.29 MB + 18k scales at block 32. Activations stay float; with
`accuracy_level=4` the kernel computes in int8 for speed. Method: round-to-nearest per block
(the RTN baseline of GPTQ, arXiv 2210.17323). When to use: decoder LLMs and large encoders where
memory bandwidth dominates; after optimize.ort (fused Attention weights stay float)."""
from __future__ import annotations

from pydantic import Field, field_validator

from compress.config import PassConfig
from compress.passes._quiet import quiet_root_logger
from compress.passes.selection import matching_nodes, validate_patterns
from compress.registry import PassSpec
from compress.state import ModelState


class QuantInt4(PassConfig):
    pass_name = "quant.int4"
    block_size: int = Field(32, ge=16, le=256, description="weights per quantization block (power of two, >= 16)")
    symmetric: bool = Field(True, description="symmetric blocks (no zero point)")
    accuracy_level: int = Field(4, ge=0, le=4, description="MatMulNBits compute type: 0 default, 1 fp32, 4 int8 (fastest on CPU)")
    exclude: list[str] = Field(default_factory=list, description="node names or 're:' patterns to keep in float")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (16, 32, 64, 128, 256), got {v}")
        return v

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        problems = validate_patterns(v)
        if problems:
            raise ValueError("; ".join(problems))
        return v


def run(state: ModelState, cfg: QuantInt4, ctx) -> ModelState:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(state.path))
    excluded = matching_nodes(state.path, cfg.exclude)
    algo = DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                        accuracy_level=cfg.accuracy_level)
    quant = MatMulNBitsQuantizer(model, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                 accuracy_level=cfg.accuracy_level, nodes_to_exclude=excluded, algo_config=algo)
    with quiet_root_logger():
        quant.process()
    dst = ctx.workdir / "model.onnx"
    quant.model.save_model_to_file(str(dst), use_external_data_format=False)
    n = sum(1 for node in onnx.load(str(dst), load_external_data=False).graph.node if node.op_type == "MatMulNBits")
    if n == 0:
        raise ValueError("no MatMul with a constant weight was found to quantize (is the graph already quantized?)")
    ctx.notes.update(matmulnbits_nodes=n, excluded=excluded)
    return state.with_file(dst, "onnx", quantized="int4")


PASS = PassSpec(name="quant.int4", config=QuantInt4, run=run, takes=("onnx",), gives="onnx",
                summary="Weight-only int4 (MatMulNBits, block-wise scales) for MatMul weights.")
