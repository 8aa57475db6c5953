"""English prose that installed Python packages ship besides gensim's test corpora (compress.data).

- `docstring_prose()`: the prose paragraphs of the docstrings of a fixed list of scientific packages
  (`DOC_PACKAGES`, installed with compress or torch), technical writing by many authors. The source
  files are parsed with `ast`: nothing is imported or run. Reading them takes about a minute, so the
  result is kept in the cache folder (`refcache.cache_dir()/corpora`), keyed by the packages'
  versions; `COMPRESS_CACHE=off` reads them again in each process.
- `licence_prose()`: the paragraphs of the licence files in the installed packages' metadata
  (`*.dist-info`), legal English: an evaluation domain that neither `mix` nor the docstrings hold.

Both depend on what is installed: their fingerprint (`TextData.fingerprint`) changes with the versions."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import uuid
from collections.abc import Iterator
from functools import lru_cache
from importlib import metadata
from pathlib import Path

DOC_PACKAGES = {  # import name -> distribution name; every one installs with compress's dependencies
    "numpy": "numpy", "scipy": "scipy", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
    "networkx": "networkx", "gensim": "gensim",
}
DOC_MIN_WORDS = 20  # a docstring paragraph shorter than this is a one-line summary, kept out
_SKIP_DIRS = {"tests", "test", "testing", "_vendor", "externals"}
_NOT_PROSE_LINE = re.compile(r"^(>>>|\.\.|[-*:|+]|\w[\w, ]* : )|^[-=~^]{3,}$")  # doctest, reST, bullets, "name : type"
_CODEISH = re.compile(r"[=\[\]{}<>]|\w\(|``|\$|\\")


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def doc_paragraphs(doc: str) -> list[str]:
    """The prose paragraphs of one docstring: blank-line-separated blocks of DOC_MIN_WORDS words or
    more, mostly words (`data.prose_fraction` >= 0.8), with no line of a doctest, reST directive,
    bullet, table or numpydoc "name : type" header, and nothing that reads as code (calls, `=`,
    brackets, ``literals``, math)."""
    from compress.data import prose_fraction

    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if not lines or any(_NOT_PROSE_LINE.search(ln) for ln in lines):
            continue
        body = " ".join(lines)
        if len(body.split()) >= DOC_MIN_WORDS and prose_fraction(body) >= 0.8 and not _CODEISH.search(body):
            out.append(body)
    return out


def _package_dir(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)  # finds the folder; does not import the package
    return Path(spec.origin).parent if spec and spec.origin else None


def _versions() -> dict[str, str]:
    out = {}
    for name, dist in DOC_PACKAGES.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _read_packages(versions: dict[str, str]) -> list[str]:
    seen: dict[str, None] = {}
    for name in versions:
        root = _package_dir(name)
        if root is None:
            continue
        for path in sorted(root.rglob("*.py")):
            if _SKIP_DIRS.isdisjoint(path.relative_to(root).parts[:-1]):
                for doc in _docstrings(path):
                    seen.update(dict.fromkeys(doc_paragraphs(doc)))
    return list(seen)


def _cache_file(versions: dict[str, str]) -> Path | None:
    from compress.refcache import cache_dir

    where = cache_dir()
    if where is None:
        return None
    key = hashlib.sha256(json.dumps([1, versions, DOC_MIN_WORDS], sort_keys=True).encode()).hexdigest()[:16]
    return where / "corpora" / f"docstrings-{key}.json"


@lru_cache(maxsize=1)
def docstring_prose() -> tuple[str, ...]:
    """The distinct prose paragraphs of DOC_PACKAGES' docstrings, in package and file order."""
    versions = _versions()
    cached = _cache_file(versions)
    if cached is not None:
        try:
            texts = json.loads(cached.read_text(encoding="utf-8"))
            if isinstance(texts, list) and all(isinstance(t, str) for t in texts):
                return tuple(texts)
        except (OSError, ValueError):
            pass  # absent or unreadable: read the packages again
    texts = _read_packages(versions)
    if cached is not None:
        try:  # written atomically; a failure to write never fails a run
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}")
            tmp.write_text(json.dumps(texts), encoding="utf-8")
            os.replace(tmp, cached)
        except OSError:
            pass
    return tuple(texts)


def docstring_chunks() -> tuple[str, ...]:
    """`docstring_prose()` joined in file order and cut into ~96-word chunks (a chunk holds neighbouring
    paragraphs of one module, as long as the other corpora's samples); paragraphs that share an
    8-word passage with `licence_prose()` (module headers quoting their licence) or with the unseen
    domain (`data.unseen_domain()`) are left out, so that both stay unseen."""
    from compress.data import CHUNK_WORDS, _chunks, unseen_domain

    held = shingles(licence_prose()) | shingles(unseen_domain())
    prose = [p for p in docstring_prose() if shingles([p]).isdisjoint(held)]
    return tuple(_chunks(" ".join(prose).split(), CHUNK_WORDS))


def load_wide(max_eval: int = 128, seed: int = 0):
    """The built-in `wide` corpus: `mix` split exactly as `data.load("mix")` splits it, plus the
    `docstrings` source (`docstring_chunks()`, minus any chunk mix already holds) split on its own
    (max_eval // 4 held out), the parts interleaved. So `wide`'s held-out part holds all of mix's
    and its training part no mix held-out sample: students trained on `mix` and on `wide` are
    compared on the same held-out text."""
    from compress.data import TextData, interleave, load, split

    mix = load("mix", max_eval=max_eval, seed=seed)
    known = set(mix.train) | set(mix.eval)
    docs = split([c for c in docstring_chunks() if c not in known], "docstrings", max_eval=max(2, max_eval // 4), seed=seed)
    sources = (mix.sources or {}) | {"docstrings": {"train": len(docs.train), "eval": len(docs.eval)}}
    return TextData(source="builtin:wide", train=interleave({"mix": mix.train, "docstrings": docs.train}),
                    eval=interleave({"mix": mix.eval, "docstrings": docs.eval}), sources=sources)


def shingles(texts, n: int = 8) -> set[str]:
    """Every run of `n` words (lower-cased) of `texts`: two texts that share one share a passage."""
    out: set[str] = set()
    for text in texts:
        words = text.lower().split()
        out.update(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return out


@lru_cache(maxsize=1)
def licence_prose() -> tuple[str, ...]:
    """The distinct paragraphs (20 words or more, mostly words, no copyright line, address or URL) of
    the licence, copying and notice files of every installed distribution, in a seeded shuffle (so
    that any prefix holds many licences, not the first package's)."""
    from compress.data import prose_fraction

    paras: dict[str, None] = {}
    files = sorted({str(f.locate()) for dist in metadata.distributions() for f in (dist.files or [])
                    if re.search(r"licen[cs]e|copying|notice", f.name, re.IGNORECASE) and ".dist-info" in str(f)})
    for name in files:
        try:
            text = Path(name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for block in re.split(r"\n\s*\n", text):
            body = re.sub(r"^(\d+\.|\([a-z0-9]+\)|[*-])\s+", "", re.sub(r"\s+", " ", block).strip())
            if (len(body.split()) >= 20 and prose_fraction(body) >= 0.75
                    and not re.search(r"copyright \(c\)|©|@|https?:", body, re.IGNORECASE)):
                paras[body] = None
    order = sorted(paras)
    random.Random(0).shuffle(order)
    return tuple(order)
