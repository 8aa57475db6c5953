"""Shared fixtures: tiny models built from configs with fixed seeds (the real MiniLM tokenizer,
so the text is real), a small real-text data file, fast latency settings."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the input-measurement cache (compress/refcache.py) of this test session only, never the user's; removed at exit
if "COMPRESS_CACHE" not in os.environ:
    os.environ["COMPRESS_CACHE"] = tempfile.mkdtemp(prefix="compress-test-cache-")
    atexit.register(shutil.rmtree, os.environ["COMPRESS_CACHE"], True)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _tokenizer():
    from transformers import AutoTokenizer

    from compress.models import alias_path

    return AutoTokenizer.from_pretrained(alias_path("minilm"), local_files_only=True)


def _save(model, folder: Path) -> Path:
    model.eval().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, architectures=["BertModel"], **TINY)
    return _save(BertModel(cfg), tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_sharp(tmp_path_factory) -> Path:
    """Tiny BERT with larger initial weights, so every layer matters and pruning visibly hurts
    (with the default 0.02, pruning half of it keeps a held-out cosine of 0.9999)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, architectures=["BertModel"],
                     initializer_range=0.2, **TINY)
    return _save(BertModel(cfg), tmp_path_factory.mktemp("tiny_bert_sharp"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=3,
                     architectures=["BertForSequenceClassification"], **TINY)
    return _save(BertForSequenceClassification(cfg), tmp_path_factory.mktemp("tiny_cls"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama with grouped-query attention: 4 query heads share 2 key/value heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"], pad_token_id=0)
    return _save(LlamaForCausalLM(cfg), tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama16(tmp_path_factory) -> Path:
    """tiny_llama with a head size of 16, GroupQueryAttention's smallest (export.onnx exporter=genai): hidden 64;
    the embedding and the lm_head tied, as SmolLM2's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"], pad_token_id=0, tie_word_embeddings=True)
    return _save(LlamaForCausalLM(cfg), tmp_path_factory.mktemp("tiny_llama16"))


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    """Mixtral MoE: 8 experts per layer, top-2 routing, GQA attention."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=256, architectures=["MixtralForCausalLM"], pad_token_id=0)
    return _save(MixtralForCausalLM(cfg), tmp_path_factory.mktemp("tiny_mixtral"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """40 real news paragraphs (lee_background) as one-sample-per-line text."""
    from compress.data import lee_background

    path = tmp_path_factory.mktemp("data") / "news.txt"
    path.write_text("\n".join(lee_background()[:40]) + "\n")
    return path


@pytest.fixture
def fast():
    """Pipeline.run keyword arguments that keep a tiny run to seconds."""
    from rich.console import Console

    from compress.profiling import LatencySettings

    return dict(latency=LatencySettings(batch=1, seq=16, threads=1, warmup=1, runs=5), tasks=False,
                max_length=32, console=Console(quiet=True))
