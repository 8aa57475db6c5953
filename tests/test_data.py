"""Data loading: built-in corpora and user files split into disjoint train / held-out parts."""
from __future__ import annotations

import json

import pytest

from compress import data
from compress.errors import DataError


def test_data_split_train_and_eval_never_overlap(text_file):
    d = data.load(text_file)

    assert d.eval and d.train
    assert not set(d.eval) & set(d.train)


def test_data_split_deduplicates_before_splitting():
    texts = ["same sample"] * 10 + [f"sample {i}" for i in range(20)]

    d = data.split(texts, "t")

    assert len(d.train) + len(d.eval) == 21
    assert not set(d.eval) & set(d.train)


def test_data_jsonl_reads_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"row {i}", "label": i}) for i in range(10)))

    d = data.load(path)

    assert sorted(d.train + d.eval) == sorted(f"row {i}" for i in range(10))


def test_data_jsonl_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')

    with pytest.raises(DataError, match=r"d.jsonl:2: expected a JSON object with a 'text' field"):
        data.load(path)


def test_data_unknown_builtin_lists_the_known_ones():
    with pytest.raises(DataError, match=r"unknown data 'wikipedia'.*\['lee', 'mix', 'wide', 'wiki'\]"):
        data.load("wikipedia")


def test_data_builtin_lee_is_real_news_text():
    d = data.load("lee")

    paragraphs = data.lee_background()
    assert len(paragraphs) == 300  # lee_background.cor: 300 paragraphs, 7 of them repeated
    assert len(d.train) + len(d.eval) == len(set(paragraphs)) == 293
    assert all(len(t.split()) > 10 for t in d.eval)


def test_data_counts_distinct_samples_before_accepting_a_file(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("a\na\na\nb\n")

    with pytest.raises(DataError, match="2 distinct non-empty samples; need at least 4"):
        data.load(path)


def test_data_jsonl_names_every_bad_line_when_text_is_not_a_string(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 1}\n{"text": true}\n["text"]\n')

    with pytest.raises(DataError) as err:
        data.read_text_file(path)

    message = str(err.value)
    assert "d.jsonl:2: 'text' is a number, expected a string" in message
    assert "d.jsonl:3: 'text' is a boolean, expected a string" in message
    assert "d.jsonl:4: expected a JSON object with a 'text' field (got a list)" in message


def test_data_reads_text_when_file_starts_with_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes("\ufeffcafé one\r\ntwo\n\nthree\n".encode("utf-8"))

    assert data.read_text_file(path) == ["café one", "two", "three"]


def test_data_names_line_and_offset_when_file_is_not_utf8(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"ok\n" * 3 + "caf\xe9\n".encode("latin-1"))

    with pytest.raises(DataError, match=r"d.txt:4: not UTF-8 text \(byte 0xe9 at offset 12\).*iconv -f latin1 -t utf-8"):
        data.read_text_file(path)


# ---- files that are not regular files, values that are not paths (review F9, F12) ----------------

@pytest.fixture
def no_hang():
    """A read from a pipe would wait for a writer forever: fail the test instead."""
    import signal

    def hung(*_):
        raise TimeoutError("data.load read from a pipe or a device")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_data_refuses_a_pipe_or_a_device_without_reading_it(tmp_path, no_hang, kind):
    import os

    path = tmp_path / "fifo.txt" if kind == "fifo" else "/dev/zero"
    if kind == "fifo":
        os.mkfifo(path)

    with pytest.raises(DataError, match=f"data '{path}' is not a regular file \\(a pipe, a device or a socket\\)"):
        data.load(str(path))


@pytest.mark.parametrize("spec", [5, 3.5, ["a", "b"], b"news.txt"])
def test_data_names_the_type_when_the_spec_is_not_a_path(spec):
    with pytest.raises(DataError, match=f"data must be a file path \\(str or Path\\) or one of \\['lee', 'mix', 'wide', 'wiki'\\]; "
                                        f"got {type(spec).__name__}"):
        data.load(spec)


def test_data_reads_a_file_under_the_home_folder_when_the_spec_starts_with_tilde(tmp_path, monkeypatch, text_file):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "news.txt").write_bytes(text_file.read_bytes())

    assert data.load("~/news.txt").summary() == data.load(str(text_file)).summary() | {"source": str(tmp_path / "news.txt")}
