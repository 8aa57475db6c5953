"""Text data for calibration, training and held-out evaluation.

Sources: a user file (one sample per line, or JSONL with a text field) or a built-in real corpus
shipped inside installed wheels (no download):
  - `wiki`: paragraphs of the shortened English Wikipedia dump (default),
  - `lee`: the 300 news paragraphs of lee_background.cor,
  - `mix`: every English prose corpus of gensim's test data that no metric evaluates on
    (`mix_sources()` says which files, and why the others are left out), interleaved.
  - `wide`: `mix` plus the docstring prose of installed scientific packages (compress/corpora.py).
Samples are de-duplicated, then split by a seeded shuffle into a train/calibration part and a
held-out evaluation part, so the two never share a sample (`mix`: within each of its sources, so
both parts hold every source).

`unseen_domain()` is an evaluation set of another domain, technical documentation (the Python
language reference that ships with Python), which no built-in training corpus contains: fidelity
is measured on it beside the held-out part whatever data a run trains on (compress/measure.py).

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from compress.errors import DataError, clip, regular_file, short, short_path, stat_or_none

BUILTIN = {
    "wiki": "paragraphs of the shortened English Wikipedia dump in gensim's test data",
    "lee": "the 300 news paragraphs of gensim's lee_background.cor",
    "mix": "every English prose corpus in gensim's test data that is no evaluation set (Wikipedia, Usenet "
           "posts, encyclopedia articles, movie reviews), interleaved; held out within each source",
    "wide": "mix and the docstring prose of numpy, scipy, scikit-learn, matplotlib, networkx, gensim, interleaved",
}
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_TABLES_FILE = "enwiki-table-markup.xml.bz2"
CHUNK_WORDS, MIN_WORDS = 96, 30  # every built-in prose sample: ~96 words, from a paragraph / post of 30 or more
MIN_EVAL_PER_SOURCE = 4  # `mix`: held-out samples of each source at least (the rest in proportion to size)
UNSEEN_SAMPLES = 128  # unseen_domain(): chunks at most
MAX_DATA_BYTES = 2 * 1024**3
SNIFF_BYTES = 8192  # a NUL in the first 8 KiB means binary (git's rule), before any decoding error is reported
MAX_LINE_PROBLEMS = 5  # a JSONL file with a wrong field on every line: the first few say enough


@dataclass(frozen=True)
class TextData:
    """Disjoint train (calibration / distillation) and held-out evaluation samples."""

    source: str
    train: list[str] = field(repr=False)
    eval: list[str] = field(repr=False)
    sources: dict[str, dict[str, int]] | None = None  # a corpus of several sources (`mix`): train / eval per source

    def summary(self) -> dict:
        out = {"source": self.source, "train": len(self.train), "eval": len(self.eval)}
        return out | {"sources": self.sources} if self.sources else out

    def fingerprint(self) -> str:
        """Changes whenever any sample changes (the resume cache key uses it)."""
        import hashlib

        return hashlib.sha256("\x00".join(self.train + ["\x01"] + self.eval).encode()).hexdigest()[:16]


def gensim_file(name: str) -> Path:
    from gensim.test.utils import datapath

    return Path(datapath(name))


def _chunks(words: list[str], size: int) -> list[str]:
    return [" ".join(words[i : i + size]) for i in range(0, len(words) - size // 2, size)]


def _wiki_chunks(name: str, min_words: int, chunk_words: int) -> list[str]:
    """Plain-text chunks of a bz2 MediaWiki XML dump, markup stripped (gensim's filter_wiki);
    paragraphs of fewer than `min_words` words and list / table rows are left out."""
    from gensim.corpora.wikicorpus import filter_wiki

    with bz2.open(gensim_file(name), "rt", encoding="utf-8") as fh:
        xml = fh.read()
    out: list[str] = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.DOTALL):
        text = filter_wiki(html.unescape(body))
        for para in text.split("\n"):
            para = re.sub(r"'{2,}|={2,}|\s+", " ", para).strip()
            words = para.split()
            if len(words) >= min_words and not para.startswith(("*", "|", "{", "!")):
                out.extend(_chunks(words, chunk_words))
    return out


@lru_cache(maxsize=1)
def wiki_paragraphs(min_words: int = MIN_WORDS, chunk_words: int = CHUNK_WORDS) -> tuple[str, ...]:
    """Plain-text chunks of ~96 words from the Wikipedia dump, markup stripped."""
    return tuple(_wiki_chunks(WIKI_FILE, min_words, chunk_words))


def lee_background() -> list[str]:
    lines = gensim_file("lee_background.cor").read_text(encoding="latin-1").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


# --- mix: every English prose corpus of gensim's test data but the evaluation sets ------------------

PROSE_WORD = re.compile(r"^[(\"'“‘]*[A-Za-z][A-Za-z'’-]*[)\"'”’]*[.,;:!?)]*$")


def prose_fraction(text: str) -> float:
    """Share of the whitespace-separated tokens that are words (letters, with quotes / punctuation
    around them): ~0.9 for prose, well under 0.5 for code, grammar rules, tables or headers."""
    tokens = text.split()
    return sum(bool(PROSE_WORD.match(t)) for t in tokens) / max(len(tokens), 1)


def _prose_chunks(text: str, min_words: int = MIN_WORDS, chunk_words: int = CHUNK_WORDS) -> list[str]:
    """~96-word chunks of one paragraph or post; one of `min_words` to 48 words is kept whole."""
    words = text.split()
    if len(words) < min_words:
        return []
    return _chunks(words, chunk_words) or [" ".join(words)]


def newsgroup_posts() -> list[str]:
    """The 200 Usenet posts of gensim's `mini_newsgroup` (zlib-compressed pickle of a scikit-learn
    20-newsgroups Bunch; mostly alt.atheism and sci.space, 1993). The pickle is never loaded (that
    would run code it names): its opcodes are read with pickletools and the strings of its `data`
    list taken."""
    import pickletools
    import zlib

    raw = zlib.decompress(gensim_file("mini_newsgroup").read_bytes())
    posts: list[str] = []
    inside = False
    for op, arg, _ in pickletools.genops(raw):
        if op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):  # a dict key: 'data', then 'target', ...
            if inside:
                break
            inside = arg == "data"
        elif inside and op.name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE") and isinstance(arg, str):
            posts.append(arg)
    return posts


_QUOTED = re.compile(r"^\s*(>|\|>|\||:|}|<)|\b(writes|wrote|says):\s*$|^\s*In (article\b|<)", re.IGNORECASE)


def newsgroup_prose(post: str) -> str:
    """The author's own prose of a post: headers (up to the first blank line), quoted lines and
    attributions ("In article <...> X writes:"), the signature (from a "--" or a rule line on) and
    paragraphs that are not prose (addresses, ASCII art, tables) removed."""
    _, _, body = post.partition("\n\n")
    paragraphs, current = [], []
    for line in body.splitlines() + [""]:
        stripped = line.strip()
        if stripped == "--" or re.match(r"^[-=_*~#]{4,}", stripped):
            break
        if stripped and not _QUOTED.search(line):
            current.append(stripped)
            continue
        if current:
            paragraphs.append(" ".join(current))
        current = []
    if current:
        paragraphs.append(" ".join(current))
    keep = [p for p in paragraphs if len(p.split()) >= 8 and "@" not in p and prose_fraction(p) >= 0.75]
    return " ".join(keep)


def movie_reviews() -> list[str]:
    """The 10 IMDB movie reviews of `alldata-id-10.txt` (doc2vec's test data: lower-cased, tokens
    separated by spaces), each with its `_*N` id removed and the spaces before punctuation closed."""
    out = []
    for line in gensim_file("alldata-id-10.txt").read_text(encoding="utf-8").splitlines():
        text = re.sub(r"^_\*\d+\s+", "", line.strip())
        text = re.sub(r"\s+([,.;:!?)])", r"\1", text)
        text = re.sub(r"\(\s+", "(", text)
        text = re.sub(r"([.!?])(\s*[.!?])+", r"\1", text)
        out.append(re.sub(r"\s+", " ", text).strip())
    return [t for t in out if t]


def encyclopedia_paragraphs() -> list[str]:
    """The paragraphs of `para2para_text1.txt` / `para2para_text2.txt` (encyclopedia articles on New
    York State and Berlin, one section per line), citation marks such as [12] removed."""
    out = []
    for name in ("para2para_text1.txt", "para2para_text2.txt"):
        for line in gensim_file(name).read_text(encoding="utf-8").splitlines():
            out.append(re.sub(r"\s+", " ", re.sub(r"\[\d+\]", "", line)).strip())
    return [t for t in out if t]


@lru_cache(maxsize=1)
def mix_sources() -> dict[str, tuple[str, ...]]:
    """The sources of `mix`, each as ~96-word chunks, in interleaving order (every file is read
    from gensim's test data, `gensim_file(name)`):

    - `wikipedia`: the shortened English Wikipedia dump (`wiki_paragraphs()`, the `wiki` corpus);
    - `wikipedia-tables`: `enwiki-table-markup.xml.bz2`, 5 other English Wikipedia articles (a
      test of table markup), parsed as the dump (tables and lists are left out);
    - `newsgroups`: `mini_newsgroup`, 200 Usenet posts (`newsgroup_posts()`), the author's own
      prose of each (`newsgroup_prose()`), posts of 30 words or more;
    - `encyclopedia`: `para2para_text1.txt` / `para2para_text2.txt`, articles on New York State and
      Berlin (`encyclopedia_paragraphs()`);
    - `movie-reviews`: `alldata-id-10.txt`, 10 IMDB reviews (`movie_reviews()`).

    Left out: the evaluation sets `lee_background.cor` (the `lee` corpus and causal-LM perplexity),
    `lee.cor` (Lee-50) and `pang_lee_polarity.cor` (polarity), and `varembed_lee_subcorpus.cor`
    (5 documents of lee.cor); text that is not English prose: `crime-and-punishment.txt` (Russian),
    `bgwiki-...` (Bulgarian), `head500.noblanks.cor` (stemmed tokens: "anarch greek rule stem"),
    `toy-data.txt` (text8: Wikipedia's Anarchism article, lower-cased without punctuation, also in
    the dump), `miIslita.cor` (5 titles), `testcorpus.*`, `PathLineSentences/`, `ldavowpalwabbit.txt`
    (toy word lists), `questions-words.txt`, `OPUS_en_it_*`, `simlex999.txt`, `wordsim353.tsv`
    (word lists), and the models and vectors."""
    return {
        "wikipedia": wiki_paragraphs(),
        "wikipedia-tables": tuple(_wiki_chunks(WIKI_TABLES_FILE, MIN_WORDS, CHUNK_WORDS)),
        "newsgroups": tuple(c for post in newsgroup_posts() for c in _prose_chunks(newsgroup_prose(post))),
        "encyclopedia": tuple(c for para in encyclopedia_paragraphs() for c in _prose_chunks(para)),
        "movie-reviews": tuple(c for review in movie_reviews() for c in _prose_chunks(review)),
    }


def interleave(groups: dict[str, Sequence[str]]) -> list[str]:
    """Every group's items spread evenly over one list: item j of a group of n sits j/n of the way
    along (ties in group order), so the first len(groups) items hold one of each group and any prefix
    holds each group in proportion to its size, within one item. Deterministic."""
    keyed = [(j / len(items), g, j) for g, items in enumerate(groups.values()) for j in range(len(items))]
    lists = list(groups.values())
    return [lists[g][j] for _, g, j in sorted(keyed)]


def _eval_quotas(sizes: dict[str, int], n_eval: int) -> dict[str, int]:
    """Held-out samples per source: MIN_EVAL_PER_SOURCE each (fewer when `n_eval` cannot give every
    source that many; at most half a source), the rest of `n_eval` in proportion to size (largest
    remainders first), never a whole source."""
    per_source = min(MIN_EVAL_PER_SOURCE, n_eval // len(sizes))
    floor = {k: min(per_source, n // 2) for k, n in sizes.items()}
    rest = n_eval - sum(floor.values())
    total = sum(sizes.values())
    share = {k: rest * n / total for k, n in sizes.items()}
    quota = {k: floor[k] + int(share[k]) for k in sizes}
    for k in sorted(sizes, key=lambda k: int(share[k]) - share[k])[: max(0, n_eval - sum(quota.values()))]:
        quota[k] += 1
    return {k: min(q, sizes[k] - 1) for k, q in quota.items()}


def split_sources(groups: dict[str, Sequence[str]], source: str, eval_fraction: float = 0.2, max_eval: int = 128,
                  seed: int = 0) -> TextData:
    """`split` of a corpus made of several sources: de-duplicated over all of them (a text stays in
    the first source that has it), each source shuffled (seeded) and split on its own, so that the
    held-out part holds every source (`_eval_quotas`); both parts interleaved (`interleave`), and the
    counts per source kept in `TextData.sources`."""
    seen: set[str] = set()
    unique: dict[str, list[str]] = {}
    for name, texts in groups.items():
        unique[name] = [t for t in texts if t.strip() and not (t in seen or seen.add(t))]
    small = [f"{name} ({len(texts)})" for name, texts in unique.items() if len(texts) < 2]
    if small:
        raise DataError(f"{source}: sources with fewer than 2 distinct samples: {', '.join(small)}")
    rng = random.Random(seed)
    for texts in unique.values():
        rng.shuffle(texts)
    total = sum(len(t) for t in unique.values())
    n_eval = max(2, min(max_eval, round(total * eval_fraction)))
    quota = _eval_quotas({k: len(v) for k, v in unique.items()}, n_eval)
    train = {k: v[quota[k]:] for k, v in unique.items()}
    held = {k: v[: quota[k]] for k, v in unique.items()}
    counts = {k: {"train": len(train[k]), "eval": len(held[k])} for k in unique}
    return TextData(source=source, train=interleave(train), eval=interleave(held), sources=counts)


# --- the unseen domain: technical documentation, never trained on ----------------------------------

def _doc_blocks(text: str) -> Iterator[list[str]]:
    """Blank-line-separated blocks of lines."""
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield block
            block = []
    if block:
        yield block


_CODE = re.compile(r"\w\(|[=\[\]{}]|;\s*$|^\s*[a-z_][\w.]*\s*$")  # outside "quoted" spans: calls, =, brackets


def _is_doc_prose(block: list[str], body: str) -> bool:
    """Whether a block of a rendered reST page is prose: it starts as a sentence does (not with a
    lower-case identifier, as code does), no line outside "quoted" spans looks like code (a call,
    `=`, brackets, a bare name), its lines are filled (all but the last 40 characters or more, as
    the renderer wraps paragraphs; code lines are short and ragged), and it is mostly words."""
    unquoted = [re.sub(r'"[^"]*"', '"x"', line) for line in block]
    filled = all(len(line.strip()) >= 40 for line in block[:-1])
    return (not re.match(r"[a-z_]", body) and not any(_CODE.search(line) for line in unquoted) and filled
            and len(body.split()) >= 6 and prose_fraction(body) >= 0.75)


def doc_prose(text: str) -> list[str]:
    """The prose paragraphs of one rendered reST page (pydoc's topics): literal blocks (the indented
    block after a paragraph ending in ":"), grammar rules (`::=`), interactive sessions (`>>>`),
    headings, table rules, and blocks that are not prose (`_is_doc_prose`: code listings whose
    introduction does not end in ":", signatures, option lists) are dropped; bullets, emphasis marks
    (*x*, **x**) and footnote marks ([1]) are removed."""
    out: list[str] = []
    literal_above: int | None = None  # inside a literal block: its blocks are indented deeper than this
    content, intro = 0, False  # the last prose paragraph's text indent; whether it ended in ":"
    for block in _doc_blocks(text):
        indent = len(block[0]) - len(block[0].lstrip(" "))
        if literal_above is not None and indent > literal_above:
            continue
        literal_above = None
        if intro and indent > content:
            literal_above, intro = content, False
            continue
        first, last = block[0].strip(), block[-1].strip()
        if re.fullmatch(r"[*=~^+|-]+", last) or re.match(r"[+=]{2,}|\+-", first):  # heading underline, table rule
            intro = False
            continue
        if any(">>>" in line or "::=" in line for line in block):
            continue
        block = [re.sub(r"\s*\[\d+\]", "", line) for line in block]
        body = re.sub(r"^[*-] +", "", " ".join(line.strip() for line in block))
        body = re.sub(r"\*{1,2}([^*\s][^*]*?)\*{1,2}", r"\1", body)
        if _is_doc_prose(block, body):
            content = indent + (2 if re.match(r"\s*[*-] ", block[0]) else 0)
            intro = body.endswith(":")
            out.append(body)
    return out


def unseen_source() -> str:
    import sys

    return f"the Python {sys.version_info[0]}.{sys.version_info[1]} language reference (pydoc_data.topics)"


@lru_cache(maxsize=1)
def _unseen_chunks(max_samples: int, chunk_words: int) -> tuple[str, ...]:
    from pydoc_data.topics import topics

    per_topic = [_chunks(" ".join(doc_prose(topics[name])).split(), chunk_words) for name in sorted(topics)]
    rounds = max((len(c) for c in per_topic), default=0)
    ordered = [c[i] for i in range(rounds) for c in per_topic if i < len(c)]  # round robin over the topics
    return tuple(list(dict.fromkeys(ordered))[:max_samples])


def unseen_domain(max_samples: int = UNSEEN_SAMPLES, chunk_words: int = CHUNK_WORDS) -> list[str]:
    """An evaluation set from a domain no built-in training corpus holds: technical documentation,
    the Python language reference as Python's standard library ships it for `help()`
    (`pydoc_data.topics.topics`, 79 topics on 3.11), its prose only (`doc_prose`), cut into ~96-word
    chunks per topic, the topics taken in turn (the first 16 chunks come from 16 topics), at most
    `max_samples`. Deterministic for one Python version (the text is that version's reference).
    Fidelity is measured on it next to the held-out part (compress/measure.py); it is never
    trained on, whatever data a run is given."""
    return list(_unseen_chunks(max_samples, chunk_words))


def fingerprint_texts(texts: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


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
    n_eval = max(2, min(max_eval, round(len(unique) * eval_fraction)))
    return TextData(source=source, train=unique[n_eval:], eval=unique[:n_eval])


def load(spec: str | Path | None = None, max_eval: int = 128, seed: int = 0) -> TextData:
    """`spec` is a built-in corpus name, a text/JSONL path, or None for the default (`wiki`)."""
    spec = "wiki" if spec is None else spec
    if isinstance(spec, str) and spec == "mix":
        return split_sources(mix_sources(), source="builtin:mix", max_eval=max_eval, seed=seed)
    if isinstance(spec, str) and spec == "wide":
        from compress.corpora import load_wide
        return load_wide(max_eval=max_eval, seed=seed)
    if isinstance(spec, str) and spec in BUILTIN:
        texts = list(wiki_paragraphs()) if spec == "wiki" else lee_background()
        return split(texts, source=f"builtin:{spec}", max_eval=max_eval, seed=seed)
    if not isinstance(spec, (str, Path)):
        raise DataError(f"data must be a file path (str or Path) or one of {sorted(BUILTIN)}; got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if isinstance(spec, str) and "/" not in spec and "." not in spec and stat_or_none(path) is None:
        raise DataError(f"unknown data '{spec}': give a file path or one of {sorted(BUILTIN)}")
    return split(read_text_file(path), source=str(path), max_eval=max_eval, seed=seed)
