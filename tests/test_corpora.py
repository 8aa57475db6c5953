"""Prose the installed packages ship besides gensim's corpora: docstring prose (read with ast, cached)
and licence texts (an evaluation domain no training corpus holds)."""
from __future__ import annotations

import json
import re

import pytest

from compress import corpora, data


DOC = '''Fit the model to the training data and return the fitted estimator.

This method estimates the mean and the variance of every feature from the samples it is given, so that later
calls can centre and scale new data in the same way without looking at the training set again.

Parameters
----------
X : array-like of shape (n_samples, n_features)
    The samples used to estimate the mean and the standard deviation of each feature along the feature axis.

Examples
--------
>>> scaler = StandardScaler().fit(X)
>>> scaler.mean_ + scaler.scale_ * X.sum(axis=0) + other_values_that_make_this_long_enough_for_the_filter

The transformed array is scaler.transform(X), where the mean and the scale are taken from the
training samples and applied to every row of X in turn before anything else is done with the data at all.
'''


def test_doc_paragraphs_keep_prose_and_drop_headers_doctests_and_code():
    paras = corpora.doc_paragraphs(DOC)

    assert paras == ["This method estimates the mean and the variance of every feature from the samples it is given, "
                     "so that later calls can centre and scale new data in the same way without looking at the "
                     "training set again."]  # the summary is too short; numpydoc, doctest and the formula go


@pytest.fixture()
def gensim_only(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "DOC_PACKAGES", {"gensim": "gensim"})
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    corpora.docstring_prose.cache_clear()
    yield tmp_path
    corpora.docstring_prose.cache_clear()


def test_docstring_prose_is_read_once_then_cached_and_a_bad_cache_is_read_again(gensim_only):
    texts = corpora.docstring_prose()
    cached = list((gensim_only / "corpora").glob("docstrings-*.json"))

    assert len(texts) > 50 and len(set(texts)) == len(texts)
    assert all(len(t.split()) >= corpora.DOC_MIN_WORDS and data.prose_fraction(t) >= 0.8 for t in texts)
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == list(texts)
    cached[0].write_text(json.dumps(["only this"]))
    corpora.docstring_prose.cache_clear()
    assert corpora.docstring_prose() == ("only this",)  # the cache is what a second process reads
    cached[0].write_text("{not json")
    corpora.docstring_prose.cache_clear()
    assert corpora.docstring_prose() == texts  # an unreadable entry: the packages are read again


def test_licence_prose_is_another_domain_than_mix_and_the_docstrings(gensim_only):
    licences = corpora.licence_prose()
    mix = corpora.shingles(t for texts in data.mix_sources().values() for t in texts)

    assert len(licences) >= 100 and sum(len(t.split()) for t in licences) > 12 * 96  # enough for 12+ chunks
    assert not any(re.search(r"https?:|@|copyright \(c\)", t, re.IGNORECASE) for t in licences)
    assert len(corpora.shingles(licences) & mix) < 5
    assert corpora.licence_prose() == licences  # deterministic (seeded order)


def test_wide_is_mix_split_as_mix_is_plus_docstrings_held_out_apart(gensim_only):
    mix, wide = data.load("mix"), data.load("wide")
    docs = [t for t in wide.train + wide.eval if t not in set(mix.train) | set(mix.eval)]

    assert set(mix.eval) <= set(wide.eval) and set(mix.train) <= set(wide.train)  # same held-out text as mix
    assert not set(wide.train) & set(wide.eval)
    counts = wide.summary()["sources"]["docstrings"]
    assert counts["train"] + counts["eval"] == len(docs) > 50
    assert counts["eval"] == min(32, round(len(docs) * 0.2))  # 20%, at most max_eval // 4
    assert wide.train[:6] != mix.train[:6] and len(wide.eval) == 128 + counts["eval"]  # docstrings from the start
    assert all(len(t.split()) >= 48 for t in docs)  # ~96-word chunks of neighbouring paragraphs
    assert corpora.shingles(docs).isdisjoint(corpora.shingles(corpora.licence_prose()))
    assert corpora.shingles(docs).isdisjoint(corpora.shingles(data.unseen_domain()))
    assert wide.fingerprint() == data.load("wide").fingerprint()


def test_a_run_on_wide_records_its_sources_and_says_the_unseen_domain_is_near(gensim_only, tiny_bert, tmp_path, fast):
    from compress import Pipeline

    result = Pipeline(["export.onnx"]).run(str(tiny_bert), "wide", tmp_path / "o", measure="quick", **fast)

    assert result.report["data"]["source"] == "builtin:wide"
    assert result.report["data"]["sources"]["docstrings"]["train"] > 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert "docstrings" in md and "a near domain, no shared passage" in md
    assert "data: wide" in (tmp_path / "o" / "recipe.yaml").read_text()  # the recipe reruns on the same corpus
