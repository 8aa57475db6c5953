"""Hidden-size (embedding-channel) pruning, Minitron-style (passes/lib/hidden.py), on tiny BERT, BERT
classifier and Llama (GQA, untied and tied embeddings): exact shapes and parameter counts from the
config, identity when every channel is kept, exact reload (compress.models.load_hf) and ONNX export
parity of the sliced folder, and an importance that ranks dead and loud channels where they belong."""
from __future__ import annotations

import pytest
import torch

from compress import Pipeline
from compress.errors import UserError
from compress.models import load_hf
from compress.passes.lib import hidden, prunable
from compress.passes.lib.trainer import tokenized

FIXTURES = ("tiny_bert", "tiny_classifier", "tiny_llama")


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied Parameter counts once


def _bert_params(cfg, h: int, labels: int = 0) -> int:
    """A BertModel (with pooler) of hidden size h whose attention width stays heads x head_dim of `cfg`
    (the unsliced config); plus a classifier of `labels` outputs."""
    a, f = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads), cfg.intermediate_size
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * h + 2 * h
    layer = 3 * (h * a + a) + (a * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    head = h * labels + labels if labels else 0
    return embeddings + cfg.num_hidden_layers * layer + (h * h + h) + head


def _llama_params(cfg, h: int) -> int:
    q, kv, f = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h  # q, k, v, o (no biases), gate/up/down, 2 RMSNorms
    return cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * layer + h


def _expected(cfg, h: int) -> int:
    if cfg.model_type == "llama":
        return _llama_params(cfg, h)
    return _bert_params(cfg, h, cfg.num_labels if cfg.architectures[0].endswith("Classification") else 0)


def _texts(text_file, n: int = 8) -> list[str]:
    return text_file.read_text().splitlines()[:n]


def _calibration(tok, text_file, n: int = 8, max_length: int = 32) -> dict:
    return tokenized(tok, _texts(text_file, n), max_length)


def _outputs(model, tok, text_file):
    """Outputs on 3 real paragraphs of different lengths (padded: the mask matters)."""
    enc = tok(_texts(text_file, 3), padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.inference_mode():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return out.logits if "logits" in out else out.last_hidden_state


def _pruned(folder, text_file, fraction: float):
    model, tok, _ = load_hf(folder)
    fam = prunable.family_of(model.config)
    scores = hidden.hidden_scores(model, fam, _calibration(tok, text_file), forward_kwargs={"use_cache": False}
                                  if fam.name == "llama" else None)
    return model, tok, hidden.slice_hidden(model, fam, hidden.keep_channels(scores, fraction))


def _tied_llama(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"], pad_token_id=0, tie_word_embeddings=True)
    folder = tmp_path / "tied"
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    from compress.models import alias_path

    AutoTokenizer.from_pretrained(alias_path("minilm"), local_files_only=True).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fraction, kept", [(0.25, 24), (0.5, 16)])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_sliced_shapes_and_parameter_count(fixture, fraction, kept, text_file, request):
    folder = request.getfixturevalue(fixture)
    before, _, _ = load_hf(folder)
    cfg = before.config
    assert _params(before) == _expected(cfg, 32)  # the formula counts the unsliced model right

    model, tok, out = _pruned(folder, text_file, fraction)

    assert out == {"hidden": kept} and model.config.hidden_size == kept
    assert _params(model) == _expected(cfg, kept)
    base = model.base_model
    if fixture == "tiny_llama":
        attn, mlp = base.layers[1].self_attn, base.layers[1].mlp
        shapes = (attn.q_proj.weight.shape, attn.k_proj.weight.shape, attn.o_proj.weight.shape)
        assert shapes == ((32, kept), (16, kept), (kept, 32))
        assert (mlp.gate_proj.weight.shape, mlp.down_proj.weight.shape) == ((64, kept), (kept, 64))
        assert (base.norm.weight.shape, model.lm_head.weight.shape) == ((kept,), (30522, kept))
        assert (model.config.head_dim, mlp.hidden_size, base.layers[1].hidden_size) == (8, kept, kept)
    else:
        layer = base.encoder.layer[1]
        attn = layer.attention
        assert (attn.self.query.weight.shape, attn.output.dense.weight.shape) == ((32, kept), (kept, 32))
        assert (layer.output.dense.weight.shape, layer.output.LayerNorm.normalized_shape) == ((kept, 64), (kept,))
        assert base.embeddings.position_embeddings.weight.shape == (512, kept)
        assert (base.pooler.dense.weight.shape, model.config.attention_head_size) == ((kept, kept), 8)
        if fixture == "tiny_classifier":
            assert model.classifier.weight.shape == (3, kept)
    out = _outputs(model, tok, text_file)
    assert out.shape[-1] == {"tiny_bert": kept, "tiny_classifier": 3, "tiny_llama": 30522}[fixture]
    assert torch.isfinite(out).all()


def test_tied_llama_stays_tied_counts_right_and_reloads_equal(text_file, tmp_path):
    folder = _tied_llama(tmp_path)
    model, tok, out = _pruned(folder, text_file, 0.5)

    assert out == {"hidden": 16}
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape == (30522, 16)
    assert _params(model) == _llama_params(model.config, 16) == 30522 * 16 + 2 * (16 * 32 + 2 * 16 * 16 + 32 * 16
                                                                                  + 3 * 16 * 64 + 2 * 16) + 16
    model.save_pretrained(tmp_path / "sliced")
    reloaded, _, _ = load_hf(tmp_path / "sliced")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(_outputs(reloaded, tok, text_file), _outputs(model, tok, text_file))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_sliced_model_saves_and_reloads_with_exactly_equal_outputs(fixture, text_file, tmp_path, request):
    model, tok, _ = _pruned(request.getfixturevalue(fixture), text_file, 0.25)
    model.save_pretrained(tmp_path / "sliced")

    reloaded, _, _ = load_hf(tmp_path / "sliced")  # BERT: through _load_pruned_bert (attention_head_size 8 != 24 / 4)

    assert reloaded.config.hidden_size == 24 and _params(reloaded) == _params(model)
    assert torch.equal(_outputs(reloaded, tok, text_file), _outputs(model, tok, text_file))


def test_bert_with_hidden_not_a_multiple_of_head_size_reloads(tiny_bert, text_file, tmp_path):
    model, tok, _ = load_hf(tiny_bert)
    hidden.slice_hidden(model, prunable.family_of(model.config), torch.arange(20))
    model.save_pretrained(tmp_path / "sliced")
    reloaded, _, _ = load_hf(tmp_path / "sliced")

    assert torch.equal(_outputs(reloaded, tok, text_file), _outputs(model, tok, text_file))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_keeping_every_channel_gives_exactly_the_same_outputs(fixture, text_file, request):
    model, tok, _ = load_hf(request.getfixturevalue(fixture))
    fam = prunable.family_of(model.config)
    expected, params = _outputs(model, tok, text_file), _params(model)

    assert hidden.slice_hidden(model, fam, torch.arange(32)) == {"hidden": 32}
    assert hidden.slice_hidden(model, fam, torch.ones(32, dtype=torch.bool)) == {"hidden": 32}  # a bool mask too

    assert _params(model) == params
    assert torch.equal(_outputs(model, tok, text_file), expected)


@torch.no_grad()
@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_importance_ranks_a_dead_channel_last_and_a_loud_one_first(fixture, text_file, request):
    model, tok, _ = load_hf(request.getfixturevalue(fixture))
    fam = prunable.family_of(model.config)
    norms = hidden.residual_norms(model, fam)
    assert len(norms) == 5  # BERT: embeddings + 2 x 2 per layer; Llama: 2 x 2 per layer + final
    base = hidden.hidden_scores(model, fam, _calibration(tok, text_file))
    dead, loud = int(base.argmax()), int(base.argmin())  # the hardest case: the loudest dies, the quietest shouts
    for norm in norms:
        norm.weight[dead] = 0
        norm.weight[loud] *= 20
        if getattr(norm, "bias", None) is not None:
            norm.bias[dead] = 0
            norm.bias[loud] *= 20

    scores = hidden.hidden_scores(model, fam, _calibration(tok, text_file))

    assert scores.shape == (32,) and scores.dtype == torch.float32
    assert scores[dead] == 0 and int(scores.argmin()) == dead and int(scores.argmax()) == loud
    keep = hidden.keep_channels(scores, 0.25)
    assert dead not in keep.tolist() and loud in keep.tolist()


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_score_is_l2_over_real_tokens_then_mean_over_samples(fixture, text_file, request, monkeypatch):
    """With only the last norm hooked (its output is last_hidden_state for both families), the score
    is computed by hand from the model's output; padding and batching do not change it."""
    model, tok, _ = load_hf(request.getfixturevalue(fixture))
    fam = prunable.family_of(model.config)
    monkeypatch.setattr(hidden, "residual_norms", lambda m, f, real=hidden.residual_norms: real(m, f)[-1:])
    data = _calibration(tok, text_file, n=6, max_length=40)
    with torch.no_grad():
        last = model.base_model(**data).last_hidden_state.double() * data["attention_mask"][..., None]
    expected = last.pow(2).sum(1).sqrt().mean(0).float()

    assert torch.allclose(hidden.hidden_scores(model, fam, data, batch_size=4), expected, rtol=1e-5, atol=1e-6)
    # the same samples with 24 more pad tokens, one at a time: padding is not counted, the mean is over samples
    pad = torch.full((6, 24), tok.pad_token_id)
    longer = {"input_ids": torch.cat([data["input_ids"], pad], 1),
              "attention_mask": torch.cat([data["attention_mask"], torch.zeros_like(pad)], 1)}
    assert torch.allclose(hidden.hidden_scores(model, fam, longer, batch_size=1), expected, rtol=1e-4, atol=1e-5)


def test_keep_channels_counts_and_rounding():
    scores = torch.arange(100.0).flip(0)  # channel c scores 99 - c
    assert torch.equal(hidden.keep_channels(scores, 0.25), torch.arange(80))  # 75 rounded up to 80: removes 20, not 25
    assert torch.equal(hidden.keep_channels(scores, 0.25, round_to=1), torch.arange(75))
    assert torch.equal(hidden.keep_channels(scores, 0.0), torch.arange(100))
    assert torch.equal(hidden.keep_channels(torch.arange(32.0), 0.25), torch.arange(8, 32))  # < 64: no rounding
    assert torch.equal(hidden.keep_channels(torch.tensor([3.0, 1.0, 2.0, 0.0]), 0.5), torch.tensor([0, 2]))  # sorted
    with pytest.raises(ValueError, match="fraction_removed"):
        hidden.keep_channels(scores, 1.0)


def test_bad_keep_and_unsupported_heads_refused(tiny_bert):
    from transformers import BertConfig, BertForMaskedLM

    model, _, _ = load_hf(tiny_bert)
    fam = prunable.family_of(model.config)
    for keep in (torch.tensor([0, 0, 1]), torch.tensor([0, 32]), torch.tensor([], dtype=torch.long),
                 torch.ones(31, dtype=torch.bool)):
        with pytest.raises(ValueError):
            hidden.slice_hidden(model, fam, keep)
    assert model.config.hidden_size == 32 and model.embeddings.word_embeddings.weight.shape[1] == 32
    mlm = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64))
    with pytest.raises(UserError, match="does not know how to slice cls of BertForMaskedLM"):
        hidden.slice_hidden(mlm, fam, torch.arange(16))
    assert mlm.config.hidden_size == 32  # refused before any surgery


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_classifier"])
def test_sliced_folder_exports_to_onnx_with_parity(fixture, text_file, tmp_path, fast, request):
    model, tok, _ = _pruned(request.getfixturevalue(fixture), text_file, 0.25)
    model.save_pretrained(tmp_path / "sliced")
    tok.save_pretrained(tmp_path / "sliced")

    exported = Pipeline(["export.onnx"]).run(str(tmp_path / "sliced"), str(text_file), tmp_path / "e", **fast)

    parity = exported.report["stages"][1]["parity"]
    assert parity and all(row["ok"] for row in parity), parity
