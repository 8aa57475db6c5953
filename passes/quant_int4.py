"""quant.int4: weight-only int4 quantization of MatMul weights into onnxruntime's MatMulNBits.

Each weight matrix is split into blocks of `block_size` values along the input dimension; each
block stores 4-bit codes and one scale (and a zero point when asymmetric), so a (384, 1536) fp32
weight of 2.36 MB becomes ~0.29 MB + 18k scales at block 32. Activations stay float; with
`accuracy_level=4` the kernel computes in int8 for speed. Method: round-to-nearest per block
(the RTN baseline of GPTQ, arXiv 2210.17323). When to use: decoder LLMs and large encoders where
memory bandwidth dominates; after optimize.ort (fused Attention weights stay float).

Causal LMs: the MatMul producing `logits` (lm_head) is quantized unless `lm_head=false`. With
`embeddings=true` the token-embedding Gather becomes a GatherBlockQuantized with the same 4-bit
blocks (uint8 data, two codes a byte, quantized along the hidden axis: onnxruntime's quantizer would
store it as int4, which forces opset 21 onto the graph). When the embedding is the lm_head weight
(tied, SmolLM2: (49152, 576)), the Gather reads the lm_head's MatMulNBits codes and scales through
a Reshape, so the matrix is stored once, in 4 bits: 28.3M weights take 17.7 MB instead of 113 MB
(`lm_head_bits=8`: 31.9 MB, and the logits stay nearly exact).

`block_offsets=true`: asymmetric min/max blocks whose minimum is kept exactly. MatMulNBits' zero point
is an integer code, so a block min + scale * q (GGUF Q4_1, which SmolLM2's weights came from) gets
shifted by up to half a step, the same shift for all 32 weights of the block; that correlated error
took SmolLM2's perplexity from 34.3 to 45-49 (symmetric / asymmetric round-to-nearest, 20 lee
paragraphs). The shift left by the integer zero point is added back by a small float MatMul on block
sums of the input: x @ W = MatMulNBits(x) + (x @ S) @ offsets, S (K, K/block) ones per block, offsets
(K/block, N). SmolLM2 then keeps 34.3; decode is ~1/4 slower than plain MatMulNBits (18 extra
small ops per layer; 30.7 vs 39.2 tokens/s in benchmarks/smollm2_edge.py, fp32 16.8)."""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from compress.config import BlockSize, PassConfig
from compress.context import PassContext
from compress.passes.lib.quantized import matmul_nbits, pack_blocks
from compress.passes.lib.quiet import quiet_root_logger
from compress.passes.lib.selection import Patterns, matching_nodes
from compress.registry import PassSpec
from compress.report import stage_label
from compress.state import ModelState

TRANSPOSE_HIDDEN_LAST = [1, 2, 0]  # (hidden, batch, seq) -> (batch, seq, hidden): a Gather on axis 1


class QuantInt4(PassConfig):
    pass_name = "quant.int4"
    block_size: BlockSize = Field(32, ge=16, le=256, description="weights per quantization block (power of two, >= 16)")
    symmetric: bool = Field(True, description="symmetric blocks (no zero point)")
    accuracy_level: int = Field(4, ge=0, le=4, description="MatMulNBits compute type: 0 default, 1 fp32, 4 int8 (fastest on CPU)")
    exclude: Patterns = Field(default_factory=list, description="node names or 're:' patterns to keep in float")
    lm_head: bool = Field(True, description=(
        "causal LMs: quantize the final MatMul producing the logits (lm_head); false keeps it float "
        "(its error reaches every logit); ignored for graphs without a logits output"))
    lm_head_bits: Literal[4, 8] = Field(4, description=(
        "bits of the lm_head when it is quantized: 8 keeps the logits nearly exact (SmolLM2: +14 MB)"))
    embeddings: bool = Field(False, description=(
        "also quantize token-embedding Gathers (GatherBlockQuantized, same blocks); a tied embedding shares the "
        "lm_head's quantized weight, so it is stored once"))
    block_offsets: bool = Field(False, description=(
        "asymmetric blocks keeping each block's minimum exactly (a float offset, which MatMulNBits' integer zero "
        "point can't hold) through a small correction MatMul on block sums of the input; exact for weights already "
        "on a 4-bit grid (GGUF Q4_1, as SmolLM2), lower error in general, slower decode; lm_head excepted"))


def lm_head_node(graph: Any) -> Any:
    """The MatMul with a constant weight that produces the `logits` output, walking back through
    the ops after it (a bias Add, a Reshape); None for graphs without logits (encoders)."""
    producers = {out: node for node in graph.node for out in node.output}
    consts = {init.name for init in graph.initializer}
    name = "logits" if any(o.name == "logits" for o in graph.output) else None
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "MatMul" and node.input[1] in consts:
            return node
        name = next((i for i in node.input if i in producers), None)
    return None


def _attr(node: Any, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _embedding_gathers(graph: Any) -> list[tuple[Any, Any, bool]]:
    """(Gather, its 2-D float weight, whether the weight is stored (hidden, vocab)) of each token
    embedding: axis 0 on (vocab, hidden), or export.onnx's tied form, axis 1 on the lm_head's
    (hidden, vocab) weight followed by a Transpose to (batch, seq, hidden)."""
    import onnx

    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        init = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if init is None or len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
            continue
        axis, after = _attr(node, "axis", 0), users.get(node.output[0], [])
        if axis == 0:
            found.append((node, init, False))
        elif (axis == 1 and len(after) == 1 and after[0].op_type == "Transpose"
              and next((list(a.ints) for a in after[0].attribute if a.name == "perm"), None) == TRANSPOSE_HIDDEN_LAST):
            found.append((node, init, True))
    return found


def _quantized_head(graph: Any, head: Any) -> Any:
    """The MatMulNBits that replaced the lm_head MatMul (same output), or None."""
    if head is None:
        return None
    return next((n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0].startswith(head.output[0])), None)


def _own_codes(model: Any, weight: np.ndarray, name: str, cfg: QuantInt4) -> list[str]:
    """Quantize a (vocab, hidden) embedding as MatMulNBits would quantize its transpose; add the
    (vocab, hidden / 2) codes, (vocab, blocks) scales (and zero points) as initializers."""
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    algo = DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(algo).qbits_block_quant(np.ascontiguousarray(weight.T))
    arrays = [packed.reshape(weight.shape[0], -1), scales] + ([] if cfg.symmetric else [zero_points])
    names = [f"{name}_Q4G", f"{name}_Q4G_scales", f"{name}_Q4G_zero_points"][: len(arrays)]
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays, names))
    return names


def _shared_codes(model: Any, nbits: Any, vocab: int) -> tuple[list[str], Any]:
    """The lm_head's MatMulNBits codes (vocab, blocks, block * bits / 8) seen as (vocab, hidden * bits / 8)
    through a Reshape, with its scales (and zero points): the tied matrix stays stored once."""
    from onnx import helper, numpy_helper

    shape = numpy_helper.from_array(np.array([vocab, -1], dtype=np.int64), nbits.input[1] + "_gather_shape")
    model.graph.initializer.append(shape)
    flat = nbits.input[1] + "_gather"
    reshape = helper.make_node("Reshape", [nbits.input[1], shape.name], [flat], name=nbits.name + "_gather_reshape")
    return [flat, *nbits.input[2:4]], reshape


def quantize_embeddings(model: Any, head: Any, tied: set[str], cfg: QuantInt4) -> dict[str, str]:
    """Replace each embedding Gather by a GatherBlockQuantized; returns {gather name: "shared" or
    "own"} (shared: a `tied` Gather reads the quantized lm_head's codes)."""
    from onnx import helper, numpy_helper

    graph, done = model.graph, {}
    nbits = _quantized_head(graph, head)
    for gather, init, hidden_first in _embedding_gathers(graph):
        vocab, hidden = (init.dims[1], init.dims[0]) if hidden_first else tuple(init.dims)
        if hidden % cfg.block_size:
            continue  # codes would be padded past the row: keep this Gather in float
        nodes, out = list(graph.node), gather.output[0]
        if hidden_first:  # the Gather and its Transpose become one node writing the Transpose's output
            transpose = next(n for n in nodes if gather.output[0] in n.input)
            out = transpose.output[0]
            graph.node.remove(transpose)
        shared = nbits is not None and gather.name in tied
        if shared:
            inputs, reshape = _shared_codes(model, nbits, vocab)
            graph.node.insert(list(graph.node).index(gather), reshape)
        else:
            weight = numpy_helper.to_array(init)
            inputs = _own_codes(model, weight.T if hidden_first else weight, init.name, cfg)
        bits = _attr(nbits, "bits", 4) if shared else 4
        node = helper.make_node("GatherBlockQuantized", [inputs[0], gather.input[1], *inputs[1:]], [out],
                                name=gather.name + f"_Q{bits}", domain="com.microsoft", bits=bits,
                                block_size=cfg.block_size, gather_axis=0, quantize_axis=1)
        graph.node.insert(list(graph.node).index(gather), node)
        graph.node.remove(gather)
        done[gather.name] = "shared" if shared else "own"
    return done


def tied_gathers(graph: Any, head: Any) -> set[str]:
    """Embedding Gathers holding the lm_head's matrix: the same initializer (export.onnx's form of a
    tied model) or an equal transposed copy (an exporter that kept both); checked before quantizing."""
    from onnx import numpy_helper

    if head is None:
        return set()
    weight = next(i for i in graph.initializer if i.name == head.input[1])
    tied = set()
    for gather, init, hidden_first in _embedding_gathers(graph):
        if hidden_first and init.name == weight.name:
            tied.add(gather.name)
        elif (not hidden_first and list(init.dims) == list(weight.dims)[::-1]
              and np.array_equal(numpy_helper.to_array(init), numpy_helper.to_array(weight).T)):
            tied.add(gather.name)
    return tied


def _offset_codes(weight: np.ndarray, block: int) -> tuple[np.ndarray, ...]:
    """A (K, N) weight as MatMulNBits codes (N, K/block, block/2), scales (N, K/block), packed zero
    points (N, ceil(K/block / 2)) and the float offsets (K/block, N) that the integer zero points miss.
    Each block is min + scale * code, scale = (max - min) / 15: 16 levels spanning the block, so a
    block already on a 4-bit grid (Q4_1: d * q + m) comes back exactly. Offset = min + scale * zero
    point, |offset| <= scale / 2 when the zero point (round(-min / scale)) falls in [0, 15]."""
    k, n = weight.shape
    blocks = weight.reshape(k // block, block, n)
    low, high = blocks.min(1), blocks.max(1)  # (K/block, N)
    scale = (high - low) / 15
    scale[scale == 0] = 1.0  # a constant block: code 0, the offset holds its value
    codes = np.clip(np.round((blocks - low[:, None]) / scale[:, None]), 0, 15).astype(np.uint8)
    zero = np.clip(np.round(-low / scale), 0, 15)
    offsets = (low + scale * zero).astype(np.float32)
    packed, zero_points = pack_blocks(codes.transpose(2, 0, 1).reshape(n, k), zero.T.astype(np.uint8), 4, block)
    return packed, scale.T.astype(np.float32).copy(), zero_points, offsets


def quantize_with_offsets(model: Any, names: set[str], cfg: QuantInt4) -> list[str]:
    """Replace each named MatMul x @ W by MatMulNBits(x) + block_sums(x) @ offsets: block_sums(x) =
    x @ S with S (K, K/block) of ones per block, shared by the MatMuls reading the same x (q, k, v).
    SmolLM2 q_proj: (576, 576) -> 576 x 18 blocks of codes + an (18, 576) offset matrix. Returns the
    names of the small float MatMuls added (they stay float)."""
    from onnx import helper, numpy_helper

    graph, nodes, sums = model.graph, [], {}
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.name not in names:
            nodes.append(node)
            continue
        weight, (x, base, out) = numpy_helper.to_array(inits[node.input[1]]), (*node.input, node.output[0])
        k, n = weight.shape
        arrays = zip(_offset_codes(weight, cfg.block_size), ("_Q4", "_scales", "_zero_points", "_offsets"))
        graph.initializer.extend(numpy_helper.from_array(a, base + suffix) for a, suffix in arrays)
        if x not in sums:
            ones = f"ones_{k}x{k // cfg.block_size}_block_sums"
            if ones not in inits:
                inits[ones] = numpy_helper.from_array(
                    np.kron(np.eye(k // cfg.block_size), np.ones((cfg.block_size, 1))).astype(np.float32), ones)
                graph.initializer.append(inits[ones])
            sums[x] = x + "_block_sums"
            nodes.append(helper.make_node("MatMul", [x, ones], [sums[x]], name=node.name + "_block_sums"))
        nodes += [matmul_nbits([x, base + "_Q4", base + "_scales", base + "_zero_points"], out + "_Q4",
                                 node.name + "_Q4", k, n, 4, cfg.block_size, cfg.accuracy_level),
                  helper.make_node("MatMul", [sums[x], base + "_offsets"], [out + "_offsets"], name=node.name + "_offsets"),
                  helper.make_node("Add", [out + "_Q4", out + "_offsets"], [out], name=node.name + "_plus_offsets")]
    graph.ClearField("node")
    graph.node.extend(nodes)
    return [n.name for n in nodes if n.op_type == "MatMul" and n.name.endswith(("_block_sums", "_offsets"))]


def _offset_targets(graph: Any, skip: set[str], block: int) -> set[str]:
    """MatMuls with a constant 2-D float weight whose K is a whole number of blocks."""
    import onnx

    inits = {i.name: i for i in graph.initializer}
    return {n.name for n in graph.node if n.op_type == "MatMul" and n.name not in skip and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[0] % block == 0
            and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT}


def _digest(weight: np.ndarray) -> bytes:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(weight).tobytes()).digest()


def _recorded_parts(weight: np.ndarray, recorded: dict, widths: dict[int, list[int]]) -> list | None:
    """The recorded layers whose (K, n) transposed weights, side by side along N, make `weight` (K, N): one
    layer, or several an exporter fused into one MatMul (onnxruntime-genai's builder: q, k, v). None if any
    column is not a recorded layer's."""
    k, total = weight.shape
    parts, start = [], 0
    while start < total:
        hit = next((recorded[key] for n in widths.get(k, []) if start + n <= total
                    and (key := _digest(weight[:, start:start + n])) in recorded), None)
        if hit is None:
            return None
        parts.append(hit)
        start += hit[0].shape[0]  # the layer's output features (codes are (N, K))
    return parts


def use_recorded_codes(model: Any, info: dict, cfg: QuantInt4) -> tuple[int, int, int]:
    """Write quant.weight_only's codes (Neural Compressor's GPTQ / AWQ / RTN choices) as MatMulNBits:
    a MatMul whose constant weight is bit for bit a recorded layer's dequantized weight (transposed), or
    several such layers side by side (a fused q/k/v), becomes a MatMulNBits with those codes, scales and
    zero points; symmetric codes (every zero point 2^(bits-1)) leave the zero points out, MatMulNBits'
    default and its faster kernel. Returns (MatMulNBits written, recorded layers written, recorded layers)."""
    import torch
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    from compress.passes.lib.quantized import dequantize

    tensors, bits, group = load_file(info["file"]), info["bits"], info["group_size"]
    recorded = {}
    for key in tensors:
        if key.endswith(".codes"):
            name = key[: -len(".codes")]
            codes, scales, zp = (tensors[f"{name}.{part}"] for part in ("codes", "scales", "zero_points"))
            weight = dequantize(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zp), group).numpy()
            recorded[_digest(weight.T)] = (codes, scales, zp)
    widths: dict[int, list[int]] = {}
    for codes, _, _ in recorded.values():
        widths.setdefault(codes.shape[1], []).append(codes.shape[0])
    widths = {k: sorted(set(ns), reverse=True) for k, ns in widths.items()}
    graph, done, matmuls, nodes = model.graph, 0, 0, []
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        parts = None
        if init is not None and len(init.dims) == 2 and init.dims[0] in widths:
            parts = _recorded_parts(numpy_helper.to_array(init), recorded, widths)
        if parts is None:
            nodes.append(node)
            continue
        codes, scales, zp = (np.concatenate(side_by_side, axis=0) for side_by_side in zip(*parts))
        n, k = codes.shape
        packed, zero_points = pack_blocks(codes, zp, bits, group)
        base = f"{node.input[1]}_Q{bits}G{group}"
        arrays = [(packed, ""), (scales.astype(np.float32), "_scales")]
        if not (zp == 2 ** (bits - 1)).all():
            arrays.append((zero_points, "_zero_points"))
        graph.initializer.extend(numpy_helper.from_array(a, base + suffix) for a, suffix in arrays)
        nodes.append(matmul_nbits([node.input[0], *(base + suffix for _, suffix in arrays)], node.output[0],
                                   node.name + f"_Q{bits}", k, n, bits, group, cfg.accuracy_level))
        done, matmuls = done + len(parts), matmuls + 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return matmuls, done, len(recorded)


def _nbits(model: Any, bits: int, excluded: list[str], cfg: QuantInt4) -> Any:
    """onnxruntime's MatMulNBits quantizer over the MatMuls not `excluded`; returns its ONNXModel."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    algo = DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                        accuracy_level=cfg.accuracy_level, bits=bits)
    quant = MatMulNBitsQuantizer(model, bits=bits, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                 accuracy_level=cfg.accuracy_level, nodes_to_exclude=excluded, algo_config=algo)
    with quiet_root_logger():
        quant.process()
    return quant.model


def run(state: ModelState, cfg: QuantInt4, ctx: PassContext) -> ModelState:
    import onnx

    model = onnx.load(str(state.path))
    head = lm_head_node(model.graph)
    quant_head = head is not None and cfg.lm_head
    tied = tied_gathers(model.graph, head) if cfg.embeddings and quant_head else set()
    excluded = matching_nodes(state.path, cfg.exclude)
    if head is not None and not cfg.lm_head:
        excluded.append(head.name)
    recorded = state.meta.get("weight_only")
    if recorded:
        matmuls, rewritten, layers = use_recorded_codes(model, recorded, cfg)
        if rewritten == 0:
            raise ValueError(f"none of the {layers} layers quantized by quant.weight_only were found in this graph "
                             "(a pass between them changed the weights): put quant.int4 right after export.onnx")
        if rewritten < layers:
            ctx.console.print(f"[yellow]quant.int4: {layers - rewritten} of the {layers} layers quantized by quant.weight_only "
                              "are not in this graph as they were (a pass in between changed them): they are rounded "
                              "to nearest here instead[/yellow]")
        ctx.notes["weight_only"] = {"method": recorded["method"], "matmuls": matmuls, "written": rewritten,
                                    "layers": layers}
    keep = set(excluded) | ({head.name} if head is not None else set())
    targets = _offset_targets(model.graph, keep, cfg.block_size) if cfg.block_offsets else set()
    small = quantize_with_offsets(model, targets, cfg) if targets else []
    eight = quant_head and cfg.lm_head_bits == 8
    quant = _nbits(model, 4, excluded + small + ([head.name] if eight else []), cfg)
    if eight:  # a second pass at 8 bits over the lm_head only
        others = [n.name for n in quant.model.graph.node if n.op_type == "MatMul" and n.name != head.name]
        quant = _nbits(quant.model, 8, others, cfg)
    embedded = quantize_embeddings(quant.model, head, tied, cfg) if cfg.embeddings else {}
    quant.clean_initializers()
    dst = ctx.workdir / "model.onnx"
    quant.save_model_to_file(str(dst), use_external_data_format=False)
    n = sum(1 for node in onnx.load(str(dst), load_external_data=False).graph.node if node.op_type == "MatMulNBits")
    if n == 0:
        raise ValueError("no MatMul with a constant weight was found to quantize (is the graph already quantized?)")
    ctx.notes.update(matmulnbits_nodes=n, excluded=excluded, lm_head=head.name if head is not None else None,
                     quantized_embeddings=embedded, offset_matmuls=len(targets))
    return state.with_file(dst, "onnx", quantized="int4")


def _check_order(cfg: QuantInt4, form: str | None, earlier: list) -> list[str]:
    """Orders that fail at run time: int8 weights before (no float MatMul left), or a second quant.int4
    after quant.weight_only (the first wrote the recorded codes; the second finds none of them). A pass
    that changes only some weights in between (pruning) is allowed: the run counts the MatMuls whose
    codes still fit and fails with a message when none are left."""
    from compress.passes.lib import sequential
    from compress.passes.lib.quantized import int8_weights_before

    int8 = int8_weights_before(earlier)
    if int8 is not None:
        j, what = int8
        fix = "put quant.int4 before quant.int8" if what == "quant.int8" else "use export.riq weights=float"
        return [f"the MatMul weights are int8 after passes[{j}] ({what}), so quant.int4 finds no float weight to "
                f"quantize and fails: {fix}"]
    wo = next((j for j in range(len(earlier) - 1, -1, -1) if earlier[j] is not None
               and earlier[j].pass_name == "quant.weight_only"), None)
    again = [k for k in range(wo + 1, len(earlier)) if earlier[k] is not None
             and earlier[k].pass_name == "quant.int4"] if wo is not None else []
    if again:
        return [f"quant.int4 runs twice after quant.weight_only (also passes[{again[0]}]): the first writes the recorded "
                "codes, and the second finds none of them and fails; keep one quant.int4"]
    if (wo is not None and getattr(earlier[wo], "lm_head", False) and earlier[wo].method in sequential.METHODS
            and (not cfg.lm_head or cfg.lm_head_bits != earlier[wo].bits)):
        return [f"quant.weight_only (passes[{wo}]) rounded the lm_head to {earlier[wo].bits} bits, and quant.int4 writes "
                f"those codes, so its lm_head={str(cfg.lm_head).lower()} lm_head_bits={cfg.lm_head_bits} cannot apply: "
                f"use quant.int4 lm_head_bits={earlier[wo].bits}, or quant.weight_only lm_head=false"]
    return []


def _report(stage: dict) -> list[str]:
    """The `weight_only` note: how many layers quant.weight_only quantized were written with their codes, under
    the heading quant.weight_only's line has (the two describe one quantization)."""
    w = stage.get("weight_only")
    if not w:
        return []
    written = w.get("written", w["matmuls"])  # reports before fused layers were counted apart
    rest = "" if written == w["layers"] else " (the others changed after quantization: rounded to nearest)"
    fused = f" ({w['matmuls']} MatMulNBits: some layers fused into one MatMul)" if w["matmuls"] != written else ""
    return [f"- {stage_label(stage)}: {written} of the {w['layers']} layers quantized with {w['method']} written as "
            f"MatMulNBits with their recorded codes{fused}{rest}"]


PASS = PassSpec(name="quant.int4", config=QuantInt4, run=run, takes=("onnx",), gives="onnx", check_order=_check_order,
                report=_report, report_group="Weight-only quantization",
                summary="Weight-only int4 (MatMulNBits, block-wise scales) for MatMul weights; optionally embeddings.")
