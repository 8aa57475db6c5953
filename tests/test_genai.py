"""onnxruntime-genai (the runtime apps ship LLMs with) loads compress's causal-LM outputs as they are:
the genai_config.json written beside every KV-cache graph, read from the graph; greedy tokens from
onnxruntime-genai equal `compress generate`'s and transformers' generate (tiny GQA Llama: 4 query
heads, 2 key/value heads), after export.onnx and after quant.int4, for compress's own graph and for
the builder's (export.onnx exporter=genai: GroupQueryAttention over a shared KV buffer). Tests that
need the optional package (`pip install 'compress[genai]'`) skip without it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress import Pipeline
from compress.errors import UserError
from compress.exporters import genai, genai_builder
from compress.generate import generate

PROMPT = "The bushfires west of Sydney burned for three days before"
NEW = 12


def _fast():
    from rich.console import Console

    from compress.profiling import LatencySettings

    return dict(latency=LatencySettings(batch=1, seq=16, threads=1, warmup=1, runs=5), tasks=False,
                max_length=32, console=Console(quiet=True))


BUILDER = {"pass": "export.onnx", "exporter": "genai"}


@pytest.fixture(scope="module")
def outputs(tiny_llama, tiny_llama16, tiny_mixtral, text_file, tmp_path_factory):
    """Output folders of compress run: compress's cache graph (fp32, int4, a Mixtral MoE, head- and FFN-pruned) and
    the builder's (fp32, int4; its tiny Llama ties the embedding and the lm_head)."""
    root = tmp_path_factory.mktemp("genai")
    runs = {"fp32": (tiny_llama, ["export.onnx"]), "int4": (tiny_llama, ["export.onnx", "quant.int4"]),
            "moe": (tiny_mixtral, ["export.onnx"]),
            "pruned": (tiny_llama, [{"pass": "prune.structured", "heads": 0.5, "ffn": 0.5}, "export.onnx"])}
    if genai_builder.available():
        runs |= {"builder-fp32": (tiny_llama16, [BUILDER]), "builder-int4": (tiny_llama16, [BUILDER, "quant.int4"])}
    folders = {}
    for name, (model, passes) in runs.items():
        Pipeline(passes).run(str(model), str(text_file), root / name, **_fast())
        folders[name] = root / name
    return folders


def _model_of(form: str, tiny_llama, tiny_llama16, tiny_mixtral):
    return tiny_llama16 if form.startswith("builder") else tiny_mixtral if form == "moe" else tiny_llama


def _og_greedy(folder, ids: list[int], new: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]


def test_config_is_read_from_the_graph(outputs, tiny_llama):
    cfg = json.loads((outputs["fp32"] / genai.CONFIG).read_text())
    dec = cfg["model"]["decoder"]
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"], dec["num_attention_heads"]) == (2, 2, 8, 4)
    assert dec["inputs"]["position_ids"] == "position_ids" and dec["inputs"]["attention_mask"] == "attention_mask"
    assert cfg["model"]["vocab_size"] == 30522 and cfg["model"]["context_length"] == 256
    assert cfg["search"]["past_present_share_buffer"] is False  # our graphs concatenate past and new keys
    assert (outputs["int4"] / genai.CONFIG).is_file()


def test_no_config_for_graphs_without_a_cache(tiny_bert, text_file, tmp_path):
    Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "o", **_fast())
    assert not (tmp_path / "o" / genai.CONFIG).exists()


@pytest.mark.parametrize("form", ["fp32", "int4", "moe", "pruned", "builder-fp32", "builder-int4"])
def test_genai_greedy_equals_compress_generate(outputs, form, tiny_llama, tiny_llama16, tiny_mixtral):
    from transformers import AutoTokenizer

    if form not in outputs:
        pytest.skip("onnxruntime-genai is not installed (pip install 'compress[genai]')")
    source = _model_of(form, tiny_llama, tiny_llama16, tiny_mixtral)
    tok = AutoTokenizer.from_pretrained(source)
    ids = tok(PROMPT)["input_ids"]
    ours = generate(outputs[form] / "model.onnx", tok, PROMPT, max_new_tokens=NEW, stop_tokens=[], chat=False).token_ids
    theirs = _og_greedy(outputs[form], ids, NEW)
    assert theirs == ours
    if form == "pruned":  # half the query heads (and their kv heads) left: the config says so
        decoder = json.loads((outputs[form] / genai.CONFIG).read_text())["model"]["decoder"]
        assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (2, 1)
    if form.endswith("fp32"):  # and both equal transformers' own greedy generate
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source).eval()
        with torch.inference_mode():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None)
        assert hf[0, len(ids):].tolist() == ours


def test_builder_graph(outputs):
    """The builder's fused ops, the shared buffer in the config, parity rows on prompts and batch-1 steps."""
    import onnx

    if "builder-fp32" not in outputs:
        pytest.skip("onnxruntime-genai is not installed (pip install 'compress[genai]')")
    folder = outputs["builder-fp32"]
    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    graph = onnx.load(str(folder / "model.onnx")).graph  # the tied matrix stored once (the builder writes two copies)
    assert sum(1 for i in graph.initializer if 30522 in i.dims) == 1
    head = next(n for n in graph.node if n.op_type == "MatMul" and n.output[0] == "logits")
    gather = next(n for n in graph.node if n.op_type == "Gather" and "input_ids" in n.input)
    assert gather.input[0] == head.input[1]  # compress's tied form (axis 1 + Transpose): quant.int4 shares its codes
    assert json.loads((folder / genai.CONFIG).read_text())["search"]["past_present_share_buffer"] is True
    report = json.loads((folder / "report.json").read_text())
    parity = report["stages"][1]["parity"]
    assert {row["name"] for row in parity} == {"logits", *(f"present.{i}.{t}" for i in (0, 1) for t in ("key", "value"))}
    assert all(row["ok"] for row in parity)
    assert report["stages"][1]["fidelity"]["top1"] == 1.0
    int4 = onnx.load(str(outputs["builder-int4"] / "model.onnx"))
    assert any(node.op_type == "MatMulNBits" for node in int4.graph.node)


def test_builder_refuses_what_it_cannot_build(tiny_bert, tiny_llama, text_file, tmp_path):
    with pytest.raises(UserError, match="causal LMs with a KV cache only"):
        Pipeline([BUILDER]).run(str(tiny_bert), str(text_file), tmp_path / "bert", **_fast())
    if genai_builder.available():
        with pytest.raises(UserError, match="multiple of 16"):  # tiny_llama's head size is 8
            Pipeline([BUILDER]).run(str(tiny_llama), str(text_file), tmp_path / "llama", **_fast())


@pytest.mark.slow
def test_smollm2_answers_in_onnxruntime_genai(tmp_path):
    """The real SmolLM2-135M-Instruct through the builder's graph and int4: asked through its chat template it
    answers, and onnxruntime-genai makes the same greedy tokens as compress generate."""
    pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    out = tmp_path / "o"
    Pipeline([BUILDER, {"pass": "quant.int4", "lm_head_bits": 8}]).run("smollm2", "lee", out, max_length=64)
    tok = AutoTokenizer.from_pretrained(out)
    question = "What is the capital of France? Answer in one word."
    ours = generate(out / "model.onnx", tok, question, max_new_tokens=8)
    assert "paris" in ours.text.lower()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert _og_greedy(out, ids, len(ours.token_ids)) == ours.token_ids


def test_a_builder_graph_is_an_input_like_any_onnx_model(outputs, text_file, tmp_path):
    """Its SimplifiedLayerNormalization is onnxruntime's op in the default domain (the ONNX checker does not know
    it): the file is accepted because onnxruntime loads it, and later passes run on it."""
    if "builder-fp32" not in outputs:
        pytest.skip("onnxruntime-genai is not installed (pip install 'compress[genai]')")
    result = Pipeline(["quant.int4"]).run(str(outputs["builder-fp32"] / "model.onnx"), str(text_file), tmp_path / "q",
                                          **_fast())
    assert result.report["stages"][-1]["fidelity"]["top1"] > 0.5
    assert (tmp_path / "q" / genai.CONFIG).is_file()
