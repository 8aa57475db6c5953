"""One loader for the three front doors: Python configs, YAML recipes and CLI `--pass` strings all
become a list of validated pass configs here, with every problem collected and reported at once.
No dotted-path instantiation: a pass name can only resolve through the registry."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from compress import registry
from compress.config import PassConfig
from compress.errors import ConfigError, UserError

RECIPE_KEYS = {"model", "data", "passes"}


def _pydantic_problems(where: str, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            out.append(f"{where}: '{loc}' is not a parameter of this pass (run `compress passes` to list them)")
        else:
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            out.append(f"{where}: {loc}: {err['msg']}{got}")
    return out


def collect(entries: list[Any]) -> tuple[list[PassConfig | None], list[str]]:
    """Dicts `{pass: name, **params}`, names or configs -> configs (None where invalid) + problems."""
    configs: list[PassConfig | None] = []
    problems: list[str] = []
    for i, entry in enumerate(entries):
        where = f"passes[{i}]"
        if isinstance(entry, PassConfig):
            configs.append(entry)
            continue
        if isinstance(entry, str):
            entry = {"pass": entry}
        configs.append(None)
        if not isinstance(entry, dict) or not isinstance(entry.get("pass"), str):
            problems.append(f"{where} must be a mapping with a 'pass' name, like {{pass: quant.int8}} (got {entry!r})")
            continue
        name = entry["pass"]
        params = {k: v for k, v in entry.items() if k != "pass"}
        bad_keys = [k for k in params if not isinstance(k, str)]
        if bad_keys:
            problems.append(f"{where} '{name}': parameter names must be text (got {bad_keys})")
            continue
        try:
            configs[-1] = registry.get(name).config(**params)
        except UserError as exc:
            problems.append(f"{where} {exc}")
        except ValidationError as exc:
            problems.extend(_pydantic_problems(f"{where} '{name}'", exc))
    return configs, problems


def parse_entries(entries: list[Any], source: str = "pipeline") -> list[PassConfig]:
    """Like `collect`, but raises one ConfigError listing every problem."""
    configs, problems = collect(entries)
    if problems:
        raise ConfigError(problems, source)
    return configs


def _split_top_level(text: str) -> list[str]:
    """Split `a=1,b=[x,y],c=2` on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{" 
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def parse_cli_pass(text: str) -> dict:
    """`quant.int8:mode=static,per_channel=true` -> {"pass": "quant.int8", "mode": "static", ...}."""
    name, _, rest = text.partition(":")
    entry: dict[str, Any] = {"pass": name.strip()}
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError([f"--pass {text!r}: expected key=value after ':', got {item!r}"], "command line")
        try:
            entry[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError([f"--pass {text!r}: cannot read the value of '{key.strip()}': {exc}"], "command line") from None
    return entry


def read_recipe(path: str | Path) -> dict:
    """A recipe file -> {"model": str|None, "data": str|None, "passes": [raw entries]}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not a valid UTF-8 YAML file: {exc}"], str(path)) from None
    if isinstance(doc, list):
        doc = {"passes": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("passes"), list):
        raise ConfigError(["expected a mapping with a 'passes' list (or a bare list of passes)"], str(path))
    unknown = sorted(set(doc) - RECIPE_KEYS)
    if unknown:
        raise ConfigError([f"unknown top-level key(s) {unknown}; allowed: {sorted(RECIPE_KEYS)}"], str(path))
    wrong = [k for k in ("model", "data") if doc.get(k) is not None and not isinstance(doc[k], str)]
    if wrong:
        raise ConfigError([f"'{k}' must be text: a path or a built-in name (got {doc[k]!r})" for k in wrong], str(path))
    return {"model": doc.get("model"), "data": doc.get("data"), "passes": doc["passes"]}


def dump_recipe(configs: list[PassConfig], model: str | None = None, data: str | None = None) -> str:
    doc: dict[str, Any] = {}
    if model is not None:
        doc["model"] = model
    if data is not None:
        doc["data"] = data
    doc["passes"] = [c.to_dict() for c in configs]
    return yaml.safe_dump(doc, sort_keys=False)


def default_recipe_path() -> Path:
    return Path(__file__).parent / "recipes" / "default.yaml"
