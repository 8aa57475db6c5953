"""`compress search`: the best pipeline for a budget, found with Optuna and measured, not guessed.

Each Optuna trial draws a pass list from the space (compress/search_space.py) and runs it as a
pipeline. Trials share one stage folder keyed by (input, every config so far), so trials whose pass
lists share a prefix share its work, and an interrupted trial resumes its training checkpoint.

Cheap first: a trial with training passes (distill.kd, prune.homodistil: the passes whose spec
names a `proxy`) first runs its proxy, the same pipeline with the training removed or replaced by
its one-shot stand-in. The proxy leaves the final architecture and file format, so its latency,
size and parameters are the trial's: a trial that breaks such a constraint stops there, untrained.
The proxy's objective is reported to Optuna's pruner (successive halving by default), which lets
only the candidates that can still win spend their distillation steps.

Every finished model is measured the same way: fidelity on the full held-out set (and the unseen
domain, for encoders), the task metrics an objective or constraint names, size and parameters,
and latency timed interleaved with the reference model in the same process (the default recipe
export.onnx + optimize.ort + quant.int8 unless another is given), or through a profiler command
that takes an ONNX path and prints milliseconds (a script that runs it on a phone).

The study lives in SQLite inside the output folder (`--resume` continues it), or in any Optuna
storage URL (`--storage`), so several machines can add trials to one study. At the end the best
trial that meets every constraint is exported as `compress run` would (its recipe.yaml reproduces
it), beside search.json (every trial), search.md and search.png (the Pareto front).

This module is the front door (settings, checks, the loop over trials, the outputs); running and
measuring one trial is compress/search_trials.py."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from compress import loading, outputs, recipe, search_report, stages
from compress.errors import ConfigError, UserError, short
from compress.pipeline import Pipeline
from compress.profiling import LatencySettings
from compress.search_space import (Constraint, Objective, Space, builtin, default_objective, parse_constraint,
                                   parse_objective, parse_space)
from compress.search_trials import REFERENCE, Runner, TrialFailed, fmt

PRUNERS = ("halving", "median", "none")
SEARCH_KEYS = {"model", "data", "objectives", "constraints", "space", "trials", "reference", "seed", "pruner",
               "profiler", "max_length"}


@dataclass(frozen=True)
class SearchResult:
    outdir: Path
    doc: dict  # what search.json holds
    chosen: dict | None  # the exported trial (an entry of doc["trials"]), None when no trial met every constraint


class Search:
    """`Search(objectives=["cosine"], constraints=["latency<=0.5x"]).run("minilm", outdir="out", trials=20)`."""

    def __init__(self, space: Sequence[dict] | None = None, objectives: Sequence[str] | str | None = None,
                 constraints: Sequence[str] | str = (), *, reference: Sequence[Any] | None = None, trials: int = 20,
                 seed: int = 0, pruner: str = "halving", profiler: str | None = None, verbose: bool = False,
                 source: str = "search"):
        problems = []
        self.source = source
        self._args = {"space": space, "objectives": objectives, "constraints": constraints, "reference": reference,
                      "trials": trials, "seed": seed, "pruner": pruner, "profiler": profiler, "verbose": verbose}
        objectives = [objectives] if isinstance(objectives, str) else list(objectives or [])
        constraints = [constraints] if isinstance(constraints, str) else list(constraints or [])
        self.objectives: list[Objective] = _parsed(objectives, parse_objective, problems)
        self.constraints: list[Constraint] = _parsed(constraints, parse_constraint, problems)
        if pruner not in PRUNERS:
            problems.append(f"pruner must be one of {', '.join(PRUNERS)} (got {short(pruner)})")
        if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= 100_000:
            problems.append(f"trials must be a whole number from 1 to 100000 (got {short(trials)})")
        self.space: Space | None = None
        if space is not None:
            try:
                self.space = parse_space(list(space), source)
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(problems, source)
        self.reference = list(reference) if reference is not None else REFERENCE
        self.trials, self.seed, self.pruner, self.profiler = trials, seed, pruner, profiler
        self.verbose = verbose
        self.model: Any = None
        self.data: Any = None
        self.max_length = 128

    @classmethod
    def from_recipe(cls, path: str | Path) -> Search:
        """A YAML search recipe: model, data, objectives, constraints, space, trials, reference, seed,
        pruner, profiler, max_length (all optional)."""
        doc = recipe.load_search_recipe(Path(path))
        unknown = sorted(set(doc) - SEARCH_KEYS)
        if unknown:
            raise ConfigError([f"unknown key {short(k, 40)}: allowed {', '.join(sorted(SEARCH_KEYS))}" for k in unknown],
                              str(path))
        search = cls(doc.get("space"), doc.get("objectives"), doc.get("constraints") or (), reference=doc.get("reference"),
                     trials=doc.get("trials", 20), seed=doc.get("seed", 0), pruner=doc.get("pruner", "halving"),
                     profiler=doc.get("profiler"), source=str(path))
        search.model, search.data = doc.get("model"), doc.get("data")
        search.max_length = doc.get("max_length", 128)
        return search

    def replaced(self, **changes: Any) -> Search:
        """The same search with some settings changed (the CLI's options over a recipe's)."""
        new = Search(**{**self._args, **changes}, source=self.source)
        new.model, new.data, new.max_length = self.model, self.data, self.max_length
        return new

    # ---- checks before anything runs ------------------------------------------------------------

    def _goal_problems(self, kind: Any) -> list[str]:
        problems = []
        encoder = kind.name == "encoder"
        for metric in [o.metric for o in self.objectives] + [c.metric for c in self.constraints]:
            if metric in ("cosine", "lee50", "polarity") and not encoder:
                problems.append(f"'{metric}' is measured on sentence encoders only; this model is a {kind.name}")
            if metric == "ppl" and kind.name != "causal-lm":
                problems.append(f"'ppl' (perplexity) is measured on causal LMs only; this model is a {kind.name}")
            if metric == "unseen" and not kind.cache_reference:
                problems.append(f"'unseen' (fidelity on an unseen domain) is measured on encoders and classifiers; "
                                f"this model is a {kind.name}")
        return problems

    def _space_problems(self, space: Space, model: Any, trust_remote_code: bool) -> list[str]:
        problems: list[str] = []
        for entries in space.variants():
            try:
                Pipeline(entries, defer_errors=True, source=self.source).validate(model, trust_remote_code=trust_remote_code)
            except ConfigError as exc:
                problems += [p for p in exc.problems if p not in problems]
        return problems

    def _space_for(self, info: Any, model: Any, trust_remote_code: bool) -> Space:
        if self.space is not None:
            problems = self._space_problems(self.space, model, trust_remote_code)
            if problems:
                raise ConfigError(problems, f"{self.source} (space)")
            return self.space
        for prunable in (True, False):  # pruning in the built-in space where the architecture allows it
            space = parse_space(builtin(info.kind.name, prunable), "built-in space")
            problems = self._space_problems(space, model, trust_remote_code)
            if not problems:
                return space
        raise ConfigError(problems, "built-in search space")

    def validate(self, model: Any = None, trust_remote_code: bool = False) -> Space:
        """Check the goals and the space against the model without running anything; the space searched."""
        model = model if model is not None else self.model
        return self._checked(loading.describe(model, trust_remote_code), model, trust_remote_code)

    def _checked(self, info: Any, model: Any, trust_remote_code: bool) -> Space:
        if not self.objectives:
            self.objectives = [parse_objective(default_objective(info.kind.name))]
        head = "cosine" if info.kind.name == "encoder" else "top1"  # "fidelity": the kind's own measure
        self.objectives = [replace(o, metric=head) if o.metric == "fidelity" else o for o in self.objectives]
        self.constraints = [replace(c, metric=head) if c.metric == "fidelity" else c for c in self.constraints]
        problems = self._goal_problems(info.kind)
        if problems:
            raise ConfigError(problems, self.source)
        return self._space_for(info, model, trust_remote_code)

    # ---- the search ---------------------------------------------------------------------------------

    def run(self, model: Any = None, data: Any = None, outdir: str | Path = "search", *, trials: int | None = None,
            overwrite: bool = False, resume: bool = False, storage: str | None = None, study_name: str | None = None,
            max_length: int | None = None, latency: LatencySettings | None = None, console: Console | None = None,
            trust_remote_code: bool = False, max_minutes: float | None = None) -> SearchResult:
        """`max_minutes`: start no trial after this long (the running one finishes); None: no limit."""
        console = console or Console(stderr=True)
        model = model if model is not None else self.model
        data = data if data is not None else self.data
        trials = trials or self.trials
        max_length = max_length or self.max_length
        settings = latency or LatencySettings()
        outdir = Path(outdir).expanduser()
        work = outputs.work_dir(outdir)
        outputs.claim(outdir, [model, data], overwrite or resume, work=work)
        info = loading.describe(model, trust_remote_code)
        outputs.claim(outdir, [*stages.input_files(info), data], overwrite or resume, work=work)
        space = self._checked(info, model, trust_remote_code)
        if not resume:
            outputs.clear(work)
        continued = resume and not work.exists() and (outdir / "study.db").is_file()  # a finished search, more trials
        outputs.mark(work, "search")
        if continued:
            shutil.copy2(outdir / "study.db", work / "study.db")
        run = Runner(self, space, model, data, work, max_length, settings, console, trust_remote_code, info.kind)
        t0 = time.time()
        run.prepare()
        study = run.study(storage, study_name, resume)
        done = _finished(study)
        if done < trials:
            console.print(f"[bold]search[/bold]: {trials - done} more trial(s) to reach {trials} "
                          f"({done} already in the study); objectives {', '.join(o.text for o in self.objectives)}; "
                          f"constraints {', '.join(c.text for c in self.constraints) or 'none'}")
        deadline = t0 + max_minutes * 60 if max_minutes else None
        while _finished(study) < trials:
            if deadline is not None and time.time() > deadline:
                console.print(f"time limit: {max_minutes:g} minutes reached after {_finished(study)} trials; "
                              "no new trial starts (--resume continues the study)")
                break
            study.optimize(run.objective, n_trials=1, catch=(TrialFailed,))
        doc = run.document(study, time.time() - t0)
        chosen = next((t for t in doc["trials"] if t["number"] == doc["chosen"]), None)
        if chosen is not None:
            run.export(chosen)
        (work / "search.json").write_text(json.dumps(doc, indent=2, default=str))
        search_report.write(doc, work)
        for folder in ("trials", "stages", "reference", "final"):
            shutil.rmtree(work / folder, ignore_errors=True)
        outputs.publish(work, outdir)
        if chosen is None:
            raise UserError(_no_feasible(doc, outdir))
        console.print(f"[green]done[/green]: {outdir}/ (trial {chosen['number']}: "
                      f"{', '.join(f'{k} {fmt(v)}' for k, v in chosen['metrics'].items())}; search.md, search.png)")
        return SearchResult(outdir, doc, chosen)


def _parsed(texts: list, parse: Any, problems: list[str]) -> list:
    """Each text parsed; the ValueErrors of those that cannot be go to `problems`."""
    out = []
    for text in texts:
        try:
            out.append(parse(str(text)))
        except ValueError as exc:
            problems.append(str(exc))
    return out


def _finished(study: Any) -> int:
    """Trials that count towards --trials: finished ones, not those cut short by an interruption."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))


def _no_feasible(doc: dict, outdir: Path) -> str:
    near = search_report.closest(doc["trials"])
    if near is None:
        return f"no trial finished (see {outdir}/search.md for their errors)"
    over = "; ".join(f"{k} (got {fmt(near['metrics'].get(_metric_of(k, doc)))})" for k in near["violations"])
    return (f"no trial met every constraint in {len(doc['trials'])} trials; the closest is trial {near['number']} "
            f"({search_report.recipe_short(near['recipe'])}), which misses {over}. Loosen a constraint, widen the "
            f"space or run more trials (--resume --trials N); every trial is in {outdir}/search.md")


def _metric_of(text: str, doc: dict) -> str:
    return next((c["metric"] for c in doc["constraints"] if c["text"] == text), text)


