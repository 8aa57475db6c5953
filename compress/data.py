"""Text data for calibration, training and held-out evaluation.

Sources: a user file (one sample per line, or JSONL with a text field) or a built-in real corpus
shipped inside the `gensim` wheel (no download):
  - `wiki`: paragraphs of the shortened English Wikipedia dump (default),
  - `lee`: the 300 news paragraphs of lee_background.cor.
Samples are de-duplicated, then split by a seeded shuffle into a train/calibration part and a
held-out evaluation part, so the two never share a sample.

A user file must be UTF-8 text of at most MAX_DATA_BYTES (2 GiB: every sample is kept in memory,
and calibration or distillation needs thousands of samples, not billions); a binary file (NUL
bytes), other encodings and JSONL rows whose text is not a string are refused with the file, the
line and the fix, never read with replacement characters."""
from __future__ import annotations

import bz2
import html
import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from compress.errors import DataError, clip, regular_file, short, short_path, stat_or_none

BUILTIN = {
    "wiki": "paragraphs of the shortened English Wikipedia dump in gensim's test data",
    "lee": "the 300 news paragraphs of gensim's lee_background.cor",
}
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MAX_DATA_BYTES = 2 * 1024**3
SNIFF_BYTES = 8192  # a NUL in the first 8 KiB means binary (git's rule), before any decoding error is reported
MAX_LINE_PROBLEMS = 5  # a JSONL file with a wrong field on every line: the first few say enough


@dataclass(frozen=True)
class TextData:
    """Disjoint train (calibration / distillation) and held-out evaluation samples."""

    source: str
    train: list[str] = field(repr=False)
    eval: list[str] = field(repr=False)

    def summary(self) -> dict:
        return {"source": self.source, "train": len(self.train), "eval": len(self.eval)}

    def fingerprint(self) -> str:
        """Changes whenever any sample changes (the resume cache key uses it)."""
        import hashlib

        return hashlib.sha256("\x00".join(self.train + ["\x01"] + self.eval).encode()).hexdigest()[:16]


def gensim_file(name: str) -> Path:
    from gensim.test.utils import datapath

    return Path(datapath(name))


def _chunks(words: list[str], size: int) -> list[str]:
    return [" ".join(words[i : i + size]) for i in range(0, len(words) - size // 2, size)]


@lru_cache(maxsize=1)
def wiki_paragraphs(min_words: int = 30, chunk_words: int = 96) -> tuple[str, ...]:
    """Plain-text chunks of ~96 words from the Wikipedia dump, markup stripped."""
    from gensim.corpora.wikicorpus import filter_wiki

    with bz2.open(gensim_file(WIKI_FILE), "rt", encoding="utf-8") as fh:
        xml = fh.read()
    out: list[str] = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        text = filter_wiki(html.unescape(body))
        for para in text.split("\n"):
            para = re.sub(r"'{2,}|={2,}|\s+", " ", para).strip()
            words = para.split()
            if len(words) >= min_words and not para.startswith(("*", "|", "{", "!")):
                out.extend(_chunks(words, chunk_words))
    return tuple(out)


def lee_background() -> list[str]:
    lines = gensim_file("lee_background.cor").read_text(encoding="latin-1").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


def _check_file(path: Path) -> None:
    kinds = f"a UTF-8 text file (one sample per line), a .jsonl file, or one of {sorted(BUILTIN)}"
    missing = f"data file not found: {short_path(path)} (give a text file, a .jsonl file, or one of {sorted(BUILTIN)})"
    size = regular_file(path, "data", f"text models take {kinds}", missing, DataError).st_size
    if size > MAX_DATA_BYTES:
        raise DataError(f"data file {path} is {_human(size)}, over the {_human(MAX_DATA_BYTES)} limit (all samples are "
                        "held in memory): take a sample of it, e.g. `shuf -n 100000 FILE > sample.txt`")


def _human(size: int) -> str:
    for unit, n in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= n:
            return f"{size / n:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{size} bytes"


def _utf8_name(path: Path) -> Path:
    return path.with_name(f"{path.stem}.utf8{path.suffix}")


def _binary(path: Path, offset: int) -> str:
    return (f"data file {path} is not text: NUL byte at offset {offset} (an image, model weights, an archive?); "
            "give a UTF-8 text file with one sample per line, or a .jsonl file")


def _not_text(path: Path, head: bytes) -> str | None:
    """Why `head`, the start of the file, is not UTF-8 text; None if it may be."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # a byte-order mark: Windows "Unicode" text
        return (f"data file {path} is UTF-16 text: convert it to UTF-8, "
                f"e.g. `iconv -f utf-16 -t utf-8 {path} > {_utf8_name(path)}`")
    nul = head.find(b"\0")
    return _binary(path, nul) if nul >= 0 else None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded strictly as UTF-8, read one line at a time."""
    fix = f"convert the file to UTF-8, e.g. from Latin-1: `iconv -f latin1 -t utf-8 {path} > {_utf8_name(path)}`"
    try:
        with path.open("rb") as fh:
            why = _not_text(path, fh.read(SNIFF_BYTES))
            if why:
                raise DataError(why)
            fh.seek(0)
            offset = 0
            for number, raw in enumerate(fh, 1):
                if b"\0" in raw:
                    raise DataError(_binary(path, offset + raw.index(b"\0")))
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not text
                    raw, offset = raw[3:], 3
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                                    f"{offset + exc.start}): {fix}") from None
                offset += len(raw)
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None


def _json_kind(value: object) -> str:
    kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _jsonl_texts(path: Path, lines: Iterator[tuple[int, str]], text_field: str) -> list[str]:
    """The `text_field` string of each row; the first few bad rows are all named in one DataError."""
    texts, problems = [], []
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of > 4300 digits, deep nesting
            problems.append(f"{path}:{number}: not valid JSON ({clip(exc, 120)})")
        else:
            if not isinstance(row, dict) or text_field not in row:
                got = f"an object with keys {short(list(row), 60)}" if isinstance(row, dict) else _json_kind(row)
                problems.append(f"{path}:{number}: expected a JSON object with a '{text_field}' field (got {got})")
            elif not isinstance(row[text_field], str):
                problems.append(f"{path}:{number}: '{text_field}' is {_json_kind(row[text_field])}, expected a string")
            else:
                texts.append(row[text_field])
        if len(problems) == MAX_LINE_PROBLEMS:
            problems.append(f"(stopped after {MAX_LINE_PROBLEMS} problems)")
            break
    if problems:
        raise DataError("\n  ".join(problems) + f'\n  every line must be a JSON object like {{"{text_field}": "a sample"}}')
    return texts


def read_text_file(path: Path, text_field: str = "text") -> list[str]:
    _check_file(path)
    lines = _lines(path)
    if path.suffix == ".jsonl":
        return _jsonl_texts(path, lines, text_field)
    return [part.strip() for _, line in lines for part in line.splitlines() if part.strip()]


def split(texts: list[str], source: str, eval_fraction: float = 0.2, max_eval: int = 128, seed: int = 0) -> TextData:
    unique = list(dict.fromkeys(t for t in texts if t.strip()))
    if len(unique) < 4:
        raise DataError(f"{source} has {len(unique)} distinct non-empty samples; need at least 4 "
                        "(some to calibrate or train on, some held out to evaluate)")
    random.Random(seed).shuffle(unique)
    n_eval = max(2, min(max_eval, int(round(len(unique) * eval_fraction))))
    return TextData(source=source, train=unique[n_eval:], eval=unique[:n_eval])


def load(spec: str | Path | None = None, max_eval: int = 128, seed: int = 0) -> TextData:
    """`spec` is a built-in corpus name, a text/JSONL path, or None for the default (`wiki`)."""
    spec = "wiki" if spec is None else spec
    if isinstance(spec, str) and spec in BUILTIN:
        texts = list(wiki_paragraphs()) if spec == "wiki" else lee_background()
        return split(texts, source=f"builtin:{spec}", max_eval=max_eval, seed=seed)
    if not isinstance(spec, (str, Path)):
        raise DataError(f"data must be a file path (str or Path) or one of {sorted(BUILTIN)}; got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if isinstance(spec, str) and "/" not in spec and "." not in spec and stat_or_none(path) is None:
        raise DataError(f"unknown data '{spec}': give a file path or one of {sorted(BUILTIN)}")
    return split(read_text_file(path), source=str(path), max_eval=max_eval, seed=seed)
