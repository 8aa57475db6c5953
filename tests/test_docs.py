"""The documentation ships with the code: every relative markdown link in README.md and docs/*.md,
and every `*.md` file named in them or in the sources (.py / .toml / .yaml of compress/, passes/,
exporters/, examples/, benchmarks/, tests/ and pyproject.toml), is a file or folder of this
repository, so no dangling reference comes back; none of them points outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("compress", "passes", "exporters", "examples", "benchmarks", "tests")
SOURCE_SUFFIXES = (".py", ".toml", ".yaml", ".yml")
GENERATED = {"report.md", "search.md"}  # written by every run / search into its output folder, never part of the repository
OUTSIDE = "shared" + "/"  # a folder beside the repository: material for its authors, not for users
PAGES = ("docs/architecture.md", "docs/methods.md", "docs/data.md", "docs/install.md")

MD_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MD_NAME = re.compile(r"(?<![\w.-])([\w./-]*[\w-]\.md)\b")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
NUMBER = re.compile(r"\d+\.\d+")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def source_files() -> list[Path]:
    found = [ROOT / "pyproject.toml"]
    for folder in SOURCE_DIRS:
        found += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in SOURCE_SUFFIXES
                        and p.is_file() and "__pycache__" not in p.parts)
    return found


def in_repository(path: Path) -> bool:
    resolved = path.resolve()
    return resolved.is_relative_to(ROOT) and resolved.exists()


def resolves(name: str, mentioned_in: Path) -> bool:
    """A name resolves beside the file that mentions it or from the repository root."""
    if Path(name).name in GENERATED:
        return True
    if name.startswith("/"):
        return False
    return in_repository(mentioned_in.parent / name) or in_repository(ROOT / name)


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    links = [m.group(1) for m in MD_LINK.finditer(text)]
    return [link.split("#", 1)[0] for link in links if "://" not in link and not link.startswith(("#", "mailto:"))]


def md_names(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [m.group(1) for m in MD_NAME.finditer(text) if not m.group(1).startswith("//")]


def test_docs_folder_has_an_index_and_the_pages():
    for page in ("docs/README.md", *PAGES):
        assert (ROOT / page).is_file(), page


def test_docs_index_links_every_page():
    index = {f"docs/{link}" for link in relative_links(ROOT / "docs" / "README.md")}

    missing = [f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))
               if p.name != "README.md" and f"docs/{p.name}" not in index]

    assert not missing, f"docs/README.md does not link {missing}"


def test_docs_scan_finds_the_references_it_checks():
    """Not vacuous: the code and the README do point into docs/ (this file's own names not counted)."""
    names = {name for path in source_files() + [ROOT / "README.md"] if path != Path(__file__).resolve()
             for name in md_names(path)}
    links = {f"docs/{link}" for link in relative_links(ROOT / "docs" / "README.md")}

    assert len({name for name in names if name.startswith("docs/")}) >= 2
    assert set(PAGES) <= links


def test_docs_relative_markdown_links_resolve_in_the_repository():
    dangling = [f"{path.relative_to(ROOT)}: ({link})" for path in markdown_files()
                for link in relative_links(path) if link and not in_repository(path.parent / link)]

    assert not dangling, "links to nothing in the repository:\n" + "\n".join(dangling)


def test_docs_every_md_file_named_in_docs_or_sources_exists():
    dangling = [f"{path.relative_to(ROOT)}: {name}" for path in markdown_files() + source_files()
                for name in md_names(path) if not resolves(name, path)]

    assert not dangling, "names of .md files that are not in the repository:\n" + "\n".join(dangling)


def test_docs_numbers_quoted_next_to_a_docs_page_are_on_that_page():
    """`docs/data.md says 0.505`: the page has to say 0.505 (same line, the next 40 characters)."""
    missing = []
    for path in source_files() + [ROOT / "README.md"]:
        for line in path.read_text(encoding="utf-8").splitlines():
            for m in re.finditer(r"docs/[\w-]+\.md", line):
                page = (ROOT / m.group(0)).read_text(encoding="utf-8") if (ROOT / m.group(0)).is_file() else ""
                quoted = NUMBER.findall(line[m.end():m.end() + 40])
                missing += [f"{path.relative_to(ROOT)}: {m.group(0)} {n}" for n in quoted if n not in page]

    assert not missing, "numbers quoted from docs pages that the pages do not state:\n" + "\n".join(missing)


def test_docs_and_sources_never_point_outside_the_repository():
    offenders = [str(path.relative_to(ROOT)) for path in markdown_files() + source_files()
                 if OUTSIDE in path.read_text(encoding="utf-8")]

    assert not offenders, f"mention a folder outside the repository ({OUTSIDE}): {offenders}"
