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
