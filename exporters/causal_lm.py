"""export.onnx for causal LMs with a KV cache (cache=true): one graph serves the prompt step and
every decode step, checked against transformers' own forward with a cache.

Graph inputs: `input_ids` (batch, sequence), `attention_mask` (batch, total_sequence) covering the
past and the new tokens, `position_ids` (batch, sequence), and `past_key_values.{i}.key` / `.value`
(batch, kv_heads, past_sequence, head_dim) per layer i. Outputs: `logits` (batch, sequence, vocab)
and `present.{i}.key` / `.value` (batch, kv_heads, total_sequence, head_dim), fed back as the next
step's past. Grouped-query attention keeps kv_heads in the cache, not the query heads (tiny_llama:
2 of 4, SmolLM2-135M: 3 of 9). The prompt step feeds an empty past (past_sequence = 0).

How: a wrapper puts the flat past tensors into a transformers `DynamicCache` (each layer's keys and
values set directly; `DynamicLayer.update` then concatenates the new ones along the sequence axis,
a Concat in the graph) and hands the model a ready 4D mask made of tensor ops only. transformers'
own mask code sizes the mask from the cache length as a Python int, which a tracer would freeze;
given a 4D mask it steps aside. Both exporters trace this wrapper; legacy is the default (it keeps
the eager attention pattern ORT's optimizer knows, docs/install.md). A tied embedding / lm_head matrix is
stored once (`share_tied_embedding`).

Parity: on the held-out text batches as prompt steps (empty past), and on steps with 0, 1 and 7 past
tokens and 1 or 6 new ones, at batch 1 and at batch 2 with the second row left-padded; the past of
each step comes from transformers' forward on the prefix."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.exporters import parity
from compress.runtime import PAST_PREFIX, PRESENT_PREFIX, position_ids

CASES = ((0, 1), (0, 6), (1, 1), (1, 6), (7, 1), (7, 6))  # (past tokens, new tokens) of the parity steps
LEFT_PAD = 2  # pad tokens in front of the second row of a batch-2 step


@dataclass(frozen=True)
class Layout:
    """The cache of one model: number of layers, key/value heads, head size."""

    layers: int
    kv_heads: int
    head_dim: int

    def past_names(self) -> list[str]:
        return [f"{PAST_PREFIX}{i}.{t}" for i in range(self.layers) for t in ("key", "value")]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *(f"{PRESENT_PREFIX}{i}.{t}" for i in range(self.layers) for t in ("key", "value"))]


def flat_cache(cache: Any) -> list:
    """[key 0, value 0, key 1, value 1, ...] of a transformers cache."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def layout_of(model: Any) -> Layout:
    """Read the cache shape from one real forward, and refuse caches a plain concat can't express."""
    import torch
    from transformers.cache_utils import DynamicLayer

    with torch.inference_mode():
        cache = model(input_ids=torch.ones((1, 1), dtype=torch.long), use_cache=True).cache
    odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if odd:
        raise ValueError(f"export.onnx cache=true supports full-attention caches (DynamicLayer) only; this model "
                         f"uses {odd} (sliding-window or hybrid attention): export it with cache=false")
    _, kv_heads, _, head_dim = cache.layers[0].keys.shape
    return Layout(len(cache.layers), int(kv_heads), int(head_dim))


def causal_mask(input_ids: Any, attention_mask: Any, dtype: Any) -> Any:
    """(batch, 1, new, past + new) additive mask: 0 where new token j may see token k (k at or before
    j in the whole sequence, and not padding), the dtype's minimum elsewhere. Sizes come from tensor
    ops (cumsum of ones), never Python ints, so every axis stays dynamic in the graph.
    Past 2, new 2, mask [1, 1, 1, 1]: row j=0 (position 2) sees [0, 0, 0, min]; row j=1 sees all."""
    import torch

    ones_new, ones_all = torch.ones_like(input_ids), torch.ones_like(attention_mask)
    past = ones_all.sum(-1, keepdim=True) - ones_new.sum(-1, keepdim=True)  # (batch, 1)
    query_at = ones_new.cumsum(-1) - 1 + past  # (batch, new): index of each new token in the sequence
    key_at = ones_all.cumsum(-1) - 1  # (batch, past + new)
    allowed = (key_at[:, None, :] <= query_at[:, :, None]) & attention_mask.bool()[:, None, :]
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)[:, None]


def wrapper(model: Any) -> Any:
    import torch
    from transformers import DynamicCache

    class CacheWrapper(torch.nn.Module):
        """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *presents)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.model.config)
            for i, layer in enumerate(cache.layers):
                key, value = past[2 * i], past[2 * i + 1]
                layer.lazy_initialization(key, value)
                layer.keys, layer.values = key, value  # (batch, kv_heads, past_sequence, head_dim)
            mask = causal_mask(input_ids, attention_mask, self.model.dtype)
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                             use_cache=True)
            return (out.logits, *flat_cache(out.cache))

    return CacheWrapper().eval()  # eval on the wrapper: the exporter restores its train mode recursively


def _axes(layout: Layout) -> dict:
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in layout.past_names()})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in layout.output_names()[1:]})
    return axes


def export_graph(wrap: Any, feed: dict, path: Path, layout: Layout, opset: int, exporter: str) -> None:
    """Trace on `feed` (a step with a non-empty past, so no axis is 0 or 1 while tracing)."""
    import torch

    names = layout.input_names()
    args = tuple(torch.from_numpy(feed[name]) for name in names)
    if exporter == "legacy":
        with warnings.catch_warnings():  # tracer warnings on shape branches: parity on other shapes is the check
            warnings.simplefilter("ignore")
            torch.onnx.export(wrap, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                              output_names=layout.output_names(), dynamic_axes=_axes(layout))
        return
    dim = torch.export.Dim
    batch, seq, total = dim("batch", min=1), dim("sequence", min=1), dim("total_sequence", min=1)
    past = tuple({0: batch, 2: dim("past_sequence", min=0)} for _ in layout.past_names())
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: seq}, "past": past}
    prog = torch.onnx.export(wrap, args, dynamo=True, opset_version=max(opset, 18), input_names=names,
                             output_names=layout.output_names(), dynamic_shapes=shapes)
    prog.save(str(path), external_data=False)


def stamp_context(model: Any, config: Any) -> None:
    """Record the model's context length in the graph's metadata, for `compress generate` on a model
    folder without config.json."""
    import onnx

    limit = getattr(config, "max_position_embeddings", None)
    if limit:
        onnx.helper.set_model_props(model, {"max_position_embeddings": str(int(limit))})


def _tied_pair(graph: Any) -> tuple[Any, Any] | None:
    """(embedding Gather, lm_head weight) when the Gather's (vocab, hidden) weight equals the transpose
    of a MatMul's (hidden, vocab) weight; weights held in external data are not compared."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL}
    heads = [inits[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    for node in graph.node:
        emb = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if emb is None or len(emb.dims) != 2 or any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        for head in heads:
            if list(head.dims) == list(emb.dims)[::-1] and np.array_equal(
                    numpy_helper.to_array(head), numpy_helper.to_array(emb).T):
                return node, head
    return None


def gather_hidden_first(graph: Any, gather: Any, weight: str, rank: int) -> None:
    """Point the embedding Gather at the (hidden, vocab) lm_head weight on its axis 1, giving (hidden, batch, seq)
    for (batch, seq) ids (`rank` 2), and put hidden last again with a Transpose: the tied form quant.int4 knows."""
    import onnx

    out = gather.output[0]
    gather.input[0], gather.output[0] = weight, out + "_hidden_first"
    gather.ClearField("attribute")
    gather.attribute.append(onnx.helper.make_attribute("axis", 1))
    transpose = onnx.helper.make_node("Transpose", [gather.output[0]], [out], name=gather.name + "_hidden_last",
                                      perm=[*range(1, rank + 1), 0])
    graph.node.insert(list(graph.node).index(gather) + 1, transpose)


def share_tied_embedding(model: Any) -> int:
    """A tied embedding / lm_head (SmolLM2: one (49152, 576) matrix) leaves the legacy exporter twice:
    the Gather's (vocab, hidden) weight and a constant-folded (hidden, vocab) transpose for the lm_head
    MatMul, 113 MB more (652.6 MB instead of 539.3 MB). The Gather is pointed at the lm_head's copy
    on its axis 1, giving (hidden, batch, seq), and a Transpose puts hidden last again. Returns the
    bytes saved (0 when nothing is tied)."""
    import onnx

    graph = model.graph
    pair = _tied_pair(graph)
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    if pair is None or pair[0].input[1] not in ranks:
        return 0
    gather, head = pair
    emb = next(i for i in graph.initializer if i.name == gather.input[0])
    gather_hidden_first(graph, gather, head.name, ranks[gather.input[1]])
    if not any(emb.name in n.input for n in graph.node):
        graph.initializer.remove(emb)
        return int(np.prod(emb.dims)) * onnx.helper.tensor_dtype_to_np_dtype(emb.data_type).itemsize
    return 0


def finish_graph(path: Path, config: Any) -> int:
    """Stamp the context length and store a tied embedding once; returns the bytes saved."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    stamp_context(model, config)
    saved = share_tied_embedding(model)
    onnx.save(model, str(path))
    return saved


def _torch_past(model: Any, layout: Layout, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> dict:
    """The cache transformers makes for a prefix, as the graph's past inputs."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), use_cache=True)
    return {name: t.numpy() for name, t in zip(layout.past_names(), flat_cache(out.cache))}


def _empty_past(model: Any, layout: Layout, batch: int) -> dict:
    import torch

    zeros = torch.zeros((batch, layout.kv_heads, 0, layout.head_dim), dtype=model.dtype).numpy()
    return {name: zeros for name in layout.past_names()}


def step_feed(model: Any, layout: Layout, rows: list[np.ndarray], batch: int, past: int, new: int, pad_id: int) -> dict:
    """A step with `past` cached tokens and `new` fed ones; with batch 2 the second row is
    left-padded (past 1, new 1: ids [[a0, a1], [pad, b0]], mask [[1, 1], [0, 1]])."""
    total = past + new
    ids = np.stack([np.resize(rows[i % len(rows)], total) for i in range(batch)]).astype(np.int64)
    mask = np.ones_like(ids)
    if batch > 1:
        pad = min(LEFT_PAD, total - 1)
        ids[1] = np.concatenate([np.full(pad, pad_id), ids[1, : total - pad]])
        mask[1, :pad] = 0
    pos = position_ids(mask, total)
    cached = (_torch_past(model, layout, ids[:, :past], mask[:, :past], pos[:, :past]) if past
              else _empty_past(model, layout, batch))
    return {"input_ids": ids[:, past:], "attention_mask": mask, "position_ids": pos[:, past:], **cached}


def parity_feeds(model: Any, layout: Layout, tokenizer: Any, texts: list[str], max_length: int) -> list[dict]:
    """Held-out text batches as prompt steps, then the CASES at batch 1 and 2; the last feed (batch 2,
    past 7, new 6) is the one the graph is traced on."""
    prompts = []
    for feed in parity.text_feeds(tokenizer, texts, max_length):
        batch, seq = feed["input_ids"].shape
        prompts.append({**feed, "position_ids": position_ids(feed["attention_mask"], seq),
                        **_empty_past(model, layout, batch)})
    if tokenizer is None:
        rows = list(np.random.default_rng(0).integers(5, 100, size=(2, 16)))
    else:
        sources = (texts or ["a short sample sentence."])[:2]
        rows = [np.asarray(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in sources]
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    steps = [step_feed(model, layout, rows, batch, past, new, pad_id) for batch in (1, 2) for past, new in CASES]
    return prompts + steps


def reference(model: Any, layout: Layout):
    """transformers' own forward with a DynamicCache holding the feed's past (its own mask code)."""
    import torch
    from transformers import DynamicCache

    def run(feed: dict) -> dict:
        past = [torch.from_numpy(feed[name]) for name in layout.past_names()]
        cache = DynamicCache(ddp_cache_data=list(zip(past[::2], past[1::2])), config=model.config)
        args = {k: torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask", "position_ids")}
        with torch.inference_mode():
            out = model(**args, cache=cache, use_cache=True)
        return {n: t.float().numpy() for n, t in zip(layout.output_names(), (out.logits, *flat_cache(out.cache)))}

    return run


def real_tokens_only(run):
    """Zero what belongs to padding before comparing: the logits and cached keys / values of pad
    tokens. Nothing ever attends to them, and what a left pad token's fully masked query row computes
    (hence its logits and, from the second layer on, its keys / values) differs between attention
    kernels (eager: uniform weights; sdpa: another value): numbers generation never reads."""

    def masked(feed: dict) -> dict:
        out = run(feed)
        mask = feed["attention_mask"].astype(bool)  # (batch, total)
        new = feed["input_ids"].shape[1]
        return {name: np.where(mask[:, -new:, None] if name == "logits" else mask[:, None, :, None], value, 0)
                for name, value in out.items()}

    return masked


def export(model: Any, tokenizer: Any, texts: list[str], cfg: Any, workdir: Path, max_length: int) -> tuple[Path, list[dict]]:
    """Export the cache graph to workdir/model.onnx and check it; returns (path, parity rows)."""
    from compress.runtime import OnnxRunner

    layout = layout_of(model)
    feeds = parity_feeds(model, layout, tokenizer, texts, max_length)
    path = workdir / "model.onnx"
    export_graph(wrapper(model), feeds[-1], path, layout, cfg.opset, cfg.exporter)
    finish_graph(path, model.config)
    rows = parity.check("export.onnx (KV cache) vs transformers", real_tokens_only(reference(model, layout)),
                        real_tokens_only(OnnxRunner(path, "causal-lm").raw), feeds, cfg.atol, cfg.min_cosine, cfg.rtol)
    return path, rows
