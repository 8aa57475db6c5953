"""prune.homodistil, prune.structured and distill.kd on tiny BERT and tiny Llama (GQA) models."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from compress import Pipeline
from compress.errors import ConfigError
from compress.models import load_hf

QUICK = {"steps": 12, "batch_size": 4, "max_length": 32, "mask_every": 2, "checkpoint_every": 4}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _outputs(model, kind: str):
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0], [101, 7592, 2088, 999, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if kind == "encoder" else out.logits


def test_homodistil_tiny_bert_exact_shapes_and_params(tiny_bert, text_file, tmp_path, fast):
    result = Pipeline([{"pass": "prune.homodistil", **QUICK}]).run(str(tiny_bert), str(text_file), tmp_path / "o", **fast)

    model, _, _ = load_hf(tmp_path / "o" / "model")
    before, _, _ = load_hf(tiny_bert)
    # Per layer (hidden 32, 4 heads of 8, FFN 64), halving heads and FFN removes:
    # q/k/v 3 x (16 rows x 32 + 16 bias) = 1584, o 16 columns x 32 = 512, up 32 x 32 + 32 = 1056, down 32 x 32 = 1024.
    assert _params(model) == _params(before) - 2 * (1584 + 512 + 1056 + 1024)
    attn = model.encoder.layer[0].attention.self
    assert (attn.query.weight.shape, model.encoder.layer[1].intermediate.dense.weight.shape) == ((16, 32), (32, 32))
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (2, 32)
    assert result.report["stages"][1]["pruning"]["after"]["params"] == _params(model)


def test_homodistil_tiny_llama_keeps_gqa_groups_consistent(tiny_llama, text_file, tmp_path, fast):
    Pipeline([{"pass": "prune.homodistil", **QUICK}]).run(str(tiny_llama), str(text_file), tmp_path / "o", **fast)

    model, _, _ = load_hf(tmp_path / "o" / "model")
    before, _, _ = load_hf(tiny_llama)
    cfg = model.config
    # 4 query heads share 2 kv heads (head_dim 8): one whole group (2 query + 1 kv head) goes.
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, 8, 32)
    # Per layer: q 16 x 32 + k 8 x 32 + v 8 x 32 + o 32 x 16 = 1536; gate/up/down 3 x 32 x 32 = 3072.
    assert _params(model) == _params(before) - 2 * (1536 + 3072)


@pytest.mark.parametrize("fixture, kind", [("tiny_bert", "encoder"), ("tiny_llama", "causal-lm")])
def test_pruned_model_reloads_equal_and_exports(fixture, kind, text_file, tmp_path, fast, request):
    folder = request.getfixturevalue(fixture)
    result = Pipeline([{"pass": "prune.homodistil", **QUICK}]).run(str(folder), str(text_file), tmp_path / "o", **fast)
    live = result.state.model
    exported = Pipeline(["export.onnx"]).run(str(tmp_path / "o" / "model"), str(text_file), tmp_path / "e", **fast)

    reloaded, _, _ = load_hf(tmp_path / "o" / "model")

    torch.testing.assert_close(_outputs(reloaded, kind), _outputs(live, kind), atol=1e-5, rtol=1e-5)
    assert all(row["ok"] for row in exported.report["stages"][1]["parity"])


def test_structured_every_importance_gives_exact_sizes(tiny_llama, text_file, tmp_path, fast):
    before, _, _ = load_hf(tiny_llama)
    for importance in ("magnitude", "taylor", "random", "activation"):
        Pipeline([{"pass": "prune.structured", "heads": 0.5, "ffn": 0.25, "importance": importance, "max_length": 32,
                   "calibration_batches": 1}]).run(str(tiny_llama), str(text_file), tmp_path / importance, **fast)
        model, _, _ = load_hf(tmp_path / importance / "model")
        assert model.config.intermediate_size == 48 and model.config.num_key_value_heads == 1
        # Per layer: q 16 x 32 + k 8 x 32 + v 8 x 32 + o 32 x 16 = 1536; gate/up/down 3 x 16 x 32 = 1536.
        assert _params(model) == _params(before) - 2 * (1536 + 1536), importance


PLANT = {  # layer 0's modules: MLP input norm, FFN input linears, FFN output, attention q/k/v
    "llama": ("post_attention_layernorm", ("mlp.up_proj", "mlp.gate_proj"), "mlp.down_proj",
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "bert": ("attention.output.LayerNorm", ("intermediate.dense",), "output.dense",
             ("attention.self.query", "attention.self.key", "attention.self.value")),
}


@torch.no_grad()
def _plant(folder, out, family: str, neuron: int = 5, dim: int = 3):
    """Layer 0 of a tiny model gets (a) FFN neuron `neuron` with the smallest weights of its layer but
    by far the largest activation: the MLP input norm's gain on `dim` is 100 and only this neuron reads
    `dim` (its up/gate rows are 0.05 * e_dim); (b) attention unit 0 with 10x larger q/k weights but
    zero values, so its output (the o input) is exactly 0. Magnitude keeps the dead unit and drops the
    neuron; an activation-aware score must do the opposite."""
    model, tok, _ = load_hf(folder)
    layer = (model.model.layers if family == "llama" else model.encoder.layer)[0]
    norm_path, up_paths, down_path, qkv_paths = PLANT[family]
    norm, down = layer.get_submodule(norm_path), layer.get_submodule(down_path)
    ups = [layer.get_submodule(path) for path in up_paths]
    q, k, v = (layer.get_submodule(path) for path in qkv_paths)
    norm.weight[dim] = 100.0
    for up in ups:
        up.weight[:, dim] = 0
        up.weight[neuron] = 0
        up.weight[neuron, dim] = 0.05
    down.weight[:, neuron] *= 0.3
    unit_q, unit_kv = q.weight.shape[0] // k.weight.shape[0] * 8, 8  # head_dim 8: one unit's q and k/v rows
    q.weight[:unit_q] *= 10
    k.weight[:unit_kv] *= 10
    v.weight[:unit_kv] = 0
    if v.bias is not None:
        v.bias[:unit_kv] = 0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return ups[0].weight[neuron].clone(), q.weight[:unit_q].clone()


@pytest.mark.parametrize("fixture, family", [("tiny_llama", "llama"), ("tiny_bert", "bert")])
def test_structured_activation_keeps_loud_small_neuron_and_drops_dead_unit(fixture, family, text_file, tmp_path,
                                                                            fast, request):
    folder = tmp_path / "planted"
    planted_row, dead_q = _plant(request.getfixturevalue(fixture), folder, family)

    kept = {}
    for importance in ("activation", "magnitude"):
        Pipeline([{"pass": "prune.structured", "heads": 0.5, "ffn": 0.5, "importance": importance, "max_length": 32,
                   "calibration_batches": 1}]).run(str(folder), str(text_file), tmp_path / importance, **fast)
        model, _, _ = load_hf(tmp_path / importance / "model")
        layer = (model.model.layers if family == "llama" else model.encoder.layer)[0]
        up, q = layer.get_submodule(PLANT[family][1][0]).weight, layer.get_submodule(PLANT[family][3][0]).weight
        assert up.shape[0] == 32 and q.shape[0] == dead_q.shape[0] * (1 if family == "llama" else 2)
        # kept rows stay in order, so unit 0 (if kept) is the first block of q
        kept[importance] = (bool((up == planted_row).all(1).any()), torch.equal(q[: dead_q.shape[0]], dead_q))

    assert kept["activation"] == (True, False)  # the loud neuron stays, the dead unit goes
    assert kept["magnitude"] == (False, True)  # weight norms alone get both wrong


@pytest.mark.parametrize("params, message", [
    ({"importance": "activation", "calibration_batches": 0}, "calibration_batches: Input should be greater than or equal to 1"),
    ({"importance": "activation", "max_length": 4}, "max_length: Input should be greater than or equal to 8"),
    ({"importance": "wanda"}, "importance: Input should be 'magnitude', 'taylor', 'random' or 'activation'"),
])
def test_structured_bad_activation_settings_rejected_before_work(params, message):
    with pytest.raises(ConfigError, match=message):
        Pipeline([{"pass": "prune.structured", **params}])


def test_structured_activation_needs_calibration_data(tiny_llama):
    with pytest.raises(ConfigError, match="needs calibration data"):
        Pipeline([{"pass": "prune.structured", "importance": "activation"}]).validate(str(tiny_llama), has_data=False)
    Pipeline([{"pass": "prune.structured", "importance": "magnitude"}]).validate(str(tiny_llama), has_data=False)


def test_distill_kd_recovers_fidelity_after_one_shot_pruning(tiny_bert_sharp, text_file, tmp_path, fast):
    kd = {"pass": "distill.kd", "steps": 30, "batch_size": 8, "max_length": 32, "lr": 1e-3}
    result = Pipeline([{"pass": "prune.structured", "heads": 0.5, "ffn": 0.5, "importance": "random"}, kd]).run(
        str(tiny_bert_sharp), str(text_file), tmp_path / "o", **fast)

    pruned, recovered = (s["fidelity"]["cosine"] for s in result.report["stages"][1:3])
    train = result.report["stages"][2]["distill"]
    assert recovered > pruned + 0.1  # measured: 0.750 -> 0.959
    assert train["final_loss"] < 0.7 * train["first_loss"]


def test_distill_kd_taid_and_self_data_train_on_the_teachers_texts_with_a_rising_target(tiny_llama, text_file,
                                                                                         tmp_path, fast, monkeypatch):
    """After FFN pruning: self_data makes the student train on the unpruned teacher's regenerations of
    the training texts (not on the texts); taid makes every step's output loss use TAID's weight, which
    starts at taid_start and rises at least linearly (test_distill.py checks the loss and the texts themselves)."""
    import inspect

    from compress.passes import distill_kd
    from compress.passes.lib import trainer

    seen: dict = {"taid_t": [], "trained_on": []}
    real_regenerate, real_tokenized, real_loss = distill_kd.regenerate, distill_kd.tokenized, trainer.distill_loss

    def regenerate(teacher, tokenizer, texts, cfg, console):
        out = real_regenerate(teacher, tokenizer, texts, cfg, console)
        seen.update(teacher_params=_params(teacher), texts=list(texts), regenerated=out, tokenizer=tokenizer)
        return out

    def tokenized(tokenizer, texts, max_length, windows=False):
        seen["trained_on"] += list(texts)
        return real_tokenized(tokenizer, texts, max_length, windows)

    def distill_loss(*args, **kwargs):
        seen["taid_t"].append(inspect.signature(real_loss).bind(*args, **kwargs).arguments.get("taid_t"))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(distill_kd, "regenerate", regenerate)
    monkeypatch.setattr(distill_kd, "tokenized", tokenized)
    monkeypatch.setattr(trainer, "distill_loss", distill_loss)
    kd = {"pass": "distill.kd", "steps": 4, "batch_size": 4, "max_length": 32, "taid": True, "taid_start": 0.3,
          "self_data": True, "prompt_tokens": 8}
    result = Pipeline([{"pass": "prune.structured", "ffn": 0.5, "heads": 0.0}, kd]).run(
        str(tiny_llama), str(text_file), tmp_path / "o", **fast)

    notes = result.report["stages"][2]["distill"]
    assert notes["self_data"] and notes["taid"] and notes["texts"] == 16
    # self_data: the 16 training texts, regenerated by the teacher (the unpruned model), are what the student saw
    assert seen["teacher_params"] == _params(load_hf(tiny_llama)[0]) > _params(result.state.model)
    corpus = set(text_file.read_text().splitlines())
    assert len(seen["texts"]) == 16 and set(seen["texts"]) <= corpus
    assert seen["trained_on"] == seen["regenerated"] and not set(seen["trained_on"]) & corpus
    tok = seen["tokenizer"]
    for text, new in zip(seen["texts"], seen["regenerated"]):  # the prompt (first 8 tokens) kept, then the teacher's
        prompt = tok.decode(tok(text, truncation=True, max_length=8)["input_ids"], skip_special_tokens=True)
        assert new.startswith(prompt) and len(new) > len(prompt)
    # taid: the weight the loss used at each of the 4 steps starts at taid_start and rises past the linear floor
    t = seen["taid_t"]
    assert len(t) == 4 and t[0] == 0.3 and t == sorted(set(t))
    assert all(t[k] >= 0.3 + 0.7 * k / 4 - 1e-9 for k in range(4))


def test_pruning_rejects_unsupported_architecture_before_work(tmp_path, text_file, tiny_bert):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100, architectures=["GPT2LMHeadModel"])).save_pretrained(folder)

    with pytest.raises(ConfigError, match="does not support model_type 'gpt2': supported are bert, .*llama"):
        Pipeline(["prune.homodistil"]).validate(str(folder))


@pytest.mark.parametrize("params, message", [
    ({"heads": 1.0}, "heads: Input should be less than 1"),
    ({"ffn": -0.1}, "ffn: Input should be greater than or equal to 0"),
    ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
    ({"heads": 0, "ffn": 0}, "nothing to prune"),
    ({"initial_warmup": 0.6, "final_phase": 0.5}, "initial_warmup \\+ final_phase must be < 1"),
])
def test_homodistil_targets_out_of_range_rejected_before_work(params, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Pipeline([{"pass": "prune.homodistil", **params}])
    assert list(tmp_path.iterdir()) == []


def _run_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compress.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})


def test_homodistil_resumes_after_kill_and_matches_uninterrupted_run(tiny_bert, text_file, tmp_path):
    args = ["run", str(tiny_bert), "--data", str(text_file), "--no-tasks", "--max-length", "32",
            "--pass", "prune.homodistil:steps=40,batch_size=4,max_length=32,mask_every=2,checkpoint_every=5"]
    ckpt = tmp_path / ".killed.partial" / "stages" / "01-prune.homodistil" / "checkpoint.pt"
    proc = _run_cli([*args, "-o", str(tmp_path / "killed")])
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()  # its output is not read: no ResourceWarning for the pipe
    assert ckpt.exists() and not (tmp_path / "killed").exists()

    resumed = _run_cli([*args, "-o", str(tmp_path / "killed"), "--resume"])
    log = resumed.communicate()[0]
    straight = _run_cli([*args, "-o", str(tmp_path / "straight")])
    straight.communicate()

    assert resumed.returncode == 0 and straight.returncode == 0, log
    assert "resumed homodistil from the checkpoint of step" in log
    a, _, _ = load_hf(tmp_path / "killed" / "model")
    b, _, _ = load_hf(tmp_path / "straight" / "model")
    torch.testing.assert_close(_outputs(a, "encoder"), _outputs(b, "encoder"), atol=1e-6, rtol=1e-6)


def test_homodistil_schedule_is_cubic_from_full_to_target():
    from compress.passes.prune_homodistil import remaining

    values = [remaining(step, 0.5, t_i=10, last=70) for step in range(100)]

    assert values[:11] == [1.0] * 11 and values[70:] == [0.5] * 30
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[40] == pytest.approx(0.5 + 0.5 * 0.5 ** 3)  # halfway: (1 - 1/2)^3 of the way left


def test_keep_count_is_exact_for_decimal_fractions():
    from compress.passes.lib.prunable import keep_count

    assert [keep_count(10, 0.7), keep_count(100, 0.45), keep_count(1000, 0.7), keep_count(9, 0.5)] == [3, 55, 300, 5]


def test_tie_break_orders_equal_scores_by_magnitude():
    from compress.passes.prune_homodistil import _tie_break

    (ranks,) = _tie_break([torch.tensor([0.0, 2.0, 0.0, 1.0])], [torch.tensor([5.0, 0.1, 1.0, 3.0])])

    assert ranks.argsort().tolist() == [2, 0, 3, 1]  # zeros first (small magnitude lowest), then 1.0, then 2.0


def test_homodistil_rejects_a_schedule_with_no_pruning_phase():
    with pytest.raises(ConfigError, match="leave no pruning phase"):
        Pipeline([{"pass": "prune.homodistil", "steps": 10, "initial_warmup": 0.6, "final_phase": 0.3}])


def test_params_budget_removes_the_smallest_equal_fraction_that_fits(tiny_llama, text_file, tmp_path, fast):
    from compress.passes.lib import prunable

    before_model, _, _ = load_hf(tiny_llama)
    fam, geo = prunable.family_of(before_model.config), prunable.Geometry.of(before_model.config)
    assert prunable.unit_params(before_model, fam, geo) == (1536, 96)  # q 16x32 + k, v 8x32 + o 32x16; 3 x 32
    before = _params(before_model)  # embeddings and lm_head: 99% of this tiny model
    result = Pipeline([{"pass": "prune.structured", "params": 0.995, "importance": "magnitude"}]).run(
        str(tiny_llama), str(text_file), tmp_path / "o", **fast)

    rec = result.report["stages"][1]["pruning"]
    after = _params(result.state.model)
    assert after <= 0.995 * before and after == rec["after"]["params"]
    f = rec["fractions"]["ffn"]
    assert rec["fractions"]["heads"] == f > 0
    smaller = max(x for x in [i / 64 for i in range(64)] + [0.5, 0.0] if x < f)  # one grid step less removes too little
    removed = 2 * ((2 - prunable.keep_count(2, smaller)) * 1536 + (64 - prunable.keep_count(64, smaller)) * 96)
    assert before - removed > 0.995 * before


def test_params_budget_with_heads_zero_prunes_ffn_only_and_homodistil_takes_it(tiny_bert, text_file, tmp_path, fast):
    result = Pipeline([{"pass": "prune.homodistil", "params": 0.995, "heads": 0, **QUICK}]).run(
        str(tiny_bert), str(text_file), tmp_path / "o", **fast)

    rec = result.report["stages"][1]["pruning"]
    assert rec["fractions"]["heads"] == 0 and rec["fractions"]["ffn"] > 0
    assert rec["after"]["heads"] == 4 and rec["after"]["params"] <= 0.995 * rec["before"]["params"]


@pytest.mark.parametrize("params, message, error", [
    ({"params": 0.9, "ffn": 0.5}, "give either params or fractions", ConfigError),
    ({"params": 0.9, "heads": 0, "ffn": 0}, "leaves nothing to prune", ConfigError),
    ({"params": 0.5}, r"params=0.5 is out of reach by pruning heads and ffn: the most they can remove leaves 0.9", Exception),
])
def test_params_budget_bad_settings(params, message, error, tiny_llama, text_file, tmp_path, fast):
    with pytest.raises(error, match=message):
        Pipeline([{"pass": "prune.structured", **params}]).run(str(tiny_llama), str(text_file), tmp_path / "o", **fast)
    assert not (tmp_path / "o").exists()
