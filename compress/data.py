"""Text data for calibration, training and held-out evaluation.

Sources: a user file (one sample per line, or JSONL with a text field) or a built-in real corpus
shipped inside the `gensim` wheel (no download):
  - `wiki`: paragraphs of the shortened English Wikipedia dump (default),
  - `lee`: the 300 news paragraphs of lee_background.cor.
Samples are de-duplicated, then split by a seeded shuffle into a train/calibration part and a
held-out evaluation part, so the two never share a sample."""
from __future__ import annotations

import bz2
import html
import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from compress.errors import DataError

BUILTIN = {
    "wiki": "paragraphs of the shortened English Wikipedia dump in gensim's test data",
    "lee": "the 300 news paragraphs of gensim's lee_background.cor",
}
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


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


def read_text_file(path: Path, text_field: str = "text") -> list[str]:
    if not path.is_file():
        raise DataError(f"data file not found: {path} (give a text file, a .jsonl file, or one of {sorted(BUILTIN)})")
    raw = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)[text_field]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{i}: expected a JSON object with a '{text_field}' field ({exc})") from None
    else:
        texts = [ln.strip() for ln in raw if ln.strip()]
    return texts


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
    path = Path(spec)
    if not path.exists() and isinstance(spec, str) and "/" not in spec and "." not in spec:
        raise DataError(f"unknown data '{spec}': give a file path or one of {sorted(BUILTIN)}")
    return split(read_text_file(path), source=str(path), max_eval=max_eval, seed=seed)
