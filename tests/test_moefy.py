"""passes/lib/moefy.py and passes/lib/moefy_refit.py on the tiny Llama (hidden 32, 2 layers, FFN 64 -> 8 experts
of 8 neurons, top-2) and the MoE fixture (compress.fixtures.smollm2_moe, examples/moefy_smollm2.py) in its fast mode."""
from __future__ import annotations

import pytest
import torch

from compress import Pipeline
from compress.errors import UserError
from compress.passes.lib import moefy as mf
from compress.passes.lib import moefy_refit as rf

RECON = rf.Reconstruction(steps=60, tokens=2048, seq_len=32, lr=3e-3, batch=256)
QUICK = dict(experts=8, top_k=2, router_steps=40, max_length=32, max_tokens=512, seed=0, reconstruction=RECON)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation (50 Adam steps of a tiny block took
    0.75 s on 1 thread, 11.8 s on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense(tiny_llama):
    from compress.models import load_hf

    model, tok, _ = load_hf(tiny_llama)
    return model, tok


@pytest.fixture(scope="module")
def texts():
    from compress.data import lee_background

    return lee_background()[:40]


@pytest.fixture(scope="module")
def converted(dense, texts):
    report = mf.MoefyReport()
    return mf.moefy(dense[0], texts, dense[1], report=report, **QUICK), report


@pytest.fixture(scope="module")
def routers_only(dense, texts):
    return mf.moefy(dense[0], texts, dense[1], **{**QUICK, "reconstruction": None})


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_moefy_is_deterministic_for_a_seed(dense, texts, converted):
    again = mf.moefy(dense[0], texts, dense[1], **QUICK)
    other = mf.moefy(dense[0], texts, dense[1], **{**QUICK, "seed": 1})

    first, second = _weights(converted[0]), _weights(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    router = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(first[router], other.state_dict()[router])


def test_moefy_gives_mixtral_with_asked_experts_and_shapes(converted):
    from transformers import MixtralForCausalLM

    model = converted[0]

    assert isinstance(model, MixtralForCausalLM)
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2
    assert model.config.intermediate_size == 8 and model.config.tie_word_embeddings == (
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
    block = model.model.layers[1].mlp
    assert block.experts.gate_up_proj.shape == (8, 16, 32) and block.experts.down_proj.shape == (8, 32, 8)
    assert block.gate.weight.shape == (8, 32) and block.top_k == 2


def test_moefy_reloads_with_from_pretrained_with_identical_logits(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    model = converted[0]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, attn_implementation="eager").eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 6251, 102]])

    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert type(reloaded).__name__ == "MixtralForCausalLM"


def test_moefy_copies_attention_and_embeddings_exactly(dense, converted):
    seen = {}
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 6251, 102]])
    for name, model in (("dense", dense[0]), ("moe", converted[0])):
        hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0]))
        with torch.no_grad():
            model(input_ids=ids)
        hook.remove()

    assert torch.equal(seen["dense"], seen["moe"])  # hidden states before the first MLP
    assert converted[1].all_experts_max_diff < 1e-5  # every expert at weight 1 == the dense FFN: logits match


def test_moefy_puts_each_neuron_in_exactly_one_expert_scaled_by_top_k(dense, routers_only):
    mlp, block = dense[0].model.layers[0].mlp, routers_only.model.layers[0].mlp
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()  # (8, 16, 32), (8, 32, 8)
    gates = gate_up[:, :8].reshape(64, 32)
    ups = gate_up[:, 8:].reshape(64, 32)
    downs = down.permute(0, 2, 1).reshape(64, 32)  # one row per neuron

    dense_gate = mlp.gate_proj.weight.detach()
    order = [int((dense_gate == row).all(dim=1).nonzero().squeeze()) for row in gates]
    assert sorted(order) == list(range(64))  # a permutation of the dense neurons
    assert torch.equal(ups, mlp.up_proj.weight.detach()[order])
    assert torch.allclose(downs, 2 * mlp.down_proj.weight.detach().T[order])


def test_balanced_kmeans_gives_equal_clusters_and_keeps_separated_groups():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    points = torch.cat([c + torch.randn(6, 4, generator=gen) * 0.1 for c in centres])  # 4 groups of 6

    labels = mf.balanced_kmeans(points, 4, seed=0)

    assert torch.bincount(labels).tolist() == [6, 6, 6, 6]
    assert all(len(set(labels[i * 6 : (i + 1) * 6].tolist())) == 1 for i in range(4))


def test_router_training_lowers_the_block_output_error(converted):
    rows = converted[1].layers

    assert len(rows) == 2
    for row in rows:
        assert row["error_final"] < row["error_init"] - 0.03  # measured here: 0.87 -> 0.75-0.78
        assert row["error_ce"] < row["error_init"]


def test_moefy_rejects_bad_counts_and_non_llama(dense, texts, tiny_bert):
    from compress.models import load_hf

    with pytest.raises(UserError, match=r"experts=7 must be >= 2 and divide the FFN width 64.*top_k=9"):
        mf.moefy(dense[0], texts, dense[1], experts=7, top_k=9)
    bert, tok, _ = load_hf(tiny_bert)
    with pytest.raises(UserError, match="model_type 'bert' is not a Llama-family"):
        mf.moefy(bert, texts, tok)


def test_prune_experts_runs_on_the_moefied_model(converted, dense, text_file, tmp_path, fast):
    folder = tmp_path / "moe"
    converted[0].save_pretrained(folder)
    dense[1].save_pretrained(folder)

    result = Pipeline([{"pass": "prune.experts", "keep": 4, "calibration_samples": 8, "max_length": 32}]).run(
        str(folder), str(text_file), tmp_path / "out", **fast)

    from compress.models import load_hf

    pruned, _, _ = load_hf(tmp_path / "out" / "stages" / "01-prune.experts" / "model")
    assert pruned.config.num_local_experts == 4 and pruned.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert result.report["stages"][-1]["fidelity"]["top1"] > 0.3


def test_fixture_builds_saves_and_reloads_on_tiny_llama(tiny_llama, tmp_path):
    from compress.fixtures.smollm2_moe import Options, build

    result = build(tmp_path / "o", Options(model=str(tiny_llama)).fast())

    assert (tmp_path / "o" / "model" / "config.json").is_file() and result["reload_max_diff"] == 0.0
    assert result["params_moe"] == result["params_dense"] + 2 * 8 * 32  # + one (8, 32) router per layer
    assert result["ppl_moe"] > 0 and result["mean_error_final"] < result["mean_error_init"]
    assert result["mean_block_refit"] < result["mean_block_before"]  # --fast: the least-squares refit, no Adam
    assert result["kd_steps"] == 4 and result["kd_rows"] == 8 and result["ppl_before_kd"] > 0  # --fast: 4 x 2 rows of 32


def test_stream_runs_the_layers_one_by_one_like_the_model(dense, texts):
    model, tok = dense
    ids = rf.packed_ids(tok, texts, 24, 96)  # (4, 24), every position a real token
    stream = rf.Stream(model, ids, chunk=3)

    h = stream.h
    for layer in model.model.layers:
        h = stream.layer(layer, h)
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(h))

        assert ids.shape == (4, 24)
        assert torch.allclose(logits, model(input_ids=ids).logits, atol=1e-4)


def test_reconstruction_lowers_the_block_error_on_held_out_tokens_and_leaves_every_weight_trainable(converted):
    assert all(p.requires_grad for p in converted[0].parameters())  # distill.kd trains what requires grad
    for row in converted[1].layers:
        assert row["block_refit"] < row["block_before"]
        assert row["block_after"] < 0.9 * row["block_before"]  # measured here: 0.81 -> 0.70


@pytest.mark.parametrize("target", ["ffn", "residual"])
def test_reconstruct_experts_brings_the_moe_closer_to_the_dense_model(dense, texts, routers_only, target):
    import copy

    from compress.runtime import tokenize

    model, tok = dense
    moe = copy.deepcopy(routers_only)
    held = torch.from_numpy(tokenize(tok, texts[-8:], 32)["input_ids"])  # no padding: 8 paragraphs > 32 tokens

    def error(m) -> float:  # relative error of the last hidden states (the logits of a random tiny LM are ~uniform)
        with torch.no_grad():
            return rf.relative_error(m.model(input_ids=held).last_hidden_state, model.model(input_ids=held).last_hidden_state)

    before = error(moe)
    rows = rf.reconstruct_experts(model, moe, rf.packed_ids(tok, texts[:30], 32, 1024), steps=60, seed=0, lr=3e-3,
                                  target=target, batch=256)

    assert len(rows) == 2 and all(r["block_after"] < r["block_before"] for r in rows)
    # held-out paragraphs (never in the 30 training ones); the residual stream of this random tiny model is mostly its
    # embeddings, so the FFNs' share of the error is small: measured here 0.056 -> 0.053 (ffn), 0.052 (residual)
    assert error(moe) < 0.97 * before


def test_packed_ids_rejects_too_little_text(dense):
    with pytest.raises(UserError, match="at least 2 x 128 tokens"):
        rf.packed_ids(dense[1], ["a short text"], 128, 4096)


def test_refit_down_is_the_least_squares_down_proj_for_the_routing():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=16, intermediate_size=4, num_local_experts=4, num_experts_per_tok=2))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, y = torch.randn(300, 16), torch.randn(300, 16)
    z, chosen = rf.routed_activations(block, x)  # (300, 4, 4), (300, 4)

    def down() -> torch.Tensor:  # (experts * inter, hidden): row (e, i) is expert e's down_proj column i
        return block.experts.down_proj.detach().permute(0, 2, 1).reshape(16, 16)

    with torch.no_grad():
        assert torch.allclose(z.flatten(1) @ down(), block(x[None])[0], atol=1e-5)  # the block is linear in down_proj
        rf.refit_down(block, x, y, ridge=1e-9, chunk=128)
    assert chosen.sum(1).eq(2).all()
    assert torch.allclose(down(), torch.linalg.lstsq(z.flatten(1), y).solution, atol=1e-4)


KD = rf.Distillation(steps=30, batch=4, seq_len=32, lr=1e-3)  # tiny random weights: 3e-3 raised the KL


def _logit_kl(teacher, student, ids: torch.Tensor) -> float:
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    with torch.no_grad():
        t, s = teacher(input_ids=ids).logits.log_softmax(-1), student(input_ids=ids).logits.log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_distill_moe_lowers_the_held_out_logit_kl_and_trains_only_the_moe_blocks(dense, texts, converted):
    import copy

    from rich.console import Console

    from compress.runtime import tokenize

    # the random tiny LM's logits are ~uniform (KL ~1e-5, all noise): a 30x sharper lm_head in both models gives
    # the KL a signal; lm_head is not an MoE weight, so it stays frozen and equal in the two
    teacher, moe, tok = copy.deepcopy(dense[0]), copy.deepcopy(converted[0]), dense[1]
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)
        moe.lm_head.weight.copy_(teacher.lm_head.weight)
    held = torch.from_numpy(tokenize(tok, texts[-8:], 32)["input_ids"])  # never in the 30 training paragraphs
    before = _logit_kl(teacher, moe, held)
    shared = {k: v.clone() for k, v in moe.state_dict().items() if ".mlp." not in k}

    stats = rf.distill_moe(teacher, moe, tok, texts[:30], KD, seed=0, console=Console(quiet=True))

    after = _logit_kl(teacher, moe, held)
    assert stats["steps"] == 30 and stats["rows"] == 120  # 30 steps x 4 rows of 32 tokens, none repeated
    assert after < 0.97 * before  # measured here: 0.0129 -> 0.0122 (training rows 0.0106 -> 0.0097)
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in shared.items())  # attention, norms, embeddings untouched
    assert all(p.requires_grad for p in moe.parameters()) and not moe.training


def test_moefy_with_distillation_is_deterministic_for_a_seed(dense, texts):
    kw = {**QUICK, "reconstruction": rf.Reconstruction(steps=0, tokens=1024, seq_len=32),
          "distillation": rf.Distillation(steps=6, batch=2, seq_len=32, lr=3e-3)}
    reports = [mf.MoefyReport(), mf.MoefyReport()]

    first, second = (_weights(mf.moefy(dense[0], texts, dense[1], report=r, **kw)) for r in reports)

    assert reports[0].distillation["steps"] == 6 and reports[0].distillation["final_loss"] > 0
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
