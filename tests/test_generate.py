"""export.onnx with a KV cache and generation on onnxruntime, on tiny_llama (GQA: 4 query heads,
2 kv heads): the cache graph matches transformers' forward with a cache at several past lengths and
with left padding; greedy generation equals transformers' generate; sampling is seeded; stop
tokens, bad prompts and graphs without a cache give clear errors; the CLI; int4 on the cache graph."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from compress import Pipeline
from compress.cli import app
from compress.errors import OutputMatchError, UserError
from compress.exporters import causal_lm, parity
from compress.generate import Sampling, generate, sample_token
from compress.runtime import OnnxRunner, TorchRunner, complete_feed, input_specs, position_ids

PROMPT = "The bushfires west of Sydney burned for three days before"
KV_HEADS, HEAD_DIM, LAYERS = 2, 8, 2  # tiny_llama: hidden 32 / 4 query heads = 8; 2 kv heads; 2 layers


def _fast():
    """The `fast` fixture's settings (conftest), for the module-scoped export below."""
    from rich.console import Console

    from compress.profiling import LatencySettings

    return dict(latency=LatencySettings(batch=1, seq=16, threads=1, warmup=1, runs=5), tasks=False,
                max_length=32, console=Console(quiet=True))


@pytest.fixture(scope="module")
def exported(tiny_llama, text_file, tmp_path_factory):
    """(model.onnx of export.onnx with its default cache=true, the pipeline result)."""
    out = tmp_path_factory.mktemp("cache") / "out"
    result = Pipeline(["export.onnx"]).run(str(tiny_llama), str(text_file), out, **_fast())
    return out / "model.onnx", result


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


def _hf_step(model, ids, mask, past):
    """transformers' forward with a DynamicCache holding `past`: (logits, [k0, v0, k1, v1])."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(torch.from_numpy(k), torch.from_numpy(v)) for k, v in zip(past[::2], past[1::2])],
                         config=model.config)
    pos = position_ids(mask, ids.shape[1])
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), cache=cache, use_cache=True)
    return out.logits.numpy(), [t.numpy() for layer in out.cache.layers for t in (layer.keys, layer.values)]


def test_export_cache_graph_has_kv_head_inputs_and_outputs(exported):
    path, result = exported

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past = [f"past_key_values.{i}.{t}" for i in range(LAYERS) for t in ("key", "value")]
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *past]
    assert all(i.shape == ["batch", KV_HEADS, "past_sequence", HEAD_DIM] for i in sess.get_inputs()[3:])
    assert [o.name for o in sess.get_outputs()] == ["logits", *(p.replace("past_key_values", "present") for p in past)]
    assert all(o.shape == ["batch", KV_HEADS, "total_sequence", HEAD_DIM] for o in sess.get_outputs()[1:])
    rows = result.report["stages"][1]["parity"]
    assert [r["name"] for r in rows] == [o.name for o in sess.get_outputs()]
    assert all(r["ok"] and r["max_abs_diff"] < 1e-5 for r in rows)


@pytest.mark.parametrize("past, new, batch", [(0, 1, 1), (0, 5, 2), (1, 1, 2), (7, 1, 2), (7, 4, 1), (7, 4, 2)])
def test_cache_graph_matches_transformers_forward_with_cache(past, new, batch, exported, hf):
    model, _ = hf
    rng = np.random.default_rng(past * 10 + new)
    ids = rng.integers(1000, 2000, size=(batch, past + new))
    mask = np.ones_like(ids)
    if batch == 2:  # left padding: the second row starts with pad tokens (2, or 1 of 2 tokens)
        pad = min(2, past + new - 1)
        ids[1, :pad], mask[1, :pad] = 0, 0
    empty = [np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float32)] * (2 * LAYERS)
    cached = _hf_step(model, ids[:, :past], mask[:, :past], empty)[1] if past else empty
    ref_logits, ref_presents = _hf_step(model, ids[:, past:], mask, cached)
    sess = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()[3:]]

    got = sess.run(None, {"input_ids": ids[:, past:], "attention_mask": mask,
                          "position_ids": position_ids(mask, new), **dict(zip(names, cached))})

    real = mask.astype(bool)  # pad tokens' own outputs depend on the attention kernel (hf: sdpa, graph: eager)
    assert np.abs(got[0] - ref_logits)[real[:, past:]].max() < 1e-5
    for g, r in zip(got[1:], ref_presents):
        assert g.shape == (batch, KV_HEADS, past + new, HEAD_DIM)
        assert np.abs(g - r).transpose(0, 2, 1, 3)[real].max() < 1e-5


def test_cache_parity_failure_lists_every_output(exported, hf, text_file):
    model, tok = hf
    layout = causal_lm.layout_of(model)
    feeds = causal_lm.parity_feeds(model, layout, tok, text_file.read_text().splitlines()[:4], 32)
    runner = OnnxRunner(exported[0], "causal-lm")

    def broken(feed):
        out = runner.raw(feed)
        return {**out, "present.1.value": out["present.1.value"] + 0.01}

    with pytest.raises(OutputMatchError, match=r"FAIL present\.1\.value: max_abs_diff=0\.01") as err:
        parity.check("demo", causal_lm.real_tokens_only(causal_lm.reference(model, layout)),
                     causal_lm.real_tokens_only(broken), feeds, atol=1e-3, min_cosine=0.9999, rtol=5e-4)
    rows = {r["name"]: r["ok"] for r in err.value.rows}
    assert rows == {**{n: True for n in layout.output_names()}, "present.1.value": False}
    assert {f["input_ids"].shape[0] for f in feeds} >= {1, 2} and any(f["attention_mask"][:, 0].min() == 0 for f in feeds)


def test_runner_feeds_empty_past_and_left_padding_positions(exported, hf):
    model, tok = hf
    enc = tok(["a short one", PROMPT], padding=True, padding_side="left", return_tensors="np")
    feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    runner = OnnxRunner(exported[0], "causal-lm")

    full = complete_feed(feed, input_specs(runner.sess))
    logits = runner(feed)

    assert full["past_key_values.0.key"].shape == (2, KV_HEADS, 0, HEAD_DIM) and full["past_key_values.0.key"].dtype == np.float32
    assert position_ids(np.array([[0, 0, 1, 1, 1]]), 5).tolist() == [[0, 0, 0, 1, 2]]
    keep = feed["attention_mask"].astype(bool)  # real tokens: the same as transformers with those positions
    assert np.abs(logits - TorchRunner(model, "causal-lm")(feed))[keep].max() < 1e-5


def test_generate_greedy_matches_transformers_generate(exported, hf):
    model, tok = hf
    enc = tok(PROMPT, return_tensors="pt")
    with torch.inference_mode():  # min_new_tokens: transformers may not stop at its eos either
        ref = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                             max_new_tokens=20, min_new_tokens=20, pad_token_id=0)

    result = generate(exported[0], tok, PROMPT, max_new_tokens=20, stop_tokens=[])

    assert result.token_ids == ref[0, enc["input_ids"].shape[1]:].tolist()
    assert result.num_tokens == 20 and result.stop_reason == "max_new_tokens"
    assert result.ttft_s > 0 and result.decode_tokens_per_s > 0 and result.text


def test_generate_sampling_is_seeded_and_differs_from_greedy(exported, hf):
    tok = hf[1]
    args = dict(max_new_tokens=12, stop_tokens=[], do_sample=True, temperature=2.0, top_k=100, top_p=0.95)

    first, again = (generate(exported[0], tok, PROMPT, seed=7, **args) for _ in range(2))
    other = generate(exported[0], tok, PROMPT, seed=8, **args)
    greedy = generate(exported[0], tok, PROMPT, max_new_tokens=12, stop_tokens=[])

    assert first.token_ids == again.token_ids
    assert first.token_ids != greedy.token_ids and first.token_ids != other.token_ids


def test_sample_token_keeps_only_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    rng = np.random.default_rng(0)

    nucleus = {sample_token(logits, Sampling(True, top_p=0.6), rng) for _ in range(300)}
    top1 = {sample_token(logits, Sampling(True, top_k=1), rng) for _ in range(50)}

    assert nucleus == {0, 1}  # 0.5 < 0.6, so the second token stays; the third (0.8 before it) goes
    assert top1 == {0}


def test_generate_stops_at_a_stop_token(exported, hf):
    tok = hf[1]
    greedy = generate(exported[0], tok, PROMPT, max_new_tokens=10, stop_tokens=[]).token_ids
    stop = greedy[4]

    result = generate(exported[0], tok, PROMPT, max_new_tokens=10, stop_tokens=[stop])

    assert result.token_ids == greedy[: greedy.index(stop) + 1]
    assert result.stop_reason == "stop_token"


@pytest.mark.parametrize("prompt, kwargs, message", [
    ("", {}, "the prompt is empty"),
    ("   ", {}, "the prompt is empty"),
    (PROMPT, {"max_new_tokens": 300}, r"= 313 tokens is longer than the model's context of 256"),  # 13 prompt tokens; config: 256
    (PROMPT, {"max_new_tokens": 5, "max_context": 10}, "context of 10: shorten the prompt or ask for at most 0"),
    (PROMPT, {"do_sample": True, "temperature": 0.0}, r"temperature must be > 0 \(got 0.0\)"),
])
def test_generate_rejects_bad_requests(prompt, kwargs, message, exported, hf):
    with pytest.raises(UserError, match=message):
        generate(exported[0], hf[1], prompt, **kwargs)


def test_generate_on_a_graph_without_cache_asks_for_a_cache_export(tiny_llama, text_file, tmp_path, fast, hf):
    Pipeline([{"pass": "export.onnx", "cache": False}]).run(str(tiny_llama), str(text_file), tmp_path / "o", **fast)

    with pytest.raises(UserError, match="re-export the model with export.onnx cache=true"):
        generate(tmp_path / "o" / "model.onnx", hf[1], PROMPT)


def test_cli_generate_prints_text_and_speed(exported, hf):
    expected = generate(exported[0], hf[1], PROMPT, max_new_tokens=6).text

    result = CliRunner().invoke(app, ["generate", str(exported[0]), PROMPT, "--max-new-tokens", "6"])

    assert result.exit_code == 0, result.output
    assert expected in result.output and "tokens/s" in result.output and "TTFT" in result.output


CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_prompt_goes_through_the_chat_template_unless_raw(exported, hf, tmp_path):
    """An instruct model sent the bare prompt may answer with its end token at once: the tokenizer's chat
    template wraps it by default (the CLI too); --raw / chat=False send it as is."""
    tok = hf[1]
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(CHAT)
    from transformers import AutoTokenizer

    chat_tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    wrapped = chat_tok(f"<user> {PROMPT} <assistant>")["input_ids"]  # what the template makes, tokenized by hand
    chat = generate(exported[0], chat_tok, PROMPT, max_new_tokens=2, stop_tokens=[])
    raw = generate(exported[0], chat_tok, PROMPT, max_new_tokens=2, stop_tokens=[], chat=False)
    assert raw.prompt_tokens == len(tok(PROMPT)["input_ids"]) < chat.prompt_tokens
    assert chat.prompt_tokens == len(wrapped) - 2  # the template text, without the tokenizer's own [CLS] and [SEP]
    plain = generate(exported[0], tok, PROMPT, max_new_tokens=2, stop_tokens=[])  # no template: sent as is
    assert plain.prompt_tokens == raw.prompt_tokens

    for args, how in (([], "chat template"), (["--raw"], "raw prompt")):
        result = CliRunner().invoke(app, ["generate", str(exported[0]), PROMPT, "--max-new-tokens", "2",
                                          "--tokenizer", str(tmp_path / "tok"), *args])
        assert result.exit_code == 0, result.output
        assert how in result.output


@pytest.mark.parametrize("args, message", [
    (["  "], "the prompt is empty"),
    ([PROMPT, "--max-new-tokens", "300"], "longer than the model's context of 256"),
])
def test_cli_generate_bad_prompt_exits_2_with_one_message(args, message, exported):
    result = CliRunner().invoke(app, ["generate", str(exported[0]), *args])

    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_quant_int4_on_the_cache_graph_keeps_generating(exported, text_file, tmp_path, fast, hf):
    result = Pipeline(["quant.int4"]).run(str(exported[0]), str(text_file), tmp_path / "q", **fast)
    path = tmp_path / "q" / "model.onnx"

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    out = generate(path, hf[1], PROMPT, max_new_tokens=8, stop_tokens=[])

    assert ops.count("MatMulNBits") == 15  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    assert result.report["stages"][1]["fidelity"]["top1"] > 0.5  # int4 of a random tiny model: most tokens agree
    assert out.num_tokens == 8


def test_static_quant_int8_calibrates_the_cache_graph(exported, text_file, tmp_path, fast, hf):
    result = Pipeline([{"pass": "quant.int8", "mode": "static", "calibration_samples": 4}]).run(
        str(exported[0]), str(text_file), tmp_path / "s", **fast)

    out = generate(tmp_path / "s" / "model.onnx", hf[1], PROMPT, max_new_tokens=4, stop_tokens=[])

    assert result.report["stages"][1]["quantized_ops"].get("QuantizeLinear", 0) > 0
    assert out.num_tokens == 4


def test_export_cache_with_the_dynamo_exporter_generates_the_same_tokens(exported, tiny_llama, text_file, tmp_path,
                                                                         fast, hf):
    result = Pipeline([{"pass": "export.onnx", "exporter": "dynamo"}]).run(
        str(tiny_llama), str(text_file), tmp_path / "d", **fast)

    dynamo = generate(tmp_path / "d" / "model.onnx", hf[1], PROMPT, max_new_tokens=10, stop_tokens=[])

    assert all(r["ok"] for r in result.report["stages"][1]["parity"])
    assert dynamo.token_ids == generate(exported[0], hf[1], PROMPT, max_new_tokens=10, stop_tokens=[]).token_ids
