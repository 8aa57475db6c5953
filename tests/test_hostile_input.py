"""Hostile and bad input (issue 13): every case gives exit code 2 and one message naming the
problem and the fix, never a traceback, lists every problem at once, and writes nothing.
Recipes are checked with `compress validate` (no outputs needed); data files with `compress run`."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress import recipe
from compress.cli import app
from compress.errors import ConfigError, short

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    out = result.output
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, " ".join(out.split())  # the console wraps long lines: compare words, not layout


def _recipe(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _billion_laughs() -> str:
    """323 bytes; each level holds 9 references to the one before: 9**9 strings once expanded."""
    lines, prev = ["passes:", "  - &a [x,x,x,x,x,x,x,x,x]"], "a"
    for name in "bcdefghi":
        lines.append(f"  - &{name} [{','.join(['*' + prev] * 9)}]")
        prev = name
    return "\n".join(lines) + "\n"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))


def test_validate_refuses_aliases_in_bounded_time_and_memory_when_recipe_is_billion_laughs(tmp_path):
    path = _recipe(tmp_path, _billion_laughs())

    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "compress.cli", "validate", path], cwd=REPO, capture_output=True,
                          text=True, timeout=60, preexec_fn=_limit_memory, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "YAML anchors and aliases (&a) are not allowed in recipes" in done.stderr
    assert "write the values out" in done.stderr
    assert time.monotonic() - t0 < 60


def test_short_is_bounded_when_value_is_deeply_shared():
    value: list = ["x"] * 9
    for _ in range(9):
        value = [value] * 9  # repr() of this would be gigabytes

    t0 = time.perf_counter()
    text = short(value, 80)

    assert time.perf_counter() - t0 < 0.5
    assert len(text) <= 80 and text.endswith("...")
    assert short(10**5000).startswith("<int of about 5000 digits")


def test_validate_refuses_recipe_when_file_is_over_1_mb(tmp_path):
    path = _recipe(tmp_path, "passes:\n  - pass: export.onnx\n" + "# padding\n" * 120_000)

    code, out = _run("validate", path)

    assert code == 2 and "the file is over 1 MB" in out and "is this the right file?" in out


@pytest.mark.parametrize("text", ["", "# only a comment\n", "passes: []\n", "passes:\n", "model: minilm\n"])
def test_validate_reports_no_passes_when_recipe_has_none(text, tmp_path):
    code, out = _run("validate", _recipe(tmp_path, text))

    assert code == 2
    assert "1 problem in" in out
    assert "no passes: give at least one --pass, or a recipe with a 'passes' list; `compress passes` lists them" in out


def test_pipeline_reports_no_passes_when_pass_list_is_empty():
    from compress import Pipeline

    with pytest.raises(ConfigError, match="no passes"):
        Pipeline([])
    with pytest.raises(ConfigError, match="no passes"):
        Pipeline([], defer_errors=True).validate()


def test_default_recipe_stays_valid_when_no_pass_is_given():
    configs = recipe.parse_entries(recipe.read_recipe(recipe.default_recipe_path())["passes"])

    assert [c.pass_name for c in configs] == ["export.onnx", "optimize.ort", "quant.int8", "profile"]


def test_validate_lists_key_typo_with_pass_problems_when_recipe_has_unknown_key(tmp_path):
    path = _recipe(tmp_path, "modle: minilm\npasses:\n  - pass: quant.int9\n  - {pass: quant.int4, block_size: 8}\n")

    code, out = _run("validate", path)

    assert code == 2 and "3 problems in" in out
    assert "unknown top-level key 'modle': did you mean 'model'?" in out
    assert "passes[0] unknown pass 'quant.int9': did you mean 'quant.int8'?" in out
    assert "passes[1] 'quant.int4': block_size: Input should be greater than or equal to 16 (got 8)" in out


def test_validate_suggests_passes_when_key_is_misspelt_pases(tmp_path):
    code, out = _run("validate", _recipe(tmp_path, "pases:\n  - pass: export.onnx\n"))

    assert code == 2 and "1 problem in" in out
    assert "unknown top-level key 'pases': did you mean 'passes'?" in out


def test_validate_shortens_echoed_value_when_value_is_huge(tmp_path):
    path = _recipe(tmp_path, f"passes:\n  - pass: export.onnx\n  - {{pass: quant.int8, mode: {'q' * 100_000}}}\n")

    code, out = _run("validate", path)

    assert code == 2 and "mode: Input should be 'dynamic' or 'static'" in out
    assert len(out) < 1000 and "..." in out


@pytest.mark.parametrize("text, expected", [
    ("passes: " + "[" * 5000, "the YAML is nested too deeply"),
    (f"passes:\n  - {{pass: export.onnx, opset: {'9' * 5000}}}\n", "a number has more than 4300 digits"),
    ("passes:\n  - !!python/object/apply:os.system [echo hi]\n", "not valid YAML: could not determine a constructor"),
    (b"passes:\n  - pass: export.onnx\x00\x01\x02\n", "not a YAML text file: it holds NUL bytes"),
    ("passes:\n  - pass: export.onnx # caf\xe9\n".encode("latin-1"), "not UTF-8 text: byte 0xe9 at offset 35 (line 2)"),
    ("passes: quant.int8\n", "'passes' must be a list, one '- pass: NAME' line per pass (got 'quant.int8')"),
    ("just some words\n", "expected a mapping with a 'passes' list (or a bare list of passes), got 'just some words'"),
    ("{1: 2, passes: [export.onnx]}\n", "unknown top-level key 1: allowed: data, measure, model, passes"),
])
def test_validate_names_the_problem_when_recipe_is_hostile(text, expected, tmp_path):
    code, out = _run("validate", _recipe(tmp_path, text))

    assert code == 2 and expected in out


@pytest.mark.parametrize("passes, expected", [
    (["export.onnx", "quant.int8", "quant.int8"],
     "passes[2] 'quant.int8': quant.int8 runs twice (also passes[1])"),
    (["export.onnx", {"pass": "quant.int8", "mode": "static"}, "profile", "quant.int8"],
     "passes[3] 'quant.int8': quant.int8 runs twice (also passes[1])"),
    (["export.onnx", "quant.int8", "quant.int4"],
     "passes[2] 'quant.int4': the MatMul weights are int8 after passes[1] (quant.int8), so quant.int4 finds no float "
     "weight to quantize and fails: put quant.int4 before quant.int8"),
    (["export.onnx", "quant.int8", "quant.riq"],
     "passes[2] 'quant.riq': the weights are int8 after passes[1] (quant.int8)"),
    (["export.onnx", "quant.riq", {"pass": "export.riq", "weights": "int8"}, "quant.int4"],
     "passes[3] 'quant.int4': the MatMul weights are int8 after passes[2] (export.riq weights=int8)"),
    ([{"pass": "quant.weight_only", "method": "rtn"}, {"pass": "quant.weight_only", "method": "rtn"}],
     "passes[1] 'quant.weight_only': quant.weight_only runs twice (also passes[0])"),
    ([{"pass": "quant.weight_only", "method": "rtn"}, "export.onnx", "quant.int4", "quant.int4"],
     "passes[3] 'quant.int4': quant.int4 runs twice after quant.weight_only (also passes[2])"),
])
def test_validate_refuses_order_that_fails_at_run_time_when_passes_repeat_a_quantization(passes, expected, tmp_path):
    path = _recipe(tmp_path, yaml.safe_dump({"passes": passes}))

    code, out = _run("validate", path)

    assert code == 2 and expected in out


@pytest.mark.parametrize("passes", ["[export.onnx, quant.int4, quant.int8]", "[export.onnx, quant.riq, quant.int8]",
                                    "[export.onnx, quant.int4, quant.int4]"])
def test_validate_accepts_quantizations_when_the_order_works_at_run_time(passes, tmp_path):
    path = _recipe(tmp_path, f"passes: {passes}\n")

    code, out = _run("validate", path)

    assert code == 0, out


def test_run_lists_every_bad_pass_when_several_pass_options_are_bad(tmp_path):
    code, out = _run("run", "--pass", "quant.int8:mode", "--pass", "x:=1", "--pass", "quant.int9",
                     "--pass", "quant.int8:exclude=[a", "--pass", "quant.int8:exclude=&a [x]", "-o", str(tmp_path / "o"))

    assert code == 2 and "5 problems in command line" in out
    assert "passes[0] --pass 'quant.int8:mode': expected key=value after ':', got 'mode'" in out
    assert "passes[1] --pass 'x:=1': expected key=value after ':', got '=1'" in out
    assert "passes[2] unknown pass 'quant.int9': did you mean 'quant.int8'?" in out
    assert "passes[3] --pass 'quant.int8:exclude=[a': cannot read the value of 'exclude': not valid YAML" in out
    assert "passes[4] --pass 'quant.int8:exclude=&a [x]': cannot read the value of 'exclude': line 1: YAML anchors" in out
    assert list(tmp_path.iterdir()) == []


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00\x90\x91h6"


@pytest.mark.parametrize("name, content, expected", [
    ("random.txt", os.urandom(4096) + b"\x00", "is not text: NUL byte at offset"),
    ("photo.png", PNG, "is not text: NUL byte at offset 8"),
    ("model.safetensors", None, "is not text: NUL byte at offset"),
    ("latin1.txt", "first line\nsecond caf\xe9 line\n".encode("latin-1"),
     "latin1.txt:2: not UTF-8 text (byte 0xe9 at offset 21): convert the file to UTF-8, "
     "e.g. from Latin-1: `iconv -f latin1 -t utf-8"),
    ("windows.txt", "one\ntwo\n".encode("utf-16"), "is UTF-16 text: convert it to UTF-8, e.g. `iconv -f utf-16 -t utf-8"),
    ("rows.jsonl", b'{"text": "fine"}\n{"text": ["a", "list"]}\n', "rows.jsonl:2: 'text' is a list, expected a string"),
    ("rows.jsonl", b'{"text": 3}\n', "rows.jsonl:1: 'text' is a number, expected a string"),
    ("rows.jsonl", b'{"text": "a"}\n\n{"text": null}\n', "rows.jsonl:3: 'text' is null, expected a string"),
    ("rows.jsonl", b'{"text": {"nested": "x"}}\n', "rows.jsonl:1: 'text' is an object, expected a string"),
])
def test_run_refuses_data_when_file_is_not_utf8_text(name, content, expected, tiny_bert, tmp_path):
    data = tmp_path / name
    data.write_bytes((tiny_bert / "model.safetensors").read_bytes() if content is None else content)

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "--data", str(data), "-o", str(tmp_path / "o"))

    assert code == 2 and expected in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_run_refuses_data_when_file_is_over_the_size_limit(tiny_bert, text_file, tmp_path, monkeypatch):
    from compress import data

    monkeypatch.setattr(data, "MAX_DATA_BYTES", 1024)

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "--data", str(text_file), "-o", str(tmp_path / "o"))

    assert code == 2 and "over the 1 KiB limit (all samples are held in memory): take a sample of it" in out
    assert list(tmp_path.iterdir()) == []


# ---- paths the system refuses, keys given twice, files that are not files, the Python API (review) ----

LONG = "y" * 300  # one path part over 255 bytes: os.stat raises "File name too long"


def _long_path_commands(tiny_bert: Path, text_file: Path, tmp_path: Path) -> dict[str, list[str]]:
    import numpy as np

    from compress.exporters import riq_format

    riq = tmp_path / "model.riq"
    riq_format.write(riq, [riq_format.RawTensor("w", np.zeros(3, np.float32))], {"kind": b"state_dict"})
    good = _recipe(tmp_path, "passes: [export.onnx]\n")
    (tmp_path / "long_model.yaml").write_text(f"model: {LONG}\npasses: [export.onnx]\n")
    out, run = str(tmp_path / "out"), ["run", str(tiny_bert), "--pass", "export.onnx", "--data", str(text_file)]
    return {
        "run model": ["run", LONG, "--pass", "export.onnx", "-o", out],
        "run --data": ["run", str(tiny_bert), "--pass", "export.onnx", "--data", LONG, "-o", out],
        "run --tokenizer": [*run, "--tokenizer", LONG, "-o", out],
        "run --recipe": ["run", "--recipe", LONG + ".yaml", "-o", out],
        "run -o": [*run, "-o", str(tmp_path / LONG)],
        "validate file": ["validate", LONG + ".yaml"],
        "validate --model": ["validate", good, "--model", LONG],
        "recipe's model": ["validate", str(tmp_path / "long_model.yaml")],
        "decode input": ["decode", LONG + ".riq", "-o", out],
        "decode -o": ["decode", str(riq), "-o", str(tmp_path / LONG)],
        "profile": ["profile", LONG + ".onnx"],
        "generate": ["generate", LONG + ".onnx", "hello"],
    }


@pytest.mark.parametrize("case", ["run model", "run --data", "run --tokenizer", "run --recipe", "run -o", "validate file",
                                  "validate --model", "recipe's model", "decode input", "decode -o", "profile", "generate"])
def test_every_path_argument_exits_2_with_one_short_line_when_a_part_is_over_255_bytes(case, tiny_bert, text_file,
                                                                                         tmp_path):
    args = _long_path_commands(tiny_bert, text_file, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())

    code, out = _run(*args)

    assert code == 2 and "': File name too long" in out, out
    assert "error: cannot use '" in out and "..." in out and len(out) < 400  # the path is shortened
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("text, expected", [
    ("model: minilm\nmodel: other\npasses: [export.onnx]\n", "line 2: the key 'model' is given twice (first on line 1): keep one"),
    ("passes:\n  - pass: export.onnx\n    opset: 17\n    opset: 18\n", "line 4: the key 'opset' is given twice (first on line 3)"),
    ("passes:\n  - {pass: quant.int8, pass: quant.int4}\n", "line 2: the key 'pass' is given twice (first on line 2)"),
    ("passes: [export.onnx]\ndata: wiki\n\ndata: lee\n", "line 4: the key 'data' is given twice (first on line 2)"),
])
def test_validate_refuses_a_key_given_twice_at_any_level_of_a_recipe(text, expected, tmp_path):
    code, out = _run("validate", _recipe(tmp_path, text))

    assert code == 2 and "1 problem in" in out and expected in out


def test_run_refuses_a_key_given_twice_in_a_pass_value(tmp_path):
    code, out = _run("run", "--pass", "quant.int8:exclude={a: 1, a: 2}", "-o", str(tmp_path / "o"))

    assert code == 2 and "cannot read the value of 'exclude': line 1: the key 'a' is given twice" in out
    assert list(tmp_path.iterdir()) == []


def test_validate_refuses_a_recipe_that_is_a_pipe_without_reading_it(tmp_path):
    os.mkfifo(tmp_path / "recipe.yaml")  # reading it would wait for a writer forever

    code, out = _run("validate", str(tmp_path / "recipe.yaml"))

    assert code == 2 and "is not a regular file (a pipe, a device or a socket): give a YAML file" in out


@pytest.mark.parametrize("model, data, message", [
    (12345, None, "a model must be a path (str or Path), a built-in alias (efficientnet-lite0, minilm, smollm2) or, "
                  "in Python, a torch.nn.Module; got int"),
    (None, 5, "data must be a file path (str or Path) or one of ['lee', 'mix', 'wide', 'wiki']; got int"),
])
def test_pipeline_names_the_type_when_model_or_data_is_not_a_path(model, data, message, tiny_bert, tmp_path):
    from compress import Pipeline, UserError

    with pytest.raises(UserError) as caught:
        Pipeline(["export.onnx"]).run(model if model is not None else str(tiny_bert), data, tmp_path / "out", tasks=False)

    assert message in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("max_length", [-5, 0, 7, 8193, 10**9, 16.0, True, "64"])
def test_pipeline_refuses_max_length_the_cli_would_refuse_before_writing_anything(max_length, tmp_path):
    from compress import Pipeline, UserError

    with pytest.raises(UserError, match="max_length must be a whole number of tokens from 8 to 8192"):
        Pipeline(["export.onnx"]).run("no-such-model", None, tmp_path / "out", max_length=max_length)

    assert list(tmp_path.iterdir()) == []  # no .out.partial
