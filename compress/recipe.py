"""One loader for the three front doors: Python configs, YAML recipes and CLI `--pass` strings all
become a list of validated pass configs here, with every problem collected and reported at once.
No dotted-path instantiation: a pass name can only resolve through the registry.

Hostile input stays cheap: a recipe is at most MAX_RECIPE_BYTES, YAML anchors and aliases are
refused (nested aliases expand exponentially), and every user value echoed in a message goes
through `errors.short`, which bounds the work of printing it."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from compress import registry
from compress.config import PassConfig
from compress.errors import ConfigError, UserError, clip, regular_file, short, short_path

RECIPE_KEYS = {"model", "data", "measure", "passes"}
MEASURE_LEVELS = ("full", "quick", "off")  # compress/measure.py LEVELS (not imported: recipes stay light)
MAX_RECIPE_BYTES = 1_000_000  # a recipe is a few lines; a bigger file is the wrong file, or hostile
NO_PASSES = "no passes: give at least one --pass, or a recipe with a 'passes' list; `compress passes` lists them"


@dataclass(frozen=True)
class Problem:
    """Problems found while reading a recipe or a `--pass` string, carried in the pass list so that
    `collect` reports them with every other problem (the Pipeline's call sites need no change).

    `is_pass`: it stands for one pass (a bad --pass string), so it takes that pass's number;
    otherwise it is about the recipe as a whole (a top-level key) and takes no number.
    `explains_no_passes`: it already says why there are no passes (a 'pases:' typo)."""

    messages: tuple[str, ...]
    is_pass: bool = True
    explains_no_passes: bool = False


class _Refused(yaml.YAMLError):
    """Valid YAML that a recipe may not use (its message is complete as it is)."""


class NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: a recipe never needs them, and nested aliases
    (a 400-byte "billion laughs" file) expand to gigabytes when the value is walked or printed."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            what = f"*{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"&{event.anchor}"
            raise _Refused(f"line {event.start_mark.line + 1}: YAML anchors and aliases ({clip(what, 40)}) "
                           "are not allowed in recipes or --pass values: write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """A key given twice is refused at any level (YAML would keep the last one silently: a second
        `model:` would switch the model, a second `opset:` would win over the first)."""
        first: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # unhashable keys are refused by SafeLoader itself
            key = self.construct_object(key_node)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:
                continue
            if earlier is not key_node:
                raise _Refused(f"line {key_node.start_mark.line + 1}: the key {short(key, 60)} is given twice "
                               f"(first on line {earlier.start_mark.line + 1}): keep one")
        return super().construct_mapping(node, deep)

    def construct_sexagesimal(self, node: Any) -> Any:
        """YAML 1.1 reads 2:4 as the base-60 number 124 (YAML 1.2 has no such numbers): such a value stays
        the text written (prune.sparse's pattern=2:4)."""
        if ":" in str(node.value):
            return self.construct_scalar(node)
        return (super().construct_yaml_int if node.tag.endswith(":int") else super().construct_yaml_float)(node)


NoAliasLoader.add_constructor("tag:yaml.org,2002:int", NoAliasLoader.construct_sexagesimal)
NoAliasLoader.add_constructor("tag:yaml.org,2002:float", NoAliasLoader.construct_sexagesimal)


def load_yaml(text: str) -> Any:
    """Parse YAML with NoAliasLoader; every way it can fail becomes a ValueError with a short message."""
    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - NoAliasLoader is a SafeLoader
    except _Refused as exc:
        raise ValueError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {clip(' '.join(str(exc).split()), 300)}") from None
    except RecursionError:
        raise ValueError("the YAML is nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # an int of > 4300 digits, a date like 2024-13-45
        why = "a number has more than 4300 digits" if "digits" in str(exc) else clip(exc, 200)
        raise ValueError(f"a value cannot be read: {why}") from None


def _pydantic_problems(where: str, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(clip(x, 60) for x in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            out.append(f"{where}: '{loc}' is not a parameter of this pass (run `compress passes` to list them)")
        else:
            got = f" (got {short(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
            out.append(f"{where}: {loc}: {clip(err['msg'], 200)}{got}")
    return out


def _one(entry: Any, where: str) -> tuple[PassConfig | None, list[str]]:
    """One entry of a pass list -> its config (None where invalid) and its problems."""
    if isinstance(entry, PassConfig):
        return entry, []
    if isinstance(entry, Problem):
        return None, [f"{where} {m}" for m in entry.messages]
    if isinstance(entry, str):
        entry = {"pass": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("pass"), str):
        return None, [f"{where} must be a mapping with a 'pass' name, like {{pass: quant.int8}} (got {short(entry)})"]
    name = entry["pass"]
    if name not in registry.names():  # long names get no suggestion: difflib's work grows with their length
        hint = registry.suggest(name) if len(name) <= 64 else "run `compress passes` to list them"
        return None, [f"{where} unknown pass {short(name, 60)}: {hint}"]
    params = {k: v for k, v in entry.items() if k != "pass"}
    bad_keys = [k for k in params if not isinstance(k, str)]
    if bad_keys:
        return None, [f"{where} '{name}': parameter names must be text (got {short(bad_keys)})"]
    try:
        return registry.get(name).config(**params), []
    except UserError as exc:
        return None, [f"{where} {exc}"]
    except ValidationError as exc:
        return None, _pydantic_problems(f"{where} '{name}'", exc)


def collect(entries: list[Any]) -> tuple[list[PassConfig | None], list[str]]:
    """Dicts `{pass: name, **params}`, names, configs or `Problem`s -> configs (None where invalid)
    + problems. A list without passes is a problem too: a run that does nothing is a mistake."""
    configs: list[PassConfig | None] = []
    problems: list[str] = []
    for entry in entries:
        if isinstance(entry, Problem) and not entry.is_pass:
            problems.extend(entry.messages)
            continue
        config, found = _one(entry, f"passes[{len(configs)}]")
        configs.append(config)
        problems.extend(found)
    explained = any(isinstance(e, Problem) and e.explains_no_passes for e in entries)
    if not configs and not explained:
        problems.append(NO_PASSES)
    return configs, problems


def parse_entries(entries: list[Any], source: str = "pipeline") -> list[PassConfig]:
    """Like `collect`, but raises one ConfigError listing every problem."""
    configs, problems = collect(entries)
    if problems:
        raise ConfigError(problems, source)
    return configs


def _split_top_level(text: str) -> list[str]:
    """Split `a=1,b=[x,y],c=2` on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if start < len(text):
        parts.append(text[start:])
    return parts


def parse_cli_pass(text: str) -> dict | Problem:
    """`quant.int8:mode=static,per_channel=true` -> {"pass": "quant.int8", "mode": "static", ...}.

    A string that cannot be read gives a `Problem` instead of raising, so that `collect` reports
    it together with the problems of every other --pass."""
    name, _, rest = text.partition(":")
    entry: dict[str, Any] = {"pass": name.strip()}
    problems = []
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(f"expected key=value after ':', got {short(item, 60)}")
        elif key in entry:
            problems.append(f"'{clip(key, 60)}' is given twice: keep one")
        else:
            try:
                entry[key] = load_yaml(value) if value.strip() else ""
            except ValueError as exc:
                problems.append(f"cannot read the value of '{clip(key, 60)}': {exc}")
    if problems:
        return Problem(tuple(f"--pass {short(text, 80)}: {p}" for p in problems))
    return entry


def _recipe_text(path: Path) -> str:
    """The recipe's text; a missing, huge, binary or non-UTF-8 file raises one clear error."""
    regular_file(path, "recipe", "give a YAML file", f"recipe not found: {short_path(path)}")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)  # read no more than the limit, whatever stat says
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError([f"the file is over {MAX_RECIPE_BYTES // 1_000_000} MB; a recipe is a short list of passes: "
                           "is this the right file?"], str(path))
    if b"\0" in raw:
        raise ConfigError(["not a YAML text file: it holds NUL bytes (a binary file?)"], str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}): "
                           f"save the recipe as UTF-8 (e.g. iconv -f latin1 -t utf-8)"], str(path)) from None


def _unknown_key(key: Any) -> Problem:
    typo = isinstance(key, str) and len(key) <= 64  # difflib's work grows with the key's length
    close = difflib.get_close_matches(key, sorted(RECIPE_KEYS), n=1, cutoff=0.6) if typo else []
    hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(sorted(RECIPE_KEYS))}"
    return Problem((f"unknown top-level key {short(key, 60)}: {hint}",), is_pass=False,
                   explains_no_passes=close == ["passes"])


def _top_level(doc: Any) -> tuple[dict, list[Problem]]:
    """The recipe document -> (its fields, the problems of its top level)."""
    if doc is None:  # an empty file, or only comments
        doc = {}
    if isinstance(doc, list):
        doc = {"passes": doc}
    if not isinstance(doc, dict):
        why = f"expected a mapping with a 'passes' list (or a bare list of passes), got {short(doc)}"
        return {"model": None, "data": None, "measure": None, "passes": []}, [Problem((why,), is_pass=False, explains_no_passes=True)]
    problems = [_unknown_key(k) for k in doc if k not in RECIPE_KEYS]
    fields = {k: doc.get(k) for k in ("model", "data", "measure")}
    if fields["measure"] is False:  # YAML 1.1 reads a bare `off` as false
        fields["measure"] = "off"
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            what = "full, quick or off" if key == "measure" else "a path or a built-in name"
            problems.append(Problem((f"'{key}' must be text: {what} (got {short(value)})",), is_pass=False))
            fields[key] = None
    if fields["measure"] not in (None, *MEASURE_LEVELS):
        problems.append(Problem((f"'measure' must be one of {', '.join(MEASURE_LEVELS)} (got {short(fields['measure'])})",),
                                is_pass=False))
        fields["measure"] = None
    passes = doc.get("passes")
    if passes is not None and not isinstance(passes, list):
        problems.append(Problem((f"'passes' must be a list, one '- pass: NAME' line per pass (got {short(passes)})",),
                                is_pass=False, explains_no_passes=True))
        passes = None
    return {**fields, "passes": passes or []}, problems


def read_recipe(path: str | Path) -> dict:
    """A recipe file -> {"model": str|None, "data": str|None, "measure": str|None, "passes": [raw entries]}.

    A file that cannot be read as YAML raises ConfigError. Problems of its top level (an unknown
    key, a wrong type) come first in "passes" as `Problem`s, so that `collect` lists them together
    with the problems of every pass."""
    path = Path(path)
    try:
        doc = load_yaml(_recipe_text(path))
    except ValueError as exc:
        raise ConfigError([str(exc)], str(path)) from None
    fields, problems = _top_level(doc)
    return {"model": fields["model"], "data": fields["data"], "measure": fields["measure"],
            "passes": [*problems, *fields["passes"]]}


def load_search_recipe(path: Path) -> dict:
    """A `compress search` recipe (a YAML mapping; compress/search.py checks its keys), read with the
    same limits as a pipeline recipe."""
    try:
        doc = load_yaml(_recipe_text(path))
    except ValueError as exc:
        raise ConfigError([str(exc)], str(path)) from None
    if not isinstance(doc, dict):
        raise ConfigError([f"a search recipe is a mapping (objectives, constraints, space, ...), got {short(doc)}"], str(path))
    return doc


def load_space(path: Path) -> list:
    """A search space file: a YAML list of passes, or a search recipe whose `space` is one."""
    try:
        doc = load_yaml(_recipe_text(path))
    except ValueError as exc:
        raise ConfigError([str(exc)], str(path)) from None
    if isinstance(doc, dict) and "space" in doc:
        doc = doc["space"]
    if not isinstance(doc, list):
        raise ConfigError([f"a search space is a list of passes (or a mapping with a 'space' list), got {short(doc)}"],
                          str(path))
    return doc


def dump_recipe(configs: list[PassConfig], model: str | None = None, data: str | None = None,
                measure: str | None = None) -> str:
    doc: dict[str, Any] = {}
    if model is not None:
        doc["model"] = model
    if data is not None:
        doc["data"] = data
    if measure is not None:
        doc["measure"] = measure
    doc["passes"] = [c.to_dict() for c in configs]
    return yaml.safe_dump(doc, sort_keys=False)


def default_recipe_path() -> Path:
    return Path(__file__).parent / "recipes" / "default.yaml"
