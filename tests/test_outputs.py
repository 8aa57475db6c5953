"""Output directories never cost the user data: every command that writes goes through
`compress.outputs.claim`, which refuses an output that is, holds or sits inside an input, the
current directory or above, a file, or an existing folder compress did not write. Each data-loss
case found by hand (issue 13) is recreated here with a sentinel file that must survive."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compress import outputs
from compress.cli import app
from compress.errors import OutputExistsError, UserError
from compress.exporters import riq_format

runner = CliRunner()


def _run(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def _riq(path: Path) -> Path:
    """A small valid .riq holding a bare state dict (decodes to model.safetensors)."""
    riq_format.write(path, [riq_format.RawTensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))],
                     {"kind": b"state_dict"})
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_decode_refuses_current_directory_when_overwrite_is_given(tmp_path, monkeypatch):
    _riq(tmp_path / "model.riq")
    (tmp_path / "sentinel.txt").write_text("user data")
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)

    code, out = _run("decode", "model.riq", "-o", ".", "--overwrite")

    assert code == 2 and "current directory" in out
    assert _snapshot(tmp_path) == before


def test_decode_refuses_the_folder_that_holds_its_input_when_overwrite_is_given(tmp_path):
    run_dir = tmp_path / "run"
    outputs.mark(run_dir, "run")  # a real compress output: --overwrite alone would allow replacing it
    _riq(run_dir / "model.riq")
    (run_dir / "report.json").write_text("{}")
    before = _snapshot(tmp_path)

    code, out = _run("decode", str(run_dir / "model.riq"), "-o", str(run_dir), "--overwrite")

    assert code == 2 and "holds the input" in out
    assert _snapshot(tmp_path) == before


def test_decode_writes_a_marked_folder_and_replaces_only_its_own_output(tmp_path):
    riq = _riq(tmp_path / "model.riq")
    out = tmp_path / "decoded"

    assert _run("decode", str(riq), "-o", str(out))[0] == 0
    assert outputs.is_ours(out) and (out / "model.safetensors").is_file()
    assert _run("decode", str(riq), "-o", str(out), "--overwrite")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoded", "model.riq"]  # no temp or .old left


def test_run_refuses_an_input_inside_the_partial_folder_it_would_clear(tiny_bert, tmp_path):
    partial = outputs.work_dir(tmp_path / "out")
    outputs.mark(partial, "run")  # an interrupted earlier run
    model = partial / "stages" / "01-prune.structured" / "model"
    shutil.copytree(tiny_bert, model)
    before = _snapshot(tmp_path)

    for extra in ([], ["--resume"]):
        code, out = _run("run", str(model), "--pass", "export.onnx", "-o", str(tmp_path / "out"), *extra)

        assert code == 2 and "unfinished run folder" in out, out
        assert _snapshot(tmp_path) == before


def test_run_refuses_an_output_that_holds_the_tokenizer_when_overwrite_is_given(tiny_bert, text_file, tmp_path, fast):
    from compress import Pipeline

    first = tmp_path / "first"
    Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), first, **fast)  # model.onnx + tokenizer files
    onnx_copy = tmp_path / "elsewhere" / "model.onnx"
    onnx_copy.parent.mkdir()
    shutil.copy(first / "model.onnx", onnx_copy)
    before = _snapshot(tmp_path)

    code, out = _run("run", str(onnx_copy), "--tokenizer", str(first), "--pass", "quant.int8", "-o", str(first),
                     "--overwrite")

    assert code == 2 and "holds the input" in out and str(first) in out
    assert _snapshot(tmp_path) == before


def test_run_overwrite_refuses_a_folder_compress_did_not_write(tiny_bert, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8\xff")
    before = _snapshot(tmp_path)

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "-o", str(mine), "--overwrite")

    assert code == 2 and "not written by compress" in out
    assert _snapshot(tmp_path) == before


def test_run_output_under_a_file_is_refused_with_a_message(tiny_bert, tmp_path):
    (tmp_path / "notes.txt").write_text("user data")

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "-o", str(tmp_path / "notes.txt" / "out"))

    assert code == 2 and "is a file, not a folder" in out
    assert _snapshot(tmp_path) == {"notes.txt": b"user data"}


def test_run_overwrite_of_an_existing_file_leaves_it_and_nothing_else(tiny_bert, tmp_path):
    (tmp_path / "notes.txt").write_text("user data")

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "-o", str(tmp_path / "notes.txt"), "--overwrite")

    assert code == 2 and "not a folder compress wrote" in out
    assert _snapshot(tmp_path) == {"notes.txt": b"user data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no .notes.txt.old-* left behind


def test_run_refuses_a_parent_of_the_current_directory(tiny_bert, tmp_path, monkeypatch):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    (tmp_path / "sentinel.txt").write_text("user data")
    monkeypatch.chdir(inner)

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "-o", "../..", "--overwrite")

    assert code == 2 and "current directory or above it" in out
    assert (tmp_path / "sentinel.txt").read_text() == "user data"


def test_run_refuses_a_stale_partial_folder_it_did_not_write(tiny_bert, tmp_path):
    stale = outputs.work_dir(tmp_path / "out")
    stale.mkdir()
    (stale / "thesis.tex").write_text("user data")

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "-o", str(tmp_path / "out"))

    assert code == 2 and "not written by compress" in out
    assert (stale / "thesis.tex").read_text() == "user data"


def test_run_interrupted_exits_130_and_says_resume_continues(tiny_bert, text_file, tmp_path):
    args = ["run", str(tiny_bert), "--data", str(text_file), "--no-tasks", "--max-length", "32",
            "--pass", "prune.homodistil:steps=5000,batch_size=4,max_length=32,checkpoint_every=5", "-o", str(tmp_path / "o")]
    stage = tmp_path / ".o.partial" / "stages" / "01-prune.homodistil" / "key.txt"
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 120
    while not stage.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # inside the training loop
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=60)

    assert proc.returncode == 130, text
    assert "interrupted" in text and "--resume" in text and "Traceback" not in text
    assert not (tmp_path / "o").exists() and stage.exists()


# ---- property: no output the checks accept can touch an input ---------------------------------------

NAMES = st.sampled_from(["a", "b", "in", "out", ".", ".."])


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.lists(NAMES, min_size=1, max_size=3), out=st.lists(NAMES, min_size=1, max_size=4),
       overwrite=st.booleans())
def test_claim_never_accepts_an_output_that_overlaps_an_input_or_the_cwd(tmp_path, model, out, overwrite):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True, exist_ok=True)
    inp = root.joinpath(*model)
    inp.mkdir(parents=True, exist_ok=True)  # inputs exist (a missing one is refused before any output check)
    cwd = root / "a"
    old = os.getcwd()
    os.chdir(cwd)
    try:
        outdir = Path(*out)
        try:
            outputs.claim(outdir, [inp], overwrite, work=outputs.work_dir(outdir))
        except (UserError, OutputExistsError):
            return
        o, i = (cwd / outdir).resolve(), inp.resolve()
        assert not (o == i or o in i.parents or i in o.parents)
        assert o != cwd.resolve() and o not in cwd.resolve().parents
        assert not o.exists()  # nothing of ours exists in this tree, so any existing folder is refused
    finally:
        os.chdir(old)


def test_claim_refuses_every_input_kind(tmp_path):
    for kind in ("model", "tokenizer", "data", "recipe"):
        folder = tmp_path / kind
        outputs.mark(folder, "run")
        (folder / "file").write_text(kind)
        with pytest.raises(UserError, match="holds the input"):
            outputs.claim(folder, [folder / "file"], overwrite=True)
        with pytest.raises(UserError, match="inside the input"):
            outputs.claim(folder / "sub", [folder], overwrite=False)


# ---- `~`, names too long, places that cannot be written, the input named as -o (review F1, F2, F3, F11) ----

def test_decode_and_pipeline_write_under_the_home_folder_when_output_starts_with_tilde(tmp_path, monkeypatch,
                                                                                       tiny_bert, text_file, fast):
    from compress import Pipeline

    home, work = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    riq = _riq(tmp_path / "model.riq")

    code, out = _run("decode", str(riq), "--output=~/decoded")  # the shell leaves `~` after `=` as it is
    result = Pipeline(["export.onnx"]).run(str(tiny_bert), str(text_file), "~/run", **fast)

    assert code == 0 and str(home / "decoded") in " ".join(out.split())
    assert outputs.is_ours(home / "decoded") and (home / "decoded" / "model.safetensors").is_file()
    assert result.outdir == home / "run" and (home / "run" / "model.onnx").is_file()
    assert list(work.iterdir()) == []  # no literal ./~ folder


@pytest.mark.parametrize("command", ["run", "decode"])
def test_output_tilde_alone_is_the_home_folder_and_refused(tmp_path, monkeypatch, tiny_bert, command):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["decode", str(_riq(tmp_path / "model.riq"))] if command == "decode" else ["run", str(tiny_bert), "--pass", "export.onnx"]

    code, out = _run(*args, "-o", "~", "--overwrite")

    assert code == 2 and "is the root or home folder" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == (["home", "model.riq"] if command == "decode" else ["home"])
    assert list((tmp_path / "home").iterdir()) == []


def test_claim_names_a_path_the_system_refuses_when_a_part_is_over_255_bytes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(UserError, match=r"^cannot use 'aaaa.*\.\.\..*aaaa': File name too long$"):
        outputs.claim("a" * 300, [], overwrite=False)
    with pytest.raises(UserError, match="is 240 bytes long: at most 233 .compress builds it beside as .NAME.partial"):
        outputs.claim("b" * 240, [], overwrite=False)  # a name the system takes, but not with .partial added
    assert outputs.claim("c" * 233, [], overwrite=False) == Path("c" * 233)
    assert list(tmp_path.iterdir()) == []


def test_run_and_decode_exit_2_without_traceback_when_output_name_is_too_long(tiny_bert, tmp_path):
    riq = _riq(tmp_path / "model.riq")
    for args in (["run", str(tiny_bert), "--pass", "export.onnx"], ["decode", str(riq)]):
        code, out = _run(*args, "-o", str(tmp_path / ("x" * 300)))

        assert code == 2 and "File name too long" in out and len(out) < 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.riq"]


@pytest.mark.skipif(outputs._file_system(Path("/proc")) != "proc", reason="needs Linux's /proc")
def test_run_refuses_an_output_on_a_pseudo_file_system_before_the_model_is_read(tiny_bert, monkeypatch):
    from compress import loading

    def never(*args, **kwargs):
        raise AssertionError("the model was read before the output was checked")

    monkeypatch.setattr(loading, "describe", never)

    code, out = _run("run", str(tiny_bert), "--pass", "export.onnx", "-o", "/proc/compress-out")

    assert code == 2 and "'/proc' is on the proc pseudo file system" in out
    with pytest.raises(UserError, match="^cannot write '/proc/self/compress-out': .*; choose another -o$"):
        outputs.claim("/proc/self/compress-out", [], overwrite=False)


@pytest.mark.parametrize("what", ["model", "data", "recipe"])
def test_run_says_output_holds_the_input_when_output_is_an_input_folder_without_overwrite(tiny_bert, text_file, tmp_path,
                                                                                          monkeypatch, what):
    from compress import loading

    folder = tmp_path / "mine"
    model = folder if what == "model" else tiny_bert
    if what == "model":
        shutil.copytree(tiny_bert, folder)
    else:
        folder.mkdir()
    (folder / "news.txt").write_bytes(text_file.read_bytes())
    (folder / "recipe.yaml").write_text("passes: [export.onnx]\n")
    args = ["--recipe", str(folder / "recipe.yaml")] if what == "recipe" else ["--pass", "export.onnx"]
    data = str(folder / "news.txt") if what == "data" else str(text_file)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(loading, "describe", lambda *a, **k: pytest.fail("the first, fast check knows the inputs"))

    code, out = _run("run", str(model), *args, "--data", data, "-o", str(folder))

    assert code == 2 and "holds the input" in out and "--overwrite" not in out  # not "pass --overwrite"
    assert _snapshot(tmp_path) == before
