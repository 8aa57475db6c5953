"""Node selection shared by the quantization passes: exact node names or `re:` patterns."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator


def matches(name: str, patterns: list[str]) -> bool:
    """Whether `name` is one of the exact names or matches one of the `re:<regex>` patterns."""
    return any((p.startswith("re:") and re.search(p[3:], name)) or p == name for p in patterns)


def matching_nodes(path: Path, patterns: list[str]) -> list[str]:
    """Names of graph nodes matching any pattern (`re:<regex>` or an exact name)."""
    import onnx

    if not patterns:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if matches(n.name, patterns)]


def validate_patterns(patterns: list[str]) -> list[str]:
    problems = []
    for pat in patterns:
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as exc:
                problems.append(f"bad regular expression {pat!r}: {exc}")
    return problems


def _checked(patterns: list[str]) -> list[str]:
    problems = validate_patterns(patterns)
    if problems:
        raise ValueError("; ".join(problems))
    return patterns


# A config field of node / tensor names and `re:` patterns, checked when the config is built.
Patterns = Annotated[list[str], AfterValidator(_checked)]
