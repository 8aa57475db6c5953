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


def test_structured_magnitude_and_taylor_give_exact_sizes(tiny_llama, text_file, tmp_path, fast):
    for importance in ("magnitude", "taylor", "random"):
        Pipeline([{"pass": "prune.structured", "heads": 0.5, "ffn": 0.25, "importance": importance, "max_length": 32}]).run(
            str(tiny_llama), str(text_file), tmp_path / importance, **fast)
        model, _, _ = load_hf(tmp_path / importance / "model")
        assert model.config.intermediate_size == 48 and model.config.num_key_value_heads == 1


def test_distill_kd_recovers_fidelity_after_one_shot_pruning(tiny_bert_sharp, text_file, tmp_path, fast):
    kd = {"pass": "distill.kd", "steps": 30, "batch_size": 8, "max_length": 32, "lr": 1e-3}
    result = Pipeline([{"pass": "prune.structured", "heads": 0.5, "ffn": 0.5, "importance": "random"}, kd]).run(
        str(tiny_bert_sharp), str(text_file), tmp_path / "o", **fast)

    pruned, recovered = (s["fidelity"]["cosine"] for s in result.report["stages"][1:3])
    train = result.report["stages"][2]["distill"]
    assert recovered > pruned + 0.1  # measured: 0.750 -> 0.959
    assert train["final_loss"] < 0.7 * train["first_loss"]


def test_distill_kd_taid_and_self_data_run_on_llama(tiny_llama, text_file, tmp_path, fast):
    kd = {"pass": "distill.kd", "steps": 4, "batch_size": 4, "max_length": 32, "taid": True, "self_data": True,
          "prompt_tokens": 8}
    result = Pipeline([{"pass": "prune.structured", "ffn": 0.5, "heads": 0.0}, kd]).run(
        str(tiny_llama), str(text_file), tmp_path / "o", **fast)

    notes = result.report["stages"][2]["distill"]
    assert notes["self_data"] and notes["taid"] and notes["texts"] == 16


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
    from compress.passes.prunable import keep_count

    assert [keep_count(10, 0.7), keep_count(100, 0.45), keep_count(1000, 0.7), keep_count(9, 0.5)] == [3, 55, 300, 5]


def test_tie_break_orders_equal_scores_by_magnitude():
    from compress.passes.prune_homodistil import _tie_break

    (ranks,) = _tie_break([torch.tensor([0.0, 2.0, 0.0, 1.0])], [torch.tensor([5.0, 0.1, 1.0, 3.0])])

    assert ranks.argsort().tolist() == [2, 0, 3, 1]  # zeros first (small magnitude lowest), then 1.0, then 2.0


def test_homodistil_rejects_a_schedule_with_no_pruning_phase():
    with pytest.raises(ConfigError, match="leave no pruning phase"):
        Pipeline([{"pass": "prune.homodistil", "steps": 10, "initial_warmup": 0.6, "final_phase": 0.3}])
