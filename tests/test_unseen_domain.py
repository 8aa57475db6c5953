"""The `mix` training corpus (every English prose corpus of gensim's test data but the evaluation
sets) and fidelity on an unseen domain (technical documentation no training corpus holds)."""
from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from compress import Pipeline, data, evaluate
from compress.corpora import shingles
from compress.data import UNSEEN_SAMPLES


@pytest.fixture(scope="module")
def mix():
    return data.load("mix")


@pytest.fixture(scope="module")
def mix_shingles():
    return shingles(t for texts in data.mix_sources().values() for t in texts)


def test_mix_holds_every_source_in_train_and_eval(mix):
    sources = data.mix_sources()
    origin = {t: name for name, texts in sources.items() for t in texts}

    assert set(sources) == {"wikipedia", "wikipedia-tables", "newsgroups", "encyclopedia", "movie-reviews"}
    assert not set(mix.train) & set(mix.eval)
    for part in (mix.train, mix.eval):
        assert {origin[t] for t in part} == set(sources)
    counts = mix.summary()["sources"]
    for name in sources:
        assert counts[name]["train"] == sum(origin[t] == name for t in mix.train) > 0
        assert counts[name]["eval"] == sum(origin[t] == name for t in mix.eval) >= 4
    assert len(mix.eval) == 128 and len(mix.train) + len(mix.eval) == len(origin)
    assert set(data.wiki_paragraphs()) <= set(mix.train) | set(mix.eval)  # all of `wiki` is in it


def test_mix_is_interleaved_so_every_prefix_is_mixed_and_is_deterministic(mix):
    origin = {t: name for name, texts in data.mix_sources().items() for t in texts}

    assert len({origin[t] for t in mix.train[:5]}) == 5  # one of each source first
    assert len({origin[t] for t in mix.eval[:16]}) == 5  # quick fidelity (16 samples) sees every source
    newsgroups = sum(origin[t] == "newsgroups" for t in mix.train[:500])
    assert 25 <= newsgroups <= 40  # ~6.4% of the corpus, so ~32 of any 500 first samples
    again = data.load("mix")
    assert again.train == mix.train and again.eval == mix.eval
    assert data.interleave({"a": ["a1", "a2", "a3", "a4"], "b": ["b1", "b2"]}) == ["a1", "b1", "a2", "a3", "b2", "a4"]


def test_mix_samples_are_english_prose_chunks(mix):
    sources = data.mix_sources()

    for name, texts in sources.items():
        assert len(texts) >= 20, name
        assert all(30 <= len(t.split()) <= 96 for t in texts), name
        assert sum(data.prose_fraction(t) for t in texts) / len(texts) > 0.85, name
    assert not any("writes:" in t or "Message-ID" in t or t.startswith(">") for t in sources["newsgroups"])
    assert not any(t.startswith("_*") or " ," in t for t in sources["movie-reviews"])


def test_mix_holds_nothing_of_the_evaluation_sets(mix_shingles):
    lee50_docs, polarity_texts = evaluate.lee50_data()[0], evaluate.polarity_data()[0]

    for held in (data.lee_background(), lee50_docs, polarity_texts):
        assert not shingles(held) & mix_shingles


def test_unseen_domain_shares_no_passage_with_any_training_corpus(mix_shingles):
    unseen = shingles(data.unseen_domain())

    assert unseen and not unseen & mix_shingles  # mix holds all of wiki, so wiki neither
    assert not unseen & shingles(data.lee_background())


def test_unseen_domain_is_technical_prose_without_code():
    texts = data.unseen_domain()

    assert len(texts) == UNSEEN_SAMPLES and len(set(texts)) == len(texts)
    assert texts == data.unseen_domain()
    assert all(48 <= len(t.split()) <= 96 for t in texts)
    assert all(">>>" not in t and "::=" not in t and "def " not in t for t in texts)
    assert min(data.prose_fraction(t) for t in texts) >= 0.8
    assert sum(data.prose_fraction(t) for t in texts) / len(texts) > 0.9
    assert sum("Python" in t or "object" in t for t in texts) > len(texts) // 2  # it is documentation of Python


def test_doc_prose_drops_code_grammar_and_sessions():
    page = ("The \"assert\" statement\n**********************\n\n"
            "Assert statements are a convenient way to insert debugging\nassertions into a program:\n\n"
            "   assert_stmt ::= \"assert\" expression\n\n"
            "The simple form, \"assert expression\", is equivalent to\n\n"
            "   if __debug__:\n       if not expression: raise AssertionError\n\n"
            "   >>> print(1)\n   1\n\n"
            "Assignments to *__debug__* are illegal.  The value for the built-in\nvariable is fixed. [1]\n")

    assert data.doc_prose(page) == [
        "Assert statements are a convenient way to insert debugging assertions into a program:",
        "The simple form, \"assert expression\", is equivalent to",
        "Assignments to __debug__ are illegal.  The value for the built-in variable is fixed.",
    ]


@pytest.fixture
def fidelity_calls(monkeypatch):
    """The number of samples of each fidelity measurement, in order."""
    seen: list[int] = []
    real = evaluate.fidelity

    def counting(kind, student, teacher, tokenizer, texts, *a, **k):
        seen.append(len(texts))
        return real(kind, student, teacher, tokenizer, texts, *a, **k)

    monkeypatch.setattr(evaluate, "fidelity", counting)
    return seen


@pytest.mark.parametrize("level, samples", [("full", UNSEEN_SAMPLES), ("quick", 16)])
def test_pipeline_records_unseen_domain_fidelity_beside_the_held_out_one(level, samples, tiny_bert, text_file, tmp_path,
                                                                        fast, fidelity_calls, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", "off")
    buf = io.StringIO()

    result = Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "o", measure=level,
                                           **{**fast, "console": Console(file=buf, width=250)})

    assert fidelity_calls == [8, samples] * 2  # per stage: the user file's 8 held-out lines, then the unseen domain
    for stage in result.report["stages"]:
        assert set(stage["fidelity_unseen"]) == set(stage["fidelity"]) == {"cosine", "cosine_min"}
    assert result.report["stages"][1]["fidelity_unseen"]["cosine"] > 0.99  # export changes nothing
    assert result.report["unseen_domain"] == {"source": data.unseen_source(), "samples": samples}
    md = (tmp_path / "o" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| # |"))
    assert "| cosine | cosine_min | unseen-domain cosine |" in header
    assert f"fidelity on {samples} samples of the Python" in md and "unseen-domain cosine 1.0000" in md
    assert "unseen-domain cosine=" in buf.getvalue() and "unseen-domain" in buf.getvalue()  # stage lines, summary
    assert json.loads((tmp_path / "o" / "report.json").read_text())["stages"][1]["fidelity_unseen"]


def test_off_level_and_causal_lms_measure_no_unseen_domain(tiny_bert, tiny_llama, text_file, tmp_path, fast,
                                                           fidelity_calls, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", "off")

    off = Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "o", measure="off", **fast)
    lm = Pipeline(["export.onnx"]).run(str(tiny_llama), str(text_file), tmp_path / "l", measure="quick", **fast)

    assert fidelity_calls == [8, 8]  # the LM's held-out samples only
    assert not any("fidelity_unseen" in s for s in off.report["stages"] + lm.report["stages"])
    assert "unseen_domain" not in off.report and "unseen_domain" not in lm.report
    assert "unseen-domain" not in (tmp_path / "l" / "report.md").read_text()


def test_classifier_gets_unseen_domain_kl_and_top1(tiny_classifier, text_file, tmp_path, fast, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", "off")

    result = Pipeline(["export.onnx"]).run(str(tiny_classifier), str(text_file), tmp_path / "c", measure="quick", **fast)

    assert all(set(s["fidelity_unseen"]) == {"kl", "top1"} for s in result.report["stages"])
    assert result.report["stages"][1]["fidelity_unseen"]["top1"] == 1.0
    assert "unseen-domain kl | unseen-domain top1" in (tmp_path / "c" / "report.md").read_text()


def test_cache_hit_keeps_unseen_domain_fidelity_without_running_the_teacher_again(tiny_bert, text_file, tmp_path, fast,
                                                                                   fidelity_calls, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    buf = io.StringIO()
    first = Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "a", measure="quick", **fast)
    fidelity_calls.clear()
    teacher_runs: list[int] = []
    real_outputs = evaluate.outputs
    monkeypatch.setattr(evaluate, "outputs", lambda run, tok, texts, *a, **k: teacher_runs.append(len(texts))
                        or real_outputs(run, tok, texts, *a, **k))

    second = Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), tmp_path / "b", measure="quick",
                                           **{**fast, "console": Console(file=buf, width=200)})

    assert "input measurements reused from the cache" in buf.getvalue()
    assert teacher_runs == [] and fidelity_calls == [8, 16]  # the export stage only
    assert second.report["stages"][0]["fidelity_unseen"] == first.report["stages"][0]["fidelity_unseen"]
    assert second.report["stages"][1]["fidelity_unseen"] == pytest.approx(first.report["stages"][1]["fidelity_unseen"],
                                                                          abs=1e-6)
    entry = next((tmp_path / "cache").iterdir())
    assert (entry / "unseen.npz").is_file() and (entry / "outputs.npz").is_file()
