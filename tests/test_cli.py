"""The CLI: every kind of bad input gives one clear message and exit code 2, no traceback, and
nothing is written or changed; the verbs work."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()


def _run(*args: str):
    result = runner.invoke(app, list(args))
    out = result.output
    assert "Traceback" not in out, out
    return result.exit_code, out


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def tiny_onnx(tiny_bert, text_file, tmp_path_factory):
    from rich.console import Console

    from compress import Pipeline

    out = tmp_path_factory.mktemp("onnx") / "out"
    Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), out, tasks=False, max_length=32, console=Console(quiet=True))
    return out / "model.onnx"


def test_cli_unknown_pass_suggests_a_name(tmp_path):
    code, out = _run("run", "--pass", "quant.int9", "-o", str(tmp_path / "o"))

    assert code == 2
    assert "unknown pass 'quant.int9'" in out and "did you mean 'quant.int8'" in out
    assert _tree(tmp_path) == []


def test_cli_out_of_range_parameter(tmp_path):
    code, out = _run("run", "--pass", "export.onnx", "--pass", "quant.int4:block_size=8", "-o", str(tmp_path / "o"))

    assert code == 2
    assert "block_size" in out and "greater than or equal to 16 (got 8)" in out
    assert _tree(tmp_path) == []


def test_cli_torch_pass_after_export(tiny_bert, tmp_path):
    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "--pass", "export.onnx", "-o", str(tmp_path / "o"))

    assert code == 2
    assert "passes[1] 'export.onnx' takes the torch form but gets the onnx form" in out
    assert _tree(tmp_path) == []


def test_cli_missing_model_path(tmp_path):
    code, out = _run("run", str(tmp_path / "nope"), "--pass", "export.onnx", "-o", str(tmp_path / "o"))

    assert code == 2
    assert "model not found" in out and "nope" in out
    assert _tree(tmp_path) == []


def test_cli_truncated_onnx(tiny_onnx, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(tiny_onnx.read_bytes()[:5000])

    code, out = _run("run", str(bad), "--pass", "quant.int8", "-o", str(tmp_path / "o"))

    assert code == 2
    assert "not a valid ONNX model (truncated or corrupt?)" in out
    assert _tree(tmp_path) == ["bad.onnx"]


def test_cli_non_model_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8\xff")

    code, out = _run("run", str(folder), "--pass", "export.onnx", "-o", str(tmp_path / "o"))

    assert code == 2
    assert "is not a model folder: it has no config.json" in out
    assert _tree(tmp_path) == ["photos", "photos/cat.jpg"]


def test_cli_existing_outdir(tiny_bert, tmp_path):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep")

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "-o", str(out_dir))

    assert code == 2
    assert "already exists" in out and "--overwrite" in out
    assert _tree(tmp_path) == ["o", "o/mine.txt"]


def test_cli_corrupt_weights(tiny_bert, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")

    code, out = _run("run", str(broken), "--pass", "export.onnx", "-o", str(tmp_path / "o"))

    assert code == 2
    assert "cannot load the model" in out
    assert not (tmp_path / "o").exists()


def test_cli_run_with_passes_writes_outputs(tiny_bert, text_file, tmp_path):
    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "--pass", "quant.int8:per_channel=false",
                     "--data", str(text_file), "--no-tasks", "--max-length", "32", "-o", str(tmp_path / "o"))

    assert code == 0, out
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["stages"][2]["config"] == {"pass": "quant.int8", **rep["stages"][2]["config"], "per_channel": False}


def test_cli_passes_lists_every_pass_with_parameters():
    from compress import registry

    code, out = _run("passes", "--json")

    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == registry.names()
    int4 = next(r for r in rows if r["name"] == "quant.int4")
    assert {"name": "block_size", "default": 32}.items() <= next(p for p in int4["params"] if p["name"] == "block_size").items()


def test_cli_validate_accepts_good_and_rejects_bad_recipe(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("passes:\n  - pass: export.onnx\n  - pass: quant.int8\n")
    bad.write_text("passes:\n  - pass: quant.int8\n  - pass: export.onxx\n")

    assert _run("validate", str(good))[0] == 0
    code, out = _run("validate", str(bad))
    assert code == 2 and "did you mean 'export.onnx'" in out and "add export.onnx before it" in out


def test_cli_profile_prints_latency_and_top_ops(tiny_onnx):
    code, out = _run("profile", str(tiny_onnx), "--seq", "16", "--runs", "5", "--warmup", "1", "--json")

    assert code == 0, out
    result = json.loads(out)
    assert result["latency_ms"]["p50"] > 0 and result["top_ops"]
    assert result["inputs"].startswith("real text")


def test_cli_onnx_without_tokenizer_asks_for_one(tiny_onnx, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny_onnx, lone / "model.onnx")

    code, out = _run("run", str(lone / "model.onnx"), "--pass", "quant.int8", "-o", str(tmp_path / "o"))

    assert code == 2
    assert "no tokenizer beside" in out and "--tokenizer" in out
    assert _tree(tmp_path) == ["lone", "lone/model.onnx"]


def test_cli_onnx_with_tokenizer_option_runs(tiny_onnx, tiny_bert, text_file, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny_onnx, lone / "model.onnx")

    code, out = _run("run", str(lone / "model.onnx"), "--tokenizer", str(tiny_bert), "--data", str(text_file),
                     "--pass", "quant.int8", "--no-tasks", "-o", str(tmp_path / "o"))

    assert code == 0, out
    assert (tmp_path / "o" / "tokenizer.json").is_file()


def test_cli_model_folder_without_tokenizer_asks_for_one(tiny_bert, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert / name, bare / name)

    code, out = _run("run", str(bare), "--pass", "export.onnx", "-o", str(tmp_path / "o"))

    assert code == 2 and "no tokenizer beside" in out
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_cli_refuses_outdir_that_holds_the_input(tiny_onnx, tmp_path):
    code, out = _run("run", str(tiny_onnx), "--pass", "quant.int8", "-o", str(tiny_onnx.parent), "--overwrite")

    assert code == 2 and "holds the input" in out
    assert tiny_onnx.is_file()


def test_cli_refuses_current_directory_as_outdir(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "-o", ".", "--overwrite")

    assert code == 2 and "current directory" in out
    assert _tree(tmp_path) == []


def test_cli_bad_yaml_value_in_pass_option(tmp_path):
    code, out = _run("run", "--pass", "quant.int8:exclude=[a", "-o", str(tmp_path / "o"))

    assert code == 2 and "cannot read the value of 'exclude'" in out


def test_cli_recipe_with_wrong_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: 123\npasses:\n  - pass: export.onnx\n")
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text("passes:\n  - {pass: quant.int8, 1: 2}\n")

    assert "'model' must be text" in _run("validate", str(recipe))[1]
    code, out = _run("validate", str(bad_key))
    assert code == 2 and "parameter names must be text" in out


def test_cli_onnx_with_inputs_we_cannot_feed(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["input_ids", "foo"], ["logits"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4]),
         helper.make_tensor_value_info("foo", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 4])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    code, out = _run("run", str(path), "--pass", "quant.int8", "-o", str(tmp_path / "o"))

    assert code == 2 and "graph inputs this tool can't feed: ['foo']" in out


# ---- bounds of profile / generate, failed runs, OSErrors, Ctrl-C before a command runs (review) ----

def test_cli_profile_options_have_the_profile_pass_bounds():
    import typer.main

    from compress.passes.profile import Profile
    from compress.profiling import LIMITS

    command = typer.main.get_command(app).commands["profile"]
    maxima = {p.name: p.max for p in command.params if getattr(p, "max", None) is not None}

    assert maxima == {key: LIMITS[key] for key in maxima}
    assert set(maxima) == {"batch", "seq", "threads", "warmup", "runs", "prompt_tokens", "new_tokens"}
    assert all([m.le for m in Profile.model_fields[key].metadata if hasattr(m, "le")] == [LIMITS[key]] for key in maxima)


@pytest.mark.parametrize("args, message", [
    (["--seq", "1000000000"], "Invalid value for '--seq'"),
    (["--batch", "1000000000"], "Invalid value for '--batch'"),
    (["--threads", "100000"], "Invalid value for '--threads'"),
    (["--batch", "200", "--seq", "8000"], "batch x seq is 1,600,000 tokens, over the 1,048,576 one run may take"),
])
def test_cli_profile_refuses_sizes_that_exhaust_memory_before_reading_the_model(args, message, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")  # never read: the settings are refused first (or it is refused)

    code, out = _run("profile", str(tmp_path / "model.onnx"), *args)

    assert code == 2 and message in " ".join(out.split())


def test_latency_settings_and_profile_pass_refuse_what_the_cli_refuses():
    from pydantic import ValidationError

    from compress.errors import UserError
    from compress.passes.profile import Profile
    from compress.profiling import LatencySettings, thread_cap

    with pytest.raises(UserError, match="batch must be a whole number from 1 to 256"):
        LatencySettings(batch=10**9)
    with pytest.raises(UserError, match="batch x seq is 2,097,152 tokens"):
        LatencySettings(batch=256, seq=8192)
    with pytest.raises(ValidationError, match="batch x seq is 2,097,152 tokens"):
        Profile(batch=256, seq=8192)
    assert LatencySettings(threads=256).threads == min(256, thread_cap())  # more threads than cores only wait


def test_cli_profile_says_the_model_cannot_run_a_sequence_longer_than_its_positions(tiny_onnx):
    code, out = _run("profile", str(tiny_onnx), "--seq", "600", "--runs", "5", "--warmup", "0")
    text = " ".join(out.split())

    assert code == 2 and text.startswith("error: the model cannot run batch 1 x seq 600: ")
    assert text.endswith("; the model accepts at most 512 positions") and "[ONNXRuntimeError]" not in text


def test_cli_turns_an_os_error_outside_a_pass_into_one_line_and_keeps_exit_1_for_a_failed_pass(monkeypatch, tmp_path):
    import errno

    from compress.errors import PassFailed
    from compress.pipeline import Pipeline

    raised = [OSError(errno.ENAMETOOLONG, "File name too long", "n" * 1000), PassFailed(1, "quant.int8", OSError("disk"))]

    def run(self, *args, **kwargs):
        raise raised.pop(0)

    monkeypatch.setattr(Pipeline, "run", run)
    code, out = _run("run", "--pass", "export.onnx", "-o", str(tmp_path / "o"))
    assert code == 2 and " ".join(out.split()).startswith("error: cannot use 'nnnn") and "...nnn" in out
    assert out.strip().endswith("': File name too long") and len(out) < 400

    code, out = _run("run", "--pass", "export.onnx", "-o", str(tmp_path / "o"))
    assert code == 1 and "failed: pass 1 'quant.int8' failed: OSError: disk" in out


def test_cli_main_exits_130_without_traceback_when_interrupted_before_a_command_runs(monkeypatch, capsys):
    from compress import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as caught:
        cli.main()

    assert caught.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
