"""Every registered pass: default config builds, survives a YAML round trip, rejects unknown keys."""
from __future__ import annotations

import pytest

from compress import recipe, registry
from compress.errors import ConfigError, UserError

NAMES = registry.names()


@pytest.mark.parametrize("name", NAMES)
def test_registry_pass_config_roundtrips_through_yaml(name, tmp_path):
    spec = registry.get(name)
    cfg = spec.config()
    path = tmp_path / "r.yaml"
    path.write_text(recipe.dump_recipe([cfg]))

    loaded = recipe.parse_entries(recipe.read_recipe(path)["passes"])

    assert loaded == [cfg]
    assert spec.summary and spec.takes


@pytest.mark.parametrize("name", NAMES)
def test_registry_pass_config_rejects_unknown_key(name):
    with pytest.raises(ConfigError, match="'not_a_param' is not a parameter"):
        recipe.parse_entries([{"pass": name, "not_a_param": 1}])


@pytest.mark.parametrize("name", NAMES)
def test_registry_every_field_is_described(name):
    fields = registry.get(name).config.model_fields
    assert all(f.description for f in fields.values()), name


def test_registry_unknown_pass_suggests_closest_name():
    with pytest.raises(UserError, match="did you mean 'quant.int8'"):
        registry.get("quant.int9")


def test_recipe_collects_every_problem_at_once():
    entries = [{"pass": "quant.int9"}, {"pass": "export.onnx", "opset": 99}, {"pass": "quant.int4", "block_size": 48}]

    with pytest.raises(ConfigError) as err:
        recipe.parse_entries(entries)

    assert len(err.value.problems) == 3
    assert "less than or equal to 21 (got 99)" in str(err.value)
    assert "power of two" in str(err.value)


def test_recipe_cli_string_parses_typed_values():
    entry = recipe.parse_cli_pass("quant.int8:mode=static,per_channel=false,exclude=[re:^/enc,x],calibration_samples=8")

    assert entry == {"pass": "quant.int8", "mode": "static", "per_channel": False,
                     "exclude": ["re:^/enc", "x"], "calibration_samples": 8}


def test_front_doors_python_yaml_cli_build_the_same_pipeline(tmp_path):
    from compress import Pipeline
    from compress.exporters import ExportOnnx
    from compress.passes import QuantInt8

    python = Pipeline([ExportOnnx(opset=18), QuantInt8(mode="static")])
    (tmp_path / "r.yaml").write_text("passes:\n  - pass: export.onnx\n    opset: 18\n  - {pass: quant.int8, mode: static}\n")
    yaml_pipe = Pipeline.from_recipe(tmp_path / "r.yaml")
    cli = Pipeline([recipe.parse_cli_pass("export.onnx:opset=18"), recipe.parse_cli_pass("quant.int8:mode=static")])

    assert python.configs == yaml_pipe.configs == cli.configs


def test_config_is_frozen():
    from compress.passes import QuantInt8

    cfg = QuantInt8()
    with pytest.raises(Exception):
        cfg.mode = "static"
