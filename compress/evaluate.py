"""Measuring a stage: fidelity against the teacher on held-out text, and task metrics.

Fidelity (the kind's `fidelity` part picks one, compress/kinds/): encoder -> mean cosine of sentence
embeddings; classifier / causal-lm / image-classifier -> mean KL(teacher || student) of the output
distributions and top-1 agreement (over real, unpadded tokens for an LM; over held-out images for an
image classifier).
Task metrics for encoders (real labelled data from gensim's test set):
  lee50: Spearman between embedding cosine and human similarity over the 1225 pairs of the 50
         Lee documents (all-MiniLM-L6-v2: 0.508 with this code at 256 tokens; docs/data.md says 0.505);
  polarity: 5-fold (shuffled, seed 0) logistic-regression probe accuracy on the 200 Pang-Lee
         sentences (0.765 with this code; docs/data.md's 0.730 used another fold split)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np

from compress import kinds
from compress.data import gensim_file
from compress.images import batches as image_batches
from compress.kinds import ModelKind
from compress.runtime import batches

TASK_MAX_LENGTH = 256  # the sentence-transformers max_seq_length of all-MiniLM-L6-v2


def feeds(tokenizer: Any, samples: Any, max_length: int, batch_size: int = 16, kind: str | ModelKind | None = None):
    """Batches of held-out samples as `kind` builds its inputs; without a kind: tokenized texts, or
    images ((N, 3, H, W) array) as pixel_values."""
    if kind is not None:
        return kinds.get(kind).inputs.batches(tokenizer, samples, max_length, batch_size)
    if isinstance(samples, np.ndarray):
        return image_batches(samples, batch_size)
    return batches(tokenizer, samples, max_length, batch_size)


def outputs(run: Callable, tokenizer: Any, texts: Any, max_length: int, batch_size: int = 16,
            kind: str | ModelKind | None = None) -> list[np.ndarray]:
    return [run(feed) for feed in feeds(tokenizer, texts, max_length, batch_size, kind)]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def cosine_fidelity(student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """Mean and min cosine of the rows (one output vector per sample)."""
    s = student / np.linalg.norm(student, axis=-1, keepdims=True)
    t = teacher / np.linalg.norm(teacher, axis=-1, keepdims=True)
    cos = (s * t).sum(-1)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}


def logit_fidelity(student: np.ndarray, teacher: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean KL(teacher || student) of the output distributions and top-1 agreement; with a `mask`
    ((batch, seq) of an LM's logits), over the real tokens only."""
    ls, lt = _log_softmax(student.astype(np.float64)), _log_softmax(teacher.astype(np.float64))
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    top1 = (student.argmax(-1) == teacher.argmax(-1)).astype(np.float64)
    if mask is not None:
        keep = mask.astype(bool)
        kl, top1 = kl[keep], top1[keep]
    return {"kl": float(kl.mean()), "top1": float(top1.mean())}


def compare(kind: str | ModelKind, student: np.ndarray, teacher: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Fidelity of one batch as the kind measures it; means are over samples (encoder/classifier) or
    real tokens (LM)."""
    return kinds.get(kind).fidelity.compare(student, teacher, mask)


def fidelity(kind: str | ModelKind, student: Callable, teacher: Callable | list[np.ndarray], tokenizer: Any,
             texts: list[str], max_length: int, batch_size: int = 16) -> dict[str, float]:
    """`teacher` is a runner or its cached outputs (same texts, same batching)."""
    kind = kinds.get(kind)
    rows, weights = [], []
    for i, feed in enumerate(kind.inputs.batches(tokenizer, texts, max_length, batch_size)):
        t_out = teacher[i] if isinstance(teacher, list) else teacher(feed)
        rows.append(kind.fidelity.compare(student(feed), t_out, feed.get("attention_mask")))
        weights.append(kind.fidelity.weight(feed))
    w = np.asarray(weights, dtype=np.float64)
    result = {k: float(np.average([r[k] for r in rows], weights=w)) for k in rows[0] if k != "cosine_min"}
    if "cosine_min" in rows[0]:
        result["cosine_min"] = float(min(r["cosine_min"] for r in rows))
    return result


@lru_cache(maxsize=1)
def lee50_data() -> tuple[list[str], np.ndarray]:
    docs = [d.strip() for d in gensim_file("lee.cor").read_text(encoding="latin-1").splitlines() if d.strip()]
    sims = np.loadtxt(gensim_file("similarities0-1.txt"))
    return docs, sims


@lru_cache(maxsize=1)
def polarity_data() -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for line in gensim_file("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        label, _, text = line.strip().partition(" ")
        if text:
            texts.append(text)
            labels.append(1 if label == "__label__pos" else 0)
    return texts, np.asarray(labels)


def embed(run: Callable, tokenizer: Any, texts: list[str]) -> np.ndarray:
    return np.concatenate(outputs(run, tokenizer, texts, TASK_MAX_LENGTH))


def lee50(run: Callable, tokenizer: Any) -> float:
    from scipy.stats import spearmanr

    docs, sims = lee50_data()
    emb = embed(run, tokenizer, docs)
    cos = emb @ emb.T
    iu = np.triu_indices(len(docs), k=1)
    return float(spearmanr(cos[iu], sims[iu]).statistic)


def polarity(run: Callable, tokenizer: Any) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    texts, labels = polarity_data()
    emb = embed(run, tokenizer, texts)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    return float(cross_val_score(LogisticRegression(max_iter=2000), emb, labels, cv=folds).mean())


PPL_PARAGRAPHS, PPL_MAX_LENGTH = 100, 256
PPL_PARAGRAPHS_QUICK = 10  # measure level quick


def perplexity(run: Callable, tokenizer: Any, texts: list[str], max_length: int = PPL_MAX_LENGTH) -> float:
    """exp(mean next-token NLL) over every real token of `texts` (token-weighted)."""
    total, count = 0.0, 0
    for feed in batches(tokenizer, texts, max_length, batch_size=4):
        logp = _log_softmax(run(feed)[:, :-1].astype(np.float32))  # (batch, seq-1, vocab)
        target = feed["input_ids"][:, 1:]
        keep = feed["attention_mask"][:, 1:].astype(bool)
        nll = -np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return float(np.exp(total / max(count, 1)))


def task_metrics(kind: str | ModelKind, run: Callable, tokenizer: Any, quick: bool = False) -> dict[str, float]:
    """The kind's task metrics (`ModelKind.task_metrics`). Encoders: Lee-50 and polarity. Causal LMs:
    perplexity on the first 100 lee_background paragraphs (256 tokens each at most): real news text,
    never in the default (wiki) training data. Others: none. `quick`: the cheaper subsets a kind
    offers (measure level quick), or none."""
    if tokenizer is None:
        return {}
    return kinds.get(kind).task_metrics(run, tokenizer, quick=quick)

