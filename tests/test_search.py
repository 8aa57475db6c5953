"""compress search: spaces and goals parsed, a small search on a tiny BERT end to end (front, plot,
recipe that `compress run` reproduces), an impossible constraint, resume after a kill, two worker
processes sharing one study."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress.errors import ConfigError, UserError
from compress.search_space import parse_constraint, parse_objective, parse_space

SPACE = [{"pass": "prune.structured", "optional": True, "importance": "activation", "layers": [0.0, 0.5],
          "heads": [0.25, 0.5], "ffn": [0.25, 0.5]},
         {"pass": "distill.kd", "when": "prune.structured", "steps": 3, "batch_size": 4, "max_length": 32},
         {"pass": "export.onnx"},
         {"pass": "quant.int8", "per_channel": [True, False]}]
FULL_PARAMS = 1_026_048  # the 4-layer tiny BERT below, as an ONNX graph (no pooler)


@pytest.fixture(scope="module")
def bert4(tmp_path_factory) -> Path:
    """A 4-layer tiny BERT (depth pruning has layers to remove)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from compress.models import alias_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, architectures=["BertModel"], hidden_size=32,
                     num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    folder = tmp_path_factory.mktemp("bert4")
    BertModel(cfg).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(alias_path("minilm"), local_files_only=True).save_pretrained(folder)
    return folder


def _fast():
    from rich.console import Console

    from compress.profiling import LatencySettings

    return dict(latency=LatencySettings(batch=1, seq=16, threads=1, warmup=1, runs=5), max_length=32,
                console=Console(quiet=True))


def test_constraints_and_objectives_parse_with_units():
    assert parse_constraint("latency<=0.5x").metric == "latency"
    c = parse_constraint("latency <= 4ms")
    assert (c.metric, c.value, c.unit) == ("latency_ms", 4.0, "ms")
    assert parse_constraint("size<=500KB").value == pytest.approx(0.5)
    assert parse_constraint("params<=10M").value == 10e6
    c = parse_constraint("cosine>=95%")
    assert (c.metric, c.op, c.value) == ("cosine", ">=", 0.95)
    assert c.met(0.96) and not c.met(0.94) and c.slack(0.94) > 0 >= c.slack(0.96)
    assert parse_objective("latency").direction == "minimize"
    assert parse_objective("max:unseen").direction == "maximize"
    assert parse_objective("perplexity").metric == "ppl"
    for bad, says in (("speed<=2", "unknown metric"), ("latency<=3GB", "ratio"), ("size~5", "METRIC<=VALUE"),
                      ("cosine>=0.9ms", "no unit")):
        with pytest.raises(ValueError, match=says):
            parse_constraint(bad)


def test_space_parses_choices_ranges_alternatives_and_reports_every_problem():
    space = parse_space([*SPACE[:3], {"choose": [{"pass": "quant.int8", "per_channel": [True, False]},
                                                 {"pass": "quant.int4", "block_size": {"low": 32, "high": 128, "step": 32}},
                                                 "none"]}])
    assert space.slots[0].options[0] is None and space.slots[0].options[1].name == "prune.structured"
    assert space.slots[1].when == "prune.structured"
    assert space.slots[3].labels() == ["quant.int8", "quant.int4", "none"]
    # every option and every extreme value appears in some variant the model is checked against
    variants = space.variants()
    tried = {(e["pass"], e.get("block_size"), e.get("per_channel")) for v in variants for e in v}
    assert {("quant.int4", 32, None), ("quant.int4", 128, None), ("quant.int8", None, False)} <= tried
    with pytest.raises(ConfigError) as err:
        parse_space([{"pass": "prune.structured", "heads": {"low": 0.5, "high": 0.1}},
                      {"pass": "quant.int8", "per_channel": []}, {"choose": "quant.int8"}, 42])
    text = str(err.value)
    for says in ("low <= high", "empty list", "space[2].choose", "space[3]"):
        assert says in text


def test_sampled_values_follow_the_space():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = parse_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = []
    for _ in range(12):
        trial = study.ask()
        entries = space.sample(trial)
        study.tell(trial, 0.0)
        seen.append(entries)
        names = [e["pass"] for e in entries]
        assert names[-2:] == ["export.onnx", "quant.int8"]
        assert ("distill.kd" in names) == ("prune.structured" in names)  # `when`
        for e in entries:
            if e["pass"] == "prune.structured":
                assert e["layers"] in (0.0, 0.5) and e["importance"] == "activation"
    assert any("prune.structured" in [e["pass"] for e in s] for s in seen)
    assert any("prune.structured" not in [e["pass"] for e in s] for s in seen)


def test_search_finds_a_feasible_model_and_its_recipe_reproduces_it(bert4, text_file, tmp_path):
    from compress.pipeline import Pipeline
    from compress.search import Search

    out = tmp_path / "search"
    result = Search(SPACE, ["cosine"], [f"params<={FULL_PARAMS - 10_000}"], trials=4, seed=0).run(
        str(bert4), str(text_file), out, **_fast())
    doc = json.loads((out / "search.json").read_text())
    assert len(doc["trials"]) == 4 and doc["chosen"] == result.chosen["number"]
    chosen = result.chosen
    assert chosen["feasible"] and chosen["stage"] == "trained" and chosen["metrics"]["params"] <= FULL_PARAMS - 10_000
    assert "prune.structured" in [e["pass"] for e in chosen["recipe"]]  # only pruned models fit
    for t in doc["trials"]:  # an unpruned model never fits: infeasible, and never trained
        if t["state"] != "failed" and "prune.structured" not in [e["pass"] for e in t["recipe"]]:
            assert t["state"] == "infeasible"
    assert all(0 < t["metrics"].get("latency", 1) < 10 for t in doc["trials"] if t["metrics"])
    text = (out / "search.md").read_text()
    assert "## Pareto front" in text and f"| **chosen** | {chosen['number']} |" in text
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("model.onnx", "report.json", "report.md", "recipe.yaml", "study.db"):
        assert (out / name).is_file(), name
    assert not (out / "stages").exists() and not (out / "trials").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["path"] == "model.onnx"
    # `compress run --recipe OUT/recipe.yaml` reproduces the chosen trial's model and measurements
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"] == str(bert4) and [p["pass"] for p in recipe["passes"]] == [e["pass"] for e in chosen["recipe"]]
    again = Pipeline.from_recipe(out / "recipe.yaml").run(outdir=tmp_path / "again", **{**_fast(), "tasks": False})
    final = again.report["stages"][-1]
    assert final["fidelity"]["cosine"] == pytest.approx(chosen["metrics"]["cosine"], abs=1e-6)
    assert final["params"] == chosen["metrics"]["params"]
    assert final["bytes"] / 1e6 == pytest.approx(chosen["metrics"]["size_mb"], abs=1e-6)


def test_an_impossible_constraint_names_the_closest_trial(bert4, text_file, tmp_path):
    from compress.search import Search

    with pytest.raises(UserError, match=r"no trial met every constraint in 3 trials; the closest is trial \d+ .*"
                                        r"misses params<=1000 \(got"):
        Search(SPACE, ["cosine"], ["params<=1000"], trials=3).run(str(bert4), str(text_file), tmp_path / "s", **_fast())
    doc = json.loads((tmp_path / "s" / "search.json").read_text())
    assert doc["chosen"] is None and "no trial met every constraint. closest: trial" in (tmp_path / "s" / "search.md").read_text().lower()


def test_bad_search_settings_are_refused_before_work(bert4, text_file, tmp_path):
    from compress.search import Search

    with pytest.raises(ConfigError) as err:
        Search([{"pass": "prune.structured", "heads": [0.5, 1.5]}, {"pass": "export.onnx"}], ["ppl", "speed"],
               ["size<5 parsecs"], trials=0, pruner="hyperband")
    text = str(err.value)
    for says in ("unknown metric 'speed'", "size<5 parsecs", "trials must be", "pruner must be"):
        assert says in text, says
    with pytest.raises(ConfigError) as err:  # valid YAML, but heads=1.5 is out of range for the pass
        Search([{"pass": "prune.structured", "heads": [0.5, 1.5]}, {"pass": "export.onnx"}], ["cosine"]).run(
            str(bert4), str(text_file), tmp_path / "s", **_fast())
    assert "heads" in str(err.value) and not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="causal LMs only"):
        Search(SPACE, ["ppl"]).run(str(bert4), str(text_file), tmp_path / "s", **_fast())


def test_cli_search_exit_code_and_message(bert4, text_file, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE[2:]))
    out = subprocess.run([sys.executable, "-m", "compress.cli", "search", str(bert4), "--data", str(text_file),
                          "--space", str(space), "-c", "size<=0.001MB", "-n", "2", "--max-length", "32", "-o",
                          str(tmp_path / "s")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    assert "no trial met every constraint" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "compress.cli", "search", str(bert4), "-c", "latency<=2parsecs",
                          "-o", str(tmp_path / "t")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "latency<=2parsecs" in out.stderr and "Traceback" not in out.stderr


WORKER = """
import sys
from rich.console import Console
from compress.profiling import LatencySettings
from compress.search import Search
space, model, data, out, trials = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
storage = sys.argv[6] if len(sys.argv) > 6 else None
import yaml
Search(yaml.safe_load(open(space)), ["cosine"], trials=trials, seed=int(sys.argv[7]) if len(sys.argv) > 7 else 0).run(
    model, data, out, resume="--resume" in sys.argv, storage=storage, study_name="shared" if storage else None,
    max_length=32, latency=LatencySettings(batch=1, seq=16, threads=1, warmup=1, runs=5), console=Console(quiet=True))
"""


def _finished(db: Path) -> int:
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from trials where state in ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_resume_after_a_kill_continues_the_same_study(bert4, text_file, tmp_path):
    from compress.search import Search

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "s"
    db = tmp_path / ".s.partial" / "study.db"
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(space), str(bert4), str(text_file), str(out), "50"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while _finished(db) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _finished(db)
    assert before >= 2, proc.stderr.read().decode()[-2000:]
    result = Search(SPACE, ["cosine"], trials=before + 2).run(str(bert4), str(text_file), out, resume=True, **_fast())
    numbers = [t["number"] for t in result.doc["trials"]]
    assert numbers == list(range(len(numbers)))  # the same study, continued
    finished = [t for t in result.doc["trials"] if t["state"] in ("complete", "infeasible", "pruned")]
    assert len(finished) == before + 2
    killed = [t for t in result.doc["trials"] if t["state"] == "failed"]  # a trial the kill cut short runs again
    assert len(killed) <= 1
    assert (out / "model.onnx").is_file() and not db.parent.exists()


def test_two_worker_processes_share_one_study(bert4, text_file, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(space), str(bert4), str(text_file),
                               str(tmp_path / f"w{i}"), "6", storage, str(i)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:  # on failure: the worker's stderr without its progress bars (they hid the error once)
        code = p.wait(timeout=900)
        assert code == 0, "\n".join(line for line in p.stderr.read().decode().replace("\r", "\n").splitlines()
                                     if "it/s]" not in line and "Loading weights" not in line)[-3000:]
    docs = [json.loads((tmp_path / f"w{i}" / "search.json").read_text()) for i in range(2)]
    assert _finished(tmp_path / "shared.db") >= 6
    for doc in docs:
        assert doc["study"]["name"] == "shared" and len(doc["trials"]) >= 6
    # each worker ran some of the trials: both wrote trial results into the one study
    assert docs[0]["trials"][0]["number"] == 0 and {t["number"] for t in docs[1]["trials"]} >= set(range(6))


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "search").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_recipes_are_valid(path):
    from compress.search import Search

    job = Search.from_recipe(path)
    assert job.space is not None and job.objectives and job.constraints
    if job.model == "minilm":  # the smollm2 alias needs an optional package (docs/data.md)
        space = job.validate()
        assert space is job.space


def test_a_training_pass_names_its_untrained_stand_in():
    from compress import registry
    from compress.passes import HomoDistil

    cfg = HomoDistil(heads=0.25, ffn=0.5, layers=0.5, steps=100)
    stand_in = registry.spec_for(cfg).proxy(cfg)
    assert stand_in.pass_name == "prune.structured"
    assert (stand_in.heads, stand_in.ffn, stand_in.layers, stand_in.importance) == (0.25, 0.5, 0.5, "activation")
    assert registry.get("distill.kd").proxy(None) is None  # recovery training: left out of the proxy
    assert registry.get("quant.int8").proxy is None  # cheap passes run as they are


def test_latency_through_the_users_profiler_command(bert4, text_file, tmp_path):
    from compress.search import Search

    probe = f"{sys.executable} {ROOT / 'examples' / 'search' / 'profiler.py'} --runs 5 --seq 16"
    result = Search(SPACE[2:], ["cosine"], ["latency<=3x"], trials=2, profiler=probe).run(
        str(bert4), str(text_file), tmp_path / "s", **_fast())
    assert "profiler command" in result.doc["latency"]["how"]
    for t in result.doc["trials"]:
        assert t["metrics"]["latency_ms"] > 0 and t["metrics"]["latency"] > 0
    with pytest.raises(UserError, match="must print milliseconds"):
        Search(SPACE[2:], ["cosine"], trials=1, profiler=f"{sys.executable} -c pass").run(
            str(bert4), str(text_file), tmp_path / "t", **_fast())


def test_a_storage_url_that_cannot_be_used_is_one_clear_error(bert4, text_file, tmp_path):
    from compress.search import Search

    with pytest.raises(UserError, match="cannot be used"):
        Search(SPACE[2:], ["cosine"], trials=1).run(str(bert4), str(text_file), tmp_path / "s",
                                                    storage="nosuchdb://host/x", **_fast())


def test_builtin_cnn_space_calibrates_static_int8_before_any_fusion():
    """optimize.ort's FusedConv can't be calibrated: static int8 must come straight after export.onnx."""
    from compress.search_space import builtin

    space = builtin("image-classifier", prunable=True)
    names = [slot.get("pass") if isinstance(slot, dict) else slot for slot in space]
    assert "optimize.ort" not in names
    choices = space[names.index("export.onnx") + 1]["choose"]
    assert {"pass": "quant.int8", "mode": "static", "per_channel": [True, False]} in choices and "none" in choices


def test_trials_that_differ_only_in_training_share_one_proxy_measurement():
    """One architecture, one latency: a trial whose proxy (the pass list with training removed) an earlier trial
    ran takes that trial's measurements, so timing noise can't pass one and fail the other."""
    from types import SimpleNamespace

    from rich.console import Console

    from compress.search_trials import Runner

    proxy = [{"pass": "prune.structured", "layers": 0.5}, {"pass": "export.onnx"}]
    earlier = SimpleNamespace(number=3, user_attrs={"proxy": {"recipe": proxy, "metrics": {"latency": 0.47}}})
    other = SimpleNamespace(number=4, user_attrs={"proxy": {"recipe": proxy[1:], "metrics": {"latency": 0.9}}})
    study = SimpleNamespace(get_trials=lambda deepcopy=False: [earlier, other])
    runner = SimpleNamespace(console=Console(quiet=True))
    now = SimpleNamespace(number=7, study=study)

    assert Runner._same_proxy(runner, now, proxy) == {"latency": 0.47}
    assert Runner._same_proxy(runner, now, [{"pass": "export.onnx"}, {"pass": "quant.int8"}]) is None
