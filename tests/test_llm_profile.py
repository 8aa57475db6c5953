"""Generation profiling and int4 options for causal-LM graphs with a KV cache, on tiny_llama (untied
embedding / lm_head) and a tied variant: the profile pass and every ONNX stage record time to first
token and decode tokens/s, report.md shows them (and encoder reports stay as they were); a tied
matrix is exported once; quant.int4's lm_head / embeddings options change the graph as stated and
the graphs still generate; block offsets reproduce weights already on a 4-bit grid exactly."""
from __future__ import annotations

from collections import Counter

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from compress import Pipeline, profiling, runtime
from compress.generate import generate
from compress.report import write_markdown

PROMPT = "The bushfires west of Sydney burned for three days before"
VOCAB, HIDDEN = 30522, 32  # tiny_llama
PROFILE = {"pass": "profile", "warmup": 1, "runs": 5, "prompt_tokens": 24, "new_tokens": 8, "generate_runs": 2}


def _quiet_run(passes, model, data, out, **kwargs):
    from rich.console import Console

    settings = profiling.LatencySettings(batch=1, seq=16, threads=1, warmup=1, runs=5, new_tokens=6, generate_runs=2)
    args = dict(latency=settings, tasks=False, max_length=32, console=Console(quiet=True))
    return Pipeline(passes).run(str(model), str(data), out, **{**args, **kwargs})


@pytest.fixture(scope="module")
def tiny_llama_tied(tmp_path_factory):
    """tiny_llama with tie_word_embeddings: one (30522, 32) matrix embeds tokens and makes the logits."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress.models import alias_path

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"], pad_token_id=0, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny_llama_tied")
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(alias_path("minilm"), local_files_only=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def profiled(tiny_llama, text_file, tmp_path_factory):
    """export.onnx (cache) + profile on tiny_llama: the pipeline result and its output folder."""
    out = tmp_path_factory.mktemp("prof") / "out"
    return _quiet_run(["export.onnx", PROFILE], tiny_llama, text_file, out), out


@pytest.fixture(scope="module")
def exported(profiled):
    return profiled[1] / "model.onnx"


@pytest.fixture(scope="module")
def tied(tiny_llama_tied, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tied") / "out"
    _quiet_run(["export.onnx"], tiny_llama_tied, text_file, out)
    return out / "model.onnx"


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _graph(path):
    return onnx.load(str(path)).graph


def _float_matrices(graph) -> list[tuple[int, ...]]:
    return [tuple(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]


def test_profile_pass_records_ttft_tokens_per_s_and_generation_memory(profiled):
    result, _ = profiled

    prof = result.report["stages"][2]["profile"]
    gen = prof["generation"]

    assert gen["prompt_tokens"] == 24 and gen["new_tokens"] == 8 and gen["runs"] == 2
    assert gen["ttft_ms"] > 0 and gen["tokens_per_s"] > 0
    assert gen["peak_rss_mb"] > gen["model_mb"] > 0
    assert prof["settings"]["new_tokens"] == 8 and prof["latency_ms"]["p50"] > 0


def test_every_onnx_stage_of_a_cache_graph_measures_generation(profiled):
    stages = profiled[0].report["stages"]

    assert "ttft_ms" not in stages[0]["latency_ms"]  # the torch input: forward latency only
    assert stages[1]["latency_ms"]["ttft_ms"] > 0 and stages[1]["latency_ms"]["tokens_per_s"] > 0
    assert stages[2]["latency_ms"] == stages[1]["latency_ms"]  # profile changes nothing: inherited


def test_report_md_shows_ttft_and_tokens_per_s(profiled):
    result, out = profiled

    lines = (out / "report.md").read_text().splitlines()

    header = next(line for line in lines if line.startswith("| # |"))
    row = next(line for line in lines if "| export.onnx |" in line)
    cells = dict(zip(header.split("|"), row.split("|")))
    assert float(cells[" TTFT ms "]) == pytest.approx(result.report["stages"][1]["latency_ms"]["ttft_ms"], abs=0.06)
    assert float(cells[" tok/s "]) == pytest.approx(result.report["stages"][1]["latency_ms"]["tokens_per_s"], abs=0.06)
    assert any(line.startswith("- **Generation** (KV cache, greedy): prompt 64 real tokens, 6 new tokens") for line in lines)
    assert any("Generation (prompt 24 tokens, 8 new, median of 2 runs): time to first token" in line for line in lines)
    assert any("Peak memory while generating" in line for line in lines)


def test_encoder_report_has_no_generation_columns(tmp_path):
    stage = {"index": 1, "name": "export.onnx", "form": "onnx", "params": 10, "bytes": 40, "seconds": 1.0,
             "fidelity": {"cosine": 1.0}, "latency_ms": {"p50": 1.0, "p90": 1.1, "p99": 1.2}}
    report = {"model": "m", "kind": "encoder", "stages": [stage],
              "settings": {"latency": profiling.LatencySettings().as_dict()}}

    write_markdown(report, tmp_path / "report.md")

    text = (tmp_path / "report.md").read_text()
    assert "TTFT" not in text and "tok/s" not in text and "Generation" not in text
    assert "| # | stage | form | params | MB | cosine | p50 ms | p90 ms | p99 ms | seconds |" in text


def test_prompt_ids_are_real_held_out_text_cut_to_length(tok, text_file):
    texts = text_file.read_text().splitlines()

    ids = profiling.prompt_ids(tok, texts, 100)

    assert ids.shape == (1, 100) and ids.dtype == np.int64
    assert tok.decode(ids[0, 1:20]).split()[:3] == tok.decode(tok(texts[0])["input_ids"][1:20]).split()[:3]


def test_time_generation_cuts_the_prompt_to_the_context_and_skips_graphs_without_cache(exported, tmp_path):
    settings = profiling.LatencySettings(threads=1, warmup=0, new_tokens=8, generate_runs=1)
    identity = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(identity, tmp_path / "plain.onnx")

    long = profiling.time_generation(exported, np.full((1, 300), 1000, dtype=np.int64), settings)

    assert long["prompt_tokens"] == 256 - 8  # tiny_llama's context is 256 (graph metadata)
    assert profiling.time_generation(tmp_path / "plain.onnx", np.ones((1, 4), dtype=np.int64), settings) == {}


def test_tied_embedding_is_exported_once(tied, tiny_llama_tied, tok):
    graph = _graph(tied)

    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] in {i.name for i in graph.initializer})
    out = generate(tied, tok, PROMPT, max_new_tokens=8, stop_tokens=[])

    assert _float_matrices(graph).count((HIDDEN, VOCAB)) == 1 and (VOCAB, HIDDEN) not in _float_matrices(graph)
    assert [a.i for a in gather.attribute if a.name == "axis"] == [1]  # reads the lm_head's (hidden, vocab) copy
    assert out.num_tokens == 8


def test_quant_int4_lm_head_false_keeps_the_logits_matmul_float(exported, text_file, tmp_path, tok):
    result = _quiet_run([{"pass": "quant.int4", "lm_head": False}], exported, text_file, tmp_path / "q")
    graph = _graph(tmp_path / "q" / "model.onnx")

    ops = Counter(n.op_type for n in graph.node)
    head = next(n for n in graph.node if "logits" in n.output)
    out = generate(tmp_path / "q" / "model.onnx", tok, PROMPT, max_new_tokens=8, stop_tokens=[])

    assert ops["MatMulNBits"] == 14 and head.op_type == "MatMul"  # 2 layers x 7; lm_head stays float
    assert result.report["stages"][1]["lm_head"] == "/model/lm_head/MatMul"
    assert out.num_tokens == 8


def _embedding_error_steps(path, weight: np.ndarray, bits: int = 4) -> np.ndarray:
    """|GatherBlockQuantized rows - fp32 rows| in units of the block's step (absmax / 7.5 at 4 bits,
    absmax / 127.5 at 8), the GatherBlockQuantized run alone."""
    graph = _graph(path)
    keep = [n for n in graph.node if n.op_type == "GatherBlockQuantized" or n.name.endswith("_gather_reshape")]
    names = {i for n in keep for i in n.input}
    model = helper.make_model(helper.make_graph(
        keep, "emb", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info(keep[-1].output[0], onnx.TensorProto.FLOAT, None)],
        [i for i in graph.initializer if i.name in names]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    ids = np.arange(1, VOCAB, 7)[None]
    rows = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0][0]
    blocks = weight[ids[0]].reshape(len(ids[0]), -1, 32)
    step = np.abs(blocks).max(-1, keepdims=True) / ((2**bits - 1) / 2)
    return (np.abs(rows.reshape(blocks.shape) - blocks) / np.where(step > 0, step, 1))[step[..., 0] > 0]


def test_quant_int4_embeddings_quantizes_the_gather_and_still_generates(exported, text_file, tmp_path, tok):
    weight = numpy_helper.to_array(next(i for i in _graph(exported).initializer if tuple(i.dims) == (VOCAB, HIDDEN)))
    plain = _quiet_run(["quant.int4"], exported, text_file, tmp_path / "q4")
    result = _quiet_run([{"pass": "quant.int4", "embeddings": True}], exported, text_file, tmp_path / "e")
    path = tmp_path / "e" / "model.onnx"

    ops = Counter(n.op_type for n in _graph(path).node)
    err = _embedding_error_steps(path, weight)
    out = generate(path, tok, PROMPT, max_new_tokens=8, stop_tokens=[])

    assert ops["GatherBlockQuantized"] == 1 and ops["MatMulNBits"] == 15
    assert result.report["stages"][1]["quantized_embeddings"] == {"/model/model/embed_tokens/Gather": "own"}
    assert (VOCAB, HIDDEN) not in _float_matrices(_graph(path))
    # 30522 x 32 floats (3.9 MB) -> 4-bit codes + one scale per 32: ~0.61 MB
    assert plain.report["stages"][1]["bytes"] - result.report["stages"][1]["bytes"] > 3.0e6
    assert err.max() <= 1.0 and err.mean() < 0.3  # round to nearest: within one step, ~1/4 on average
    assert result.report["stages"][1]["fidelity"]["top1"] > 0.5 and out.num_tokens == 8


def test_quant_int4_embeddings_of_a_tied_model_share_the_lm_head_codes(tied, text_file, tmp_path, tok):
    result = _quiet_run([{"pass": "quant.int4", "embeddings": True}], tied, text_file, tmp_path / "t")
    path = tmp_path / "t" / "model.onnx"
    graph = _graph(path)

    gbq = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if "logits" in n.output)
    reshape = next(n for n in graph.node if gbq.input[0] in n.output)
    out = generate(path, tok, PROMPT, max_new_tokens=8, stop_tokens=[])

    assert head.op_type == "MatMulNBits" and reshape.input[0] == head.input[1] and gbq.input[2] == head.input[2]
    assert result.report["stages"][1]["quantized_embeddings"] == {"/model/model/embed_tokens/Gather": "shared"}
    assert not {(VOCAB, HIDDEN), (HIDDEN, VOCAB)} & set(_float_matrices(graph))  # no float copy is left
    assert result.report["stages"][1]["bytes"] < 0.8e6  # the whole 1M-parameter model in 4 bits
    assert out.num_tokens == 8


def test_quant_int4_defaults_leave_an_encoder_graph_as_before(tiny_bert, text_file, tmp_path):
    result = _quiet_run(["export.onnx", "quant.int4"], tiny_bert, text_file, tmp_path / "b")

    ops = Counter(n.op_type for n in _graph(tmp_path / "b" / "model.onnx").node)
    stage = result.report["stages"][2]

    assert ops["MatMulNBits"] == stage["matmulnbits_nodes"] == 12  # 2 layers x (q, k, v, out, ffn in, ffn out)
    assert ops["GatherBlockQuantized"] == 0 and stage["lm_head"] is None and stage["quantized_embeddings"] == {}
    assert stage["offset_matmuls"] == 0


def test_quant_int4_lm_head_bits_8_shares_an_8_bit_tied_matrix(tied, text_file, tmp_path, tok):
    weight = numpy_helper.to_array(next(i for i in _graph(tied).initializer if tuple(i.dims) == (HIDDEN, VOCAB))).T
    _quiet_run([{"pass": "quant.int4", "lm_head_bits": 8, "embeddings": True}], tied, text_file, tmp_path / "t")
    path = tmp_path / "t" / "model.onnx"
    graph = _graph(path)

    head = next(n for n in graph.node if "logits" in n.output)
    gbq = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    err = _embedding_error_steps(path, weight, bits=8)
    out = generate(path, tok, PROMPT, max_new_tokens=8, stop_tokens=[])

    assert [a.i for a in head.attribute if a.name == "bits"] == [8] and [a.i for a in gbq.attribute if a.name == "bits"] == [8]
    assert Counter(n.op_type for n in graph.node)["MatMulNBits"] == 15  # 14 at 4 bits, the lm_head at 8
    assert err.max() <= 1.0 and err.mean() < 0.3
    assert out.num_tokens == 8


def _snap_to_q4_1(src, dst) -> None:
    """The graph with every MatMul weight on a Q4_1 grid (blocks of 32 along K: min + d * q, q in 0..15),
    as a GGUF Q4_1 model dequantized on load has (SmolLM2)."""
    model = onnx.load(str(src))
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    for init in model.graph.initializer:
        if init.name in weights and len(init.dims) == 2:
            w = numpy_helper.to_array(init)
            blocks = w.reshape(-1, 32, w.shape[1])
            low, d = blocks.min(1, keepdims=True), (blocks.max(1, keepdims=True) - blocks.min(1, keepdims=True)) / 15
            init.CopyFrom(numpy_helper.from_array((low + d * np.round((blocks - low) / d)).reshape(w.shape), init.name))
    onnx.save(model, str(dst))


def test_quant_int4_block_offsets_are_exact_for_weights_on_a_4_bit_grid(exported, text_file, tmp_path, tok):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(exported.parent / name, tmp_path / name)
    _snap_to_q4_1(exported, tmp_path / "q4_1.onnx")
    exact = dict(lm_head=False, accuracy_level=1)  # float lm_head and fp32 compute: only the weights differ
    result = _quiet_run([{"pass": "quant.int4", "block_offsets": True, **exact}], tmp_path / "q4_1.onnx", text_file,
                        tmp_path / "o")
    _quiet_run([{"pass": "quant.int4", "symmetric": False, **exact}], tmp_path / "q4_1.onnx", text_file, tmp_path / "z")
    feed = {k: v.astype(np.int64) for k, v in tok([PROMPT], return_tensors="np").items() if k != "token_type_ids"}

    ref, offsets, zero_points = (runtime.OnnxRunner(p, "causal-lm")(feed) for p in
                                 (tmp_path / "q4_1.onnx", tmp_path / "o" / "model.onnx", tmp_path / "z" / "model.onnx"))
    ops = Counter(n.op_type for n in _graph(tmp_path / "o" / "model.onnx").node)

    assert np.abs(offsets - ref).max() < 1e-4  # float rounding only
    assert np.abs(zero_points - ref).max() > 100 * np.abs(offsets - ref).max()  # integer zero points shift blocks
    assert ops["MatMulNBits"] == 14 and ops["MatMul"] == 4 + 8 + 14 + 1  # attention, block sums, offsets, lm_head
    stages = result.report["stages"]
    assert stages[1]["offset_matmuls"] == 14 and stages[1]["params"] == stages[0]["params"]  # offsets: bookkeeping


def test_cli_profile_of_a_cache_graph_prints_generation_numbers(exported):
    from typer.testing import CliRunner

    from compress.cli import app

    result = CliRunner().invoke(app, ["profile", str(exported), "--seq", "16", "--threads", "1", "--warmup", "1",
                                      "--runs", "5", "--prompt-tokens", "8", "--new-tokens", "4", "--json"])

    assert result.exit_code == 0, result.output
    import json

    gen = json.loads(result.stdout)["generation"]
    assert gen["ttft_ms"] > 0 and gen["tokens_per_s"] > 0 and gen["prompt_tokens"] == 8 and gen["peak_rss_mb"] > 0


def test_sessions_do_not_spin(tmp_path):
    """Every comparison holds several sessions; idle ones must not spin on the cores of the one being timed
    (a pruned MiniLM timed at 8.3 ms next to an idle reference, 4.5 ms without spinning)."""
    from onnx import TensorProto

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    for threads in (None, 2):
        options = runtime.session(tmp_path / "m.onnx", threads).get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
