"""What distill.kd's options change, measured: TAID's target and its interpolation weight, self-data's
training texts (the teacher's greedy continuations), and the attention-map loss (w_attention) pulling the
student's attention maps to the teacher's. Tiny models, a few steps each."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from transformers.modeling_outputs import CausalLMOutput

from compress import Pipeline
from compress.passes.distill_kd import DistillKD, regenerate
from compress.passes.lib import trainer
from compress.passes.lib.losses import LossWeights, Taid, attention_loss, logit_loss


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation
    yield
    torch.set_num_threads(threads)


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(seed)) * 3  # (batch, seq, vocab)


# --- TAID ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
def test_taid_loss_is_cross_entropy_to_the_interpolated_target_with_the_student_side_detached(t):
    s_logits, t_logits = _logits(0).requires_grad_(), _logits(1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # two padded positions do not count
    keep = mask.bool()

    loss = logit_loss(CausalLMOutput(logits=s_logits), CausalLMOutput(logits=t_logits), mask, LossWeights(), taid_t=t)
    loss.backward()

    target = F.softmax((1 - t) * s_logits.detach() + t * t_logits, -1)
    q = F.softmax(s_logits.detach(), -1)
    assert float(loss.detach()) == pytest.approx(float(-(target * q.log()).sum(-1)[keep].mean()), rel=1e-5)
    # the gradient pulls the student to the moving target: (q - target) on real tokens, 0 on padding
    assert torch.allclose(s_logits.grad, (q - target) * keep[..., None] / keep.sum(), atol=1e-6)
    if t == 0.0:  # the target is the student itself: nothing to learn yet
        assert float(s_logits.grad.abs().max()) < 1e-6


def test_taid_loss_differs_from_plain_kl_but_at_t_1_has_its_gradient():
    """At t=1 the target is the teacher: the same gradient as KL at temperature 1 (the values differ by
    the teacher's entropy); at t<1 the student is pulled less far than by KL."""
    t_out, mask = CausalLMOutput(logits=_logits(1)), torch.ones(2, 5, dtype=torch.long)
    w = LossWeights(temperature=1.0)
    grads, values = {}, {}
    for name, taid_t in (("kl", None), ("taid 1", 1.0), ("taid 0.4", 0.4)):
        s_logits = _logits(0).requires_grad_()
        loss = logit_loss(CausalLMOutput(logits=s_logits), t_out, mask, w, taid_t=taid_t)
        loss.backward()
        grads[name], values[name] = s_logits.grad, float(loss.detach())

    p = F.softmax(_logits(1), -1)
    entropy = float(-(p * p.log()).sum(-1).mean())
    assert values["taid 1"] == pytest.approx(values["kl"] + entropy, rel=1e-5)
    assert torch.allclose(grads["taid 1"], grads["kl"], atol=1e-6)
    assert values["taid 0.4"] != pytest.approx(values["kl"], rel=0.05)
    assert grads["taid 0.4"].norm() < 0.7 * grads["kl"].norm()


def test_taid_weight_rises_linearly_at_least_and_faster_while_the_loss_falls():
    """The first 10 of 100 steps: a flat loss follows the linear floor start + (1 - start) x progress; a
    loss falling by 30% a step moves t ahead of it (measured 0.573 vs 0.46 at step 10); t reaches 1 at the end."""
    flat, falling = Taid(0.4), Taid(0.4)

    flat_t = [flat.update(1.0, (k + 1) / 100) for k in range(10)]
    falling_t = [falling.update(0.7 ** k, (k + 1) / 100) for k in range(10)]

    assert flat_t == pytest.approx([0.4 + 0.6 * (k + 1) / 100 for k in range(10)])
    assert all(f > s for f, s in zip(falling_t[1:], flat_t[1:])) and falling_t[-1] > flat_t[-1] + 0.1
    assert falling_t == sorted(falling_t) and falling.update(0.7 ** 10, 1.0) == 1.0


# --- self-data -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_llama(tiny_llama):
    """The tiny Llama's config with larger weights (initializer_range 0.2): peaked next-token
    distributions, so greedy decoding has no near-ties that float noise could flip."""
    from transformers import LlamaForCausalLM

    from compress.models import load_hf

    model, tok, _ = load_hf(tiny_llama)
    torch.manual_seed(1)
    cfg = copy.deepcopy(model.config)
    cfg.initializer_range = 0.2
    return LlamaForCausalLM(cfg).eval(), tok


def _greedy(model, ids: torch.Tensor, new: int, eos: int | None) -> list[int]:
    """Greedy decoding without a cache or generate(): argmax of the full-sequence logits, token by token."""
    ids = ids.tolist()
    for _ in range(new):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids


def test_self_data_texts_are_the_teachers_greedy_continuations_of_each_prompt(sharp_llama, one_thread):
    from compress.data import lee_background

    teacher, tok = sharp_llama
    texts = lee_background()[:5]
    cfg = DistillKD(self_data=True, prompt_tokens=8, max_length=24)

    out = regenerate(teacher, tok, texts, cfg, Console(quiet=True))

    assert len(out) == len(texts) and not set(out) & set(texts)
    for text, regenerated in zip(texts, out):
        prompt = tok(text, truncation=True, max_length=8, return_tensors="pt")["input_ids"][0]  # specials included
        expected = _greedy(teacher, prompt, 24 - 8, teacher.generation_config.eos_token_id)
        assert regenerated == tok.decode(expected, skip_special_tokens=True)
        assert regenerated.startswith(tok.decode(prompt, skip_special_tokens=True))
        assert len(regenerated) > len(tok.decode(prompt, skip_special_tokens=True))


# --- attention-map loss ----------------------------------------------------------------------------

def test_w_attention_pulls_the_students_attention_maps_to_the_teachers(tmp_path, one_thread):
    """A student whose query / key weights were perturbed, distilled 20 steps with the output loss
    alone and with the attention MSE added: the attention term is trained down, and held-out attention
    maps end much closer to the teacher's than without it (measured: 0.196 before, 0.185 without,
    0.047 with)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from compress.data import lee_background
    from compress.models import alias_path

    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, initializer_range=0.2, attn_implementation="eager")).eval()
    tok = AutoTokenizer.from_pretrained(alias_path("minilm"))
    texts = lee_background()[:48]
    train_data, held = trainer.tokenized(tok, texts[:32], 32), trainer.tokenized(tok, texts[32:], 32)
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in student.encoder.layer:
            for lin in (layer.attention.self.query, layer.attention.self.key):
                lin.weight.add_(torch.randn(lin.weight.shape, generator=gen) * 0.2)

    def held_out_error(model) -> float:
        with torch.no_grad():
            s, t = (m(**held, output_attentions=True) for m in (model, teacher))
        return float(attention_loss(s, t, held["attention_mask"], None))

    def distil(w_attention: float) -> tuple[torch.nn.Module, list[dict]]:
        cfg = DistillKD(steps=20, batch_size=8, lr=1e-2, warmup=0.1, weight_decay=0.0, w_hidden=0.0,
                        w_attention=w_attention)
        model, parts, real = copy.deepcopy(student), [], trainer.distill_loss

        def recording(*args, **kwargs):
            loss, p = real(*args, **kwargs)
            parts.append(p)
            return loss, p

        trainer.distill_loss = recording
        try:
            trainer.train(model, teacher, "encoder", train_data, cfg.settings(), cfg.loss_weights(),
                          tmp_path, f"attention {w_attention}", Console(quiet=True))
        finally:
            trainer.distill_loss = real
        return model, parts

    before = held_out_error(student)
    without, parts_without = distil(0.0)
    with_att, parts_with = distil(1.0)

    assert all("attention" not in p for p in parts_without)
    attention = [p["attention"] for p in parts_with]
    assert len(attention) == 20 and attention[0] > 0.1  # measured 0.187: the perturbed maps differ
    assert attention[-1] < 0.4 * attention[0]  # measured 0.041
    assert held_out_error(with_att) < 0.5 * min(before, held_out_error(without))
    assert held_out_error(without) < before * 1.05  # the output loss alone barely moves the maps


def test_training_windows_use_all_of_a_long_text_and_count_tokens_seen(tiny_bert, text_file, tmp_path, fast):
    from transformers import AutoTokenizer

    from compress.passes.lib.trainer import tokenized

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = text_file.read_text().splitlines()[:6]
    cut, windows = tokenized(tok, texts, 32), tokenized(tok, texts, 32, windows=True)
    whole = sum(len(tok(t)["input_ids"]) - 2 for t in texts)  # tokens of the texts without [CLS] / [SEP]
    real = lambda d: int(d["attention_mask"].sum())
    assert real(cut) == 6 * 32 and windows["input_ids"].shape[0] > 6
    # every token of every text is in some window (short tails under 8 tokens aside), each window framed
    assert whole - 6 * 8 <= real(windows) - 2 * windows["input_ids"].shape[0] <= whole
    assert (windows["input_ids"][:, 0] == tok.cls_token_id).all()

    result = Pipeline([{"pass": "distill.kd", "steps": 3, "batch_size": 4, "max_length": 32}]).run(
        str(tiny_bert), str(text_file), tmp_path / "o", **fast)
    stats = result.report["stages"][1]["distill"]
    assert 3 * 4 * 8 <= stats["tokens_seen"] <= 3 * 4 * 32
    assert stats["samples"] > stats["texts"]  # the training paragraphs became more windows than texts
