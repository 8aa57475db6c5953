"""Every shipped recipe validates, and every example script runs (on a tiny model)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from compress import Pipeline
from compress.recipe import default_recipe_path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples").glob("*.yaml")) + [default_recipe_path()]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_against_its_model(path):
    pipe = Pipeline.from_recipe(path)

    info = pipe.validate()

    assert pipe.configs and info.kind == "encoder"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_example_script_runs_on_tiny_model(path, tiny_bert, text_file, tmp_path):
    report = _load(path).main(["--model", str(tiny_bert), "--data", str(text_file), "-o", str(tmp_path / "out"), "--fast"])

    assert report["stages"][-1]["fidelity"]["cosine"] > 0.9
    assert (tmp_path / "out" / "report.md").is_file()
