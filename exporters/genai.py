"""onnxruntime-genai model folders: every causal-LM graph with a KV cache that compress writes gets a
`genai_config.json` beside it, so `onnxruntime_genai.Model(OUT)` loads the output folder as it is
(the runtime apps ship on Android, iOS and desktop; `pip install 'compress[genai]'` for its Python
package).

What the runtime needs is read from the graph itself, not from the model's config: the input and output
names (`input_ids`, `attention_mask`, `position_ids` when the graph takes them, `past_key_values.%d.key` /
`.value` -> `present.%d.key` / `.value`), the layers, key/value heads and head size of the cache, the
vocabulary from `logits`. The config (config.json, or the model's `hf_config`) adds the query heads,
hidden size, context length and special tokens; the tokenizer's own eos joins the config's.

`past_present_share_buffer` says whether the graph writes the new keys into the past buffer in place
(fused GroupQueryAttention over a preallocated cache); compress's own graphs concatenate past and new
keys (`present` one token longer than `past`), so it is false for them."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from compress.errors import UserError

CONFIG = "genai_config.json"
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def graph_layout(path: Path) -> dict | None:
    """Names and cache shape of a KV-cache graph (None when the graph has no cache): inputs, outputs,
    layers, kv_heads, head_size, vocab."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    past = sorted((int(m.group(1)), m.group(2), name) for name in inputs if (m := PAST.match(name)))
    if not past or "input_ids" not in inputs or "logits" not in outputs:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[past[0][2]].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[1] or not dims[3]:
        return None
    vocab = [d.dim_value if d.HasField("dim_value") else None for d in outputs["logits"].type.tensor_type.shape.dim]
    context = {p.key: p.value for p in model.metadata_props}.get("max_position_embeddings", "")
    return {"inputs": list(inputs), "outputs": list(outputs), "layers": past[-1][0] + 1, "kv_heads": dims[1],
            "head_size": dims[3], "vocab": vocab[-1] if vocab else None, "share_buffer": _shares_buffer(graph),
            "context": int(context) if context.isdigit() else None}


def _shares_buffer(graph: Any) -> bool:
    """A graph whose attention is GroupQueryAttention writes present into the past buffer (the builder's)."""
    return any(node.op_type == "GroupQueryAttention" for node in graph.node)


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def config_for(layout: dict, hf_config: dict, tokenizer: Any = None, filename: str = "model.onnx") -> dict:
    """The genai_config.json of one graph (see the module docstring)."""
    from compress.generate import CONTEXT_KEYS

    hf_config = hf_config.get("text_config") or hf_config  # multimodal configs nest the decoder's
    eos = _ids(hf_config.get("eos_token_id"))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int) and tok_eos not in eos:
        eos = [tok_eos, *eos]
    if not eos:
        raise UserError("no end-of-sequence token (eos_token_id) in the model's config or tokenizer")
    heads = hf_config.get("num_attention_heads")
    if not isinstance(heads, int):
        raise UserError("no num_attention_heads in the model's config")
    bos = _ids(hf_config.get("bos_token_id")) or _ids(getattr(tokenizer, "bos_token_id", None)) or [eos[0]]
    pad = _ids(hf_config.get("pad_token_id")) or _ids(getattr(tokenizer, "pad_token_id", None)) or [eos[0]]
    context = next((int(hf_config[k]) for k in CONTEXT_KEYS if isinstance(hf_config.get(k), int)), layout["context"])
    if context is None:
        raise UserError("no context length (max_position_embeddings) in the model's config or graph")
    names = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in layout["inputs"]:
            names[name] = name
    names |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    return {
        "model": {
            "bos_token_id": bos[0], "context_length": context, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad[0], "type": "llama", "vocab_size": layout["vocab"] or hf_config.get("vocab_size"),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename, "head_size": layout["head_size"],
                "hidden_size": hf_config.get("hidden_size") or heads * layout["head_size"],
                "num_attention_heads": heads, "num_hidden_layers": layout["layers"],
                "num_key_value_heads": layout["kv_heads"], "inputs": names,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "early_stopping": True, "length_penalty": 1.0, "max_length": context,
                   "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": layout["share_buffer"], "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }


def _as_hf(prior: Path) -> dict:
    """What an earlier genai_config.json says that a transformers config would (for an ONNX input without one)."""
    model = json.loads(prior.read_text()).get("model", {})
    decoder = model.get("decoder", {})
    return {key: value for key, value in {
        "eos_token_id": model.get("eos_token_id"), "bos_token_id": model.get("bos_token_id"),
        "pad_token_id": model.get("pad_token_id"), "max_position_embeddings": model.get("context_length"),
        "num_attention_heads": decoder.get("num_attention_heads"), "hidden_size": decoder.get("hidden_size")}.items()
        if value is not None}


def write(folder: Path, graph: str, hf_config: Any, tokenizer: Any = None, prior: Path | None = None) -> str | None:
    """Write FOLDER/genai_config.json for FOLDER/GRAPH when it is a KV-cache graph. `hf_config`: a transformers
    config, a dict, or a config.json path (None: nothing but the graph and tokenizer to go by); `prior`: the
    input's own genai_config.json, for what the config does not say. Returns why it was not written (an
    optional file: the caller warns and goes on), or None."""
    layout = graph_layout(folder / graph)
    if layout is None:
        return None
    try:
        if isinstance(hf_config, Path):
            hf_config = json.loads(hf_config.read_text()) if hf_config.is_file() else {}
        elif hf_config is None:
            hf_config = {}
        elif not isinstance(hf_config, dict):
            hf_config = hf_config.to_dict()
        if prior is not None and prior.is_file():
            hf_config = {**_as_hf(prior), **hf_config}
        config = config_for(layout, hf_config, tokenizer, graph)
    except (UserError, OSError, ValueError) as exc:
        return f"no {CONFIG} (onnxruntime-genai needs it to load the folder): {exc}"
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return None


def load(folder: Path, threads: int | None = None) -> Any:
    """An onnxruntime_genai.Model of FOLDER with `threads` intra-op threads. Its threads spin while idle (the
    runtime's config has no switch for it): time one model at a time, not next to other live sessions."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UserError("onnxruntime-genai is not installed: pip install 'compress[genai]'") from None
    config = og.Config(str(folder))
    if threads:
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def generate_once(model: Any, ids: Any, new_tokens: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of one greedy onnxruntime-genai run making exactly `new_tokens` tokens
    after the (1, prompt) `ids`: the prompt step and first token, then one decode step per token."""
    import time

    import numpy as np
    import onnxruntime_genai as og

    total = ids.shape[1] + new_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    gen.generate_next_token()
    t1 = time.perf_counter()
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    decode_s = time.perf_counter() - t1
    return t1 - t0, (steps / decode_s if steps and decode_s > 0 else 0.0)
