"""export.onnx exporter=genai: a causal LM's KV-cache graph written by onnxruntime-genai's own model
builder (`onnxruntime_genai.models.builder`, from the optional extra `compress[genai]`), the graph the
runtime is fastest with: GroupQueryAttention with the rotary embedding inside and a KV buffer shared
between past and present, SkipSimplifiedLayerNormalization, one MatMul for q/k/v. The builder reads a
transformers folder, so the (possibly pruned) model is saved to one first; it writes fp32 here, and
later passes quantize the graph like any other (quant.int4).

The graph is then made ours: the tied embedding stored once (the builder's `shared_embeddings=false`
gives two float copies; causal_lm.share_tied_embedding keeps one), the cache's head size a number
instead of the builder's symbolic `kv_cache_dim` (compress's runtime builds the empty past from it),
the context length stamped, and one file.

Parity against transformers' forward with a cache: the held-out prompts (batches, right-padded) and
steps with 0, 1 and 7 past tokens and 1 or 6 new ones at batch 1. GroupQueryAttention takes more than
one new token after a past only at batch 1, and left padding not at all (onnxruntime-genai pads on
the right), so the batch-2 left-padded steps of the compress graph's check are not run. Its head size
must be a multiple of 16."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from compress.errors import UserError

BUILT = "builder"  # the builder's output folder, inside the pass's workdir
LARGE = 1_800_000_000  # bytes: a graph this large keeps its weights in model.onnx.data (protobuf stops at 2 GB)


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def build(src: Path, out: Path, precision: str = "fp32", options: list[str] | None = None) -> None:
    """onnxruntime-genai's builder for the CPU on the transformers folder SRC, into OUT, quietly (it prints a
    line per tensor); a failure is one UserError with the builder's last words."""
    import onnxruntime_genai.models  # noqa: F401 - puts the builder's own modules on sys.path
    from onnxruntime_genai.models import builder

    cache = out.parent / f"{out.name}-cache"
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            kw = builder.parse_extra_options(None, str(src), str(out), precision, "cpu", str(cache), list(options or []))
            builder.create_model(None, str(src), str(out), precision, "cpu", str(cache), **kw)
    except Exception as exc:  # noqa: BLE001 - whatever the builder raises: its message and what it printed
        said = [line for line in sink.getvalue().splitlines() if line.strip() and "it/s]" not in line][-5:]
        tail = ("; it printed: " + " | ".join(said)) if said else ""
        raise UserError(f"onnxruntime-genai's builder could not build this model ({type(exc).__name__}: "
                        f"{str(exc)[:300]}){tail}; use export.onnx exporter=legacy (compress's own KV-cache graph)") from None
    finally:
        _remove(cache)


def _check_inputs(graph: Any) -> None:
    """The builder's graph takes what compress's runtime feeds (a model type with other inputs is refused)."""
    from compress.runtime import is_past

    odd = [i.name for i in graph.input if i.name not in ("input_ids", "attention_mask", "position_ids") and not is_past(i.name)]
    if odd:
        raise UserError(f"onnxruntime-genai's builder wrote a graph with inputs compress can't feed ({odd}); "
                        "use export.onnx exporter=legacy")


def fixed_head_size(model: Any, head_dim: int) -> None:
    """The builder leaves the cache's last axis symbolic (`kv_cache_dim`); it is the head size."""
    from compress.runtime import PRESENT_PREFIX, is_past

    for value in [*model.graph.input, *model.graph.output]:
        if is_past(value.name) or value.name.startswith(PRESENT_PREFIX):
            dim = value.type.tensor_type.shape.dim[3]
            if not dim.HasField("dim_value"):
                dim.ClearField("dim_param")
                dim.dim_value = head_dim


def tied_form(graph: Any) -> bool:
    """The builder reads a tied embedding as Gather(Transpose(lm_head weight)): rewritten as compress's own export
    stores it (causal_lm.gather_hidden_first), which quant.int4 quantizes once for both uses. True if rewritten."""
    from compress.exporters import causal_lm

    inits = {i.name: i for i in graph.initializer}
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    for transpose in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits]:
        if len(inits[transpose.input[0]].dims) != 2:
            continue
        users = [n for n in graph.node if transpose.output[0] in n.input]
        gather = users[0] if len(users) == 1 and users[0].op_type == "Gather" else None
        if gather is None or gather.input[0] != transpose.output[0] or gather.input[1] not in ranks:
            continue
        if any(a.name == "axis" and a.i != 0 for a in gather.attribute):
            continue
        causal_lm.gather_hidden_first(graph, gather, transpose.input[0], ranks[gather.input[1]])
        graph.node.remove(transpose)
        return True
    return False


def parity_feeds(model: Any, layout: Any, tokenizer: Any, texts: list[str], max_length: int) -> list[dict]:
    """compress's cache-graph feeds without what GroupQueryAttention can't take (see the module docstring)."""
    from compress.exporters import causal_lm
    from compress.runtime import is_past

    def fits(feed: dict) -> bool:
        if feed["input_ids"].shape[0] == 1:
            return True
        no_past = all(value.shape[2] == 0 for name, value in feed.items() if is_past(name))
        return no_past and bool(feed["attention_mask"][:, 0].all())  # a prompt batch, padded on the right

    return [feed for feed in causal_lm.parity_feeds(model, layout, tokenizer, texts, max_length) if fits(feed)]


def export(model: Any, tokenizer: Any, texts: list[str], cfg: Any, workdir: Path, max_length: int) -> tuple[Path, list[dict]]:
    """Build the graph into workdir/model.onnx and check it; returns (path, parity rows)."""
    import onnx

    from compress.exporters import causal_lm, parity
    from compress.runtime import OnnxRunner

    if tokenizer is None:
        raise UserError("export.onnx exporter=genai needs the model's tokenizer (the builder reads it): give --tokenizer")
    layout = causal_lm.layout_of(model)
    if layout.head_dim % 16:
        raise UserError(f"export.onnx exporter=genai: onnxruntime's GroupQueryAttention needs a head size that is a "
                        f"multiple of 16; this model's is {layout.head_dim}: use exporter=legacy")
    src, built = workdir / "hf", workdir / BUILT
    try:
        model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        config = json.loads((src / "config.json").read_text())
        config["head_dim"] = layout.head_dim  # the builder divides hidden by heads otherwise (wrong after head pruning)
        (src / "config.json").write_text(json.dumps(config, indent=2))
        build(src, built)
        graph = onnx.load(str(built / "model.onnx"))  # the weights come in from model.onnx.data
    finally:
        _remove(src)
    try:
        _check_inputs(graph.graph)
        fixed_head_size(graph, layout.head_dim)
        causal_lm.stamp_context(graph, model.config)
        if not tied_form(graph.graph):  # a tied embedding read through a Transpose, or two equal copies
            causal_lm.share_tied_embedding(graph)  # compares the loaded (no longer external) tensors
        path = workdir / "model.onnx"
        large = graph.ByteSize() > LARGE
        onnx.save(graph, str(path), save_as_external_data=large, location="model.onnx.data" if large else None)
    finally:
        _remove(built)
    feeds = parity_feeds(model, layout, tokenizer, texts, max_length)
    rows = parity.check("export.onnx (onnxruntime-genai builder) vs transformers",
                        causal_lm.real_tokens_only(causal_lm.reference(model, layout)),
                        causal_lm.real_tokens_only(OnnxRunner(path, "causal-lm").raw), feeds, cfg.atol, cfg.min_cosine,
                        cfg.rtol)
    return path, rows


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
