"""README "Add a pass", followed literally: the pass module below is the README's code block (checked
verbatim), registered with `registry.register`, run in a Pipeline on tiny BERT; its report section is
in report.md, its notes in report.json, `compress passes --json` lists it while it is registered, and a
duplicate or a built-in name is refused. Every registration is undone, so other tests never see it."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress import Pipeline, registry
from compress.cli import app
from compress.errors import UserError

# --- README "### Add a pass" code block, verbatim (test_readme_shows_this_module checks) ---
import copy

import torch
from pydantic import Field

from compress.config import PassConfig
from compress.context import PassContext
from compress.registry import PassSpec
from compress.report import stage_label
from compress.state import ModelState


class ScaleNorms(PassConfig):
    pass_name = "mylab.scale_norms"
    factor: float = Field(1.0, gt=0, le=10, description="what every LayerNorm weight is multiplied by")


def run(state: ModelState, cfg: ScaleNorms, ctx: PassContext) -> ModelState:
    model = copy.deepcopy(state.model)  # the input model is also the teacher that fidelity is measured against
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.mul_(cfg.factor)
    ctx.notes["scale_norms"] = {"layernorms": len(norms), "factor": cfg.factor}
    return state.with_torch(model)


def report(stage: dict) -> list[str]:
    """report.md's section for this pass, from the notes in its stage's record."""
    notes = stage.get("scale_norms")
    if not notes:
        return []
    return [f"## Scaled norms: {stage_label(stage)}", "",
            f"- {notes['layernorms']} LayerNorm weights multiplied by {notes['factor']}", ""]


PASS = PassSpec(name="mylab.scale_norms", config=ScaleNorms, run=run, takes=("torch",), gives="torch",
                report=report, summary="Multiply every LayerNorm weight by a factor.")
# --- end of the README block ---

NAME = "mylab.scale_norms"
NORMS = 5  # tiny BERT: the embeddings' LayerNorm + 2 per layer x 2 layers


@contextmanager
def registered(spec: PassSpec | str):
    """register() for the duration of a block: a failing test still leaves the registry as it found it."""
    spec = registry.register(spec)
    try:
        yield spec
    finally:
        registry.unregister(spec.name)


@pytest.fixture
def scale_norms():
    with registered(PASS) as spec:
        yield spec


@pytest.fixture
def ran(scale_norms, tiny_bert, text_file, tmp_path, fast):
    out = tmp_path / "out"
    result = Pipeline([{"pass": NAME, "factor": 0.5}]).run(str(tiny_bert), str(text_file), out, **fast)
    return result, out


def test_readme_shows_this_module():
    own = Path(__file__).read_text(encoding="utf-8")
    block = own.split("verbatim (test_readme_shows_this_module checks) ---\n")[1].split("# --- end of the README block")[0]
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")

    assert "### Add a pass" in readme
    assert f"```python\n{block}```" in readme


def test_registered_pass_runs_and_really_scales_the_norms(ran, tiny_bert):
    from transformers import AutoModel

    result, _ = ran
    before = AutoModel.from_pretrained(tiny_bert).embeddings.LayerNorm.weight
    after = result.state.model.embeddings.LayerNorm.weight

    assert [s["name"] for s in result.report["stages"]] == ["input", NAME]
    assert torch.allclose(after, before * 0.5)


def test_its_section_is_in_report_md_and_its_notes_in_report_json(ran):
    _, out = ran
    md = (out / "report.md").read_text(encoding="utf-8")
    stage = json.loads((out / "report.json").read_text(encoding="utf-8"))["stages"][1]

    assert f"## Scaled norms: stage 1 {NAME}\n\n- {NORMS} LayerNorm weights multiplied by 0.5\n" in md
    assert stage["scale_norms"] == {"layernorms": NORMS, "factor": 0.5}
    assert stage["config"] == {"pass": NAME, "factor": 0.5}


def test_compress_passes_lists_it_only_while_registered():
    def listed() -> dict:
        result = CliRunner().invoke(app, ["passes", "--json"])
        assert result.exit_code == 0, result.output
        return {row["name"]: row for row in json.loads(result.output)}

    with registered(PASS):
        row = listed()[NAME]
        assert row["summary"] == PASS.summary and row["takes"] == ["torch"]
        assert row["params"] == [{"name": "factor", "default": 1.0, "description": "what every LayerNorm weight is "
                                  "multiplied by", "range": "> 0, <= 10"}]
    assert NAME not in listed() and NAME not in registry.names()


def test_a_taken_name_is_refused_and_builtins_stay(scale_norms):
    with pytest.raises(UserError, match=f"a pass named '{NAME}' is already registered"):
        registry.register(PASS)

    class Int8Again(PassConfig):
        pass_name = "quant.int8"

    with pytest.raises(UserError, match="'quant.int8' is already registered .by compress.passes.quant_int8"):
        registry.register(PassSpec(name="quant.int8", config=Int8Again, run=run, takes=("onnx",), gives=None, summary="x"))
    with pytest.raises(UserError, match="one of compress's own passes"):
        registry.unregister("quant.int8")
    assert registry.get("quant.int8").config.__name__ == "QuantInt8"


def test_bad_registrations_name_the_fix():
    with pytest.raises(UserError, match="set pass_name = 'mylab.other'"):
        registry.register(PassSpec(name="mylab.other", config=ScaleNorms, run=run, takes=("torch",), gives=None, summary="x"))
    with pytest.raises(UserError, match="lowercase dotted words"):
        registry.register(PassSpec(name="My Pass:1", config=ScaleNorms, run=run, takes=("torch",), gives=None, summary="x"))
    with pytest.raises(TypeError, match="PassSpec or the name of a module"):
        registry.register(ScaleNorms)
    with pytest.raises(UserError, match="no pass named 'mylab.never' was registered"):
        registry.unregister("mylab.never")


def test_register_takes_a_module_name(tmp_path, monkeypatch):
    (tmp_path / "mylab_norms.py").write_text("from test_add_a_pass import PASS\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with registered("mylab_norms") as spec:
        assert spec is PASS and registry.get(NAME) is PASS
