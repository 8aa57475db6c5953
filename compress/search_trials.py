"""Running and measuring one `compress search` trial (compress/search.py is the front door).

`Runner` holds a search while it runs: the reference model and the teacher's held-out outputs,
the `Timer` (latency as a ratio to the reference, interleaved in this process or through the
user's profiler command), the Optuna study (sampler, pruner, storage, requeued interrupted
trials), and `objective`: draw a pass list, run its untrained proxy first when it has training
passes (an architecture constraint broken there ends the trial; the pruner may stop it), then the
pass list itself over the shared stage folder, and measure the final model in full."""
from __future__ import annotations

import json
import re
import shlex
import statistics
import subprocess
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from compress import outputs, recipe, search_report
from compress.errors import ConfigError, PassFailed, UserError, clip, short
from compress.measure import MeasureSettings, Reference, measure, measures_unseen
from compress.pipeline import Pipeline
from compress.profiling import LatencySettings, time_interleaved
from compress.search_space import TASK_METRICS, Objective, Space

REFERENCE = [{"pass": "export.onnx"}, {"pass": "optimize.ort"}, {"pass": "quant.int8"}]  # the default recipe, timed
ARCHITECTURE = ("latency", "latency_ms", "size_mb", "params", "memory_mb")  # fixed once the proxy ran
TRIAL_MEASURE = "quick"  # the stages inside a trial; the final model of each trial is measured in full


class TrialFailed(Exception):
    """A trial whose pipeline could not run (its message is in the trial's user attributes)."""


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Timer:
    """Latency of a model as a ratio to the reference, timed interleaved in this process (or with the
    user's profiler command, alternating the two files)."""

    def __init__(self, reference: Path, state: Any, settings: LatencySettings, profiler: str | None):
        self.reference, self.settings, self.profiler, self.kind = reference, settings, profiler, state.kind
        texts = state.data.eval if state.data is not None else []
        self.feed = state.kind.inputs.latency_feed(state.tokenizer, texts, settings.batch, settings.seq)
        self.run_reference = None if profiler else self._one_run(reference)  # loaded once for every trial

    def _one_run(self, path: Path) -> Any:
        """One forward pass of the model file on the latency feed, inputs made once."""
        from compress.runtime import OnnxRunner, PteRunner

        if path.suffix == ".pte":  # an ExecuTorch program (export.executorch), run by its own runtime
            return PteRunner(path, self.kind, threads=self.settings.threads).bound(self.feed)
        runner = OnnxRunner(path, self.kind, threads=self.settings.threads)
        inputs = runner.feed(self.feed)
        return lambda: runner.sess.run(None, inputs)

    def __call__(self, path: Path) -> dict:
        if self.profiler:
            ref_ms, ms = self._command(self.reference), self._command(path)
        else:
            runs = {"reference": self.run_reference, "model": self._one_run(path)}
            timing = time_interleaved(runs, replace(self.settings, warmup=5, runs=60), rounds=6)
            ref_ms, ms = timing["reference"]["p50"], timing["model"]["p50"]
        return {"latency": ms / ref_ms, "latency_ms": ms}

    def _command(self, path: Path) -> float:
        """The user's profiler: `COMMAND PATH` prints milliseconds (the last number printed); median of 3."""
        values = []
        for _ in range(3):
            try:
                out = subprocess.run([*shlex.split(self.profiler), str(path)], capture_output=True, text=True, timeout=1800)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise UserError(f"the profiler command {short(self.profiler, 80)} could not run: {clip(exc, 200)}") from None
            numbers = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", out.stdout)
            if out.returncode != 0 or not numbers:
                why = clip((out.stderr or out.stdout).strip().splitlines()[-1] if (out.stderr or out.stdout).strip() else
                           f"exit status {out.returncode}", 200)
                raise UserError(f"the profiler command {short(self.profiler, 80)} must print milliseconds for "
                                f"{path.name}: {why}")
            values.append(float(numbers[-1]))
        return statistics.median(values)


class Runner:
    """One search's state while it runs: the reference, the timer, the study, the trials."""

    def __init__(self, search: Any, space: Space, model: Any, data: Any, work: Path, max_length: int,
                 settings: LatencySettings, console: Console, trust_remote_code: bool, kind: Any):
        self.s, self.space, self.model, self.data, self.work = search, space, model, data, work
        self.max_length, self.settings, self.console, self.trust = max_length, settings, console, trust_remote_code
        used = {o.metric for o in search.objectives} | {c.metric for c in search.constraints}
        self.tasks = any(m in TASK_METRICS for m in used)
        self.memory = "memory_mb" in used
        # held-out fidelity: always where the teacher's outputs are kept (cheap); for causal LMs (the teacher
        # runs again on every batch) only when a goal names it
        self.fidelity = kind.cache_reference or any(m in ("cosine", "top1", "kl", "unseen") for m in used)
        self.kind = kind.name
        self.verbose = search.verbose
        self.ref: Reference | None = None
        self.timer: Timer | None = None
        self.reference: dict = {}

    # ---- pipelines ----------------------------------------------------------------------------

    def pipeline(self, entries: list, folder: Path, measure_level: str = TRIAL_MEASURE, summary: bool = False,
                 what: str = "") -> Any:
        """Run a pass list in `folder` over the shared stages; its own output only with `verbose`."""
        quiet = Console(quiet=True)
        with self.console.status(what or f"running {folder.parent.name}/{folder.name}") if not self.verbose else nullcontext():
            return Pipeline(entries, source=f"trial {folder.name}").run(
                self.model, self.data, folder, overwrite=True, max_length=self.max_length, latency=self.settings,
                tasks=False, console=self.console if self.verbose else quiet, measure=measure_level,
                stages_dir=self.work / "stages", summary=summary, trust_remote_code=self.trust)

    def prepare(self) -> None:
        """Run and measure the reference; build the held-out teacher outputs every trial is compared with."""
        self.console.print(f"[bold]reference[/bold]: {' -> '.join(e['pass'] if isinstance(e, dict) else str(e) for e in self.s.reference)}")
        result = self.pipeline(self.s.reference, self.work / "reference", what="running the reference recipe")
        if result.state.form == "torch":
            raise UserError("the reference recipe must end in an ONNX model (add export.onnx): latency is timed on ONNX files")
        self.ref = Reference.build(result.state, self.max_length, MeasureSettings())
        self.timer = Timer(Path(result.state.path), result.state, self.settings, self.s.profiler)
        metrics = self.metrics(result.state)
        self.reference = {"recipe": self.s.reference, "latency_ms": metrics.get("latency_ms"), "metrics": metrics}

    def metrics(self, state: Any) -> dict:
        """The final model's measurements (full held-out fidelity, task metrics if a goal needs them,
        size, parameters, latency against the reference, peak memory if a goal needs it)."""
        level = MeasureSettings("full", latency=False, tasks="full" if self.tasks else "off", fidelity=self.fidelity)
        rec = measure(state, self.ref, self.max_length, None, tasks=self.tasks, ms=level)
        out: dict[str, Any] = {}
        fid, unseen = rec.get("fidelity") or {}, rec.get("fidelity_unseen") or {}
        head = "cosine" if "cosine" in fid else "top1"
        out.update({k: fid[k] for k in ("cosine", "top1", "kl") if k in fid})
        if head in unseen and measures_unseen(state):
            out["unseen"] = unseen[head]
        task = rec.get("metrics") or {}
        out.update({k: task[k] for k in ("lee50", "polarity") if k in task})
        if "ppl_lee" in task:
            out["ppl"] = task["ppl_lee"]
        out["size_mb"] = rec["bytes"] / 1e6
        out["params"] = rec["params"]
        if state.form != "torch" and self.timer is not None:
            out.update(self.timer(Path(state.path)))
        if self.memory and state.form != "torch":
            from compress.profiling import peak_memory_mb

            out["memory_mb"] = peak_memory_mb(Path(state.path), self.timer.feed, self.settings, self.work)["peak_rss_mb"]
        return out

    def proxy(self, configs: list) -> list | None:
        """The cheap stand-in pass list (training passes replaced by their `proxy`); None: nothing to replace."""
        from compress import registry

        out, changed = [], False
        for cfg in configs:
            spec = registry.spec_for(cfg)
            if spec.proxy is None:
                out.append(cfg)
                continue
            changed = True
            stand_in = spec.proxy(cfg)
            if stand_in is not None:
                out.append(stand_in)
        return out if changed else None

    # ---- optuna -------------------------------------------------------------------------------

    def study(self, storage: str | None, name: str | None, resume: bool) -> Any:
        import optuna
        from sqlalchemy.exc import SQLAlchemyError

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported by objective() in one line
        with warnings.catch_warnings():  # multivariate and group are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(  # constraints: Trial.set_constraint in _finish_stage
                seed=self.s.seed, multivariate=True, group=True, n_startup_trials=max(2, min(10, self.s.trials // 3)))
        multi = len(self.s.objectives) > 1
        pruner = (optuna.pruners.NopPruner() if multi or self.s.pruner == "none"
                  else optuna.pruners.MedianPruner(n_startup_trials=2) if self.s.pruner == "median"
                  else optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
        url = storage or f"sqlite:///{(self.work / 'study.db').resolve()}"
        try:
            # a shared study: a worker that dies stops beating, and its trial is failed and run again by another
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                where = url if storage is None else optuna.storages.RDBStorage(
                    url, heartbeat_interval=60, grace_period=600,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            study = optuna.create_study(storage=where, study_name=name or "compress-search", load_if_exists=True,
                                        directions=[o.direction for o in self.s.objectives], sampler=sampler, pruner=pruner)
        except (ValueError, ImportError, SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:  # a bad URL
            raise UserError(f"the study '{name or 'compress-search'}' in {short(url, 80)} cannot be used: {clip(exc, 200)}") from None
        spec = {"space": self.space.as_list(), "objectives": [o.text for o in self.s.objectives],
                "constraints": [c.text for c in self.s.constraints], "reference": self.s.reference,
                "model": str(self.model), "data": str(self.data)}
        stored = study.user_attrs.get("search")
        if stored is None:
            study.set_user_attr("search", spec)
        elif stored != json.loads(json.dumps(spec, default=str)):
            raise UserError(f"the study '{study.study_name}' holds another search (its model, data, space or goals "
                            "differ): give a new -o, or --study NAME for a new study in that storage")
        if storage is None:  # a local study: trials left running by a killed process, or interrupted, run again
            self._requeue(study)
        return study

    def _requeue(self, study: Any) -> None:
        from optuna.trial import TrialState

        again = list(study.user_attrs.get("requeued", []))
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:  # its process was killed: finish it as interrupted
                study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                study.tell(t.number, state=TrialState.FAIL)
            stale = t.state == TrialState.RUNNING or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))
            if stale and t.number not in again:
                study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
                again.append(t.number)
                self.console.print(f"trial {t.number} was interrupted: it runs again (its finished stages are kept)")
        study.set_user_attr("requeued", again)

    def objective(self, trial: Any) -> Any:
        import optuna

        t0 = time.time()
        entries = self.space.sample(trial)
        trial.set_user_attr("recipe", entries)
        label = search_report.recipe_short(entries)
        self.console.rule(f"trial {trial.number}: {label}")
        same = self._same(trial, entries)
        if same is not None:
            return same
        folder = self.work / "trials" / f"{trial.number:04d}"
        try:
            try:
                configs = recipe.parse_entries(entries, f"trial {trial.number}")
            except ConfigError as exc:
                raise TrialFailed("invalid combination: " + "; ".join(exc.problems)) from None
            proxy = self.proxy(configs)
            if proxy is not None:
                entries = [c.to_dict() for c in proxy]
                metrics = self._same_proxy(trial, entries)
                if metrics is None:
                    state = self.pipeline(proxy, folder / "proxy", what=f"trial {trial.number}: the untrained proxy "
                                          f"({search_report.recipe_short(entries)})").state
                    metrics = self.metrics(state)
                trial.set_user_attr("proxy", {"recipe": entries, "metrics": metrics})
                values = self._finish_stage(trial, metrics, "proxy", t0, only=ARCHITECTURE)
                if values is not None:  # an architecture constraint is broken: no training spent on it
                    return values
                first = trial.user_attrs["metrics"].get(self.s.objectives[0].metric)
                if len(self.s.objectives) == 1 and first is not None:
                    trial.report(first, step=1)
                    if trial.should_prune():
                        self.console.print(f"[dim]trial {trial.number}: pruned (its one-shot proxy ranks below the trials "
                                           "that went on to train)[/dim]")
                        raise optuna.TrialPruned()
            state = self.pipeline(configs, folder / "model", what=f"trial {trial.number}: {label}").state
            # "trained": its training passes ran; "full": a pass list without training, run once
            return self._finish_stage(trial, self.metrics(state), "full" if proxy is None else "trained", t0)
        except (PassFailed, UserError, TrialFailed) as exc:  # the study goes on (study.optimize catches TrialFailed)
            trial.set_user_attr("error", clip(str(exc), 500))
            self.console.print(f"[red]trial {trial.number} failed[/red]: {short(str(exc), 200)}")
            raise TrialFailed(str(exc)) from None
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        finally:
            trial.set_user_attr("seconds", round(time.time() - t0, 1))

    def _same(self, trial: Any, entries: list) -> Any:
        """A pass list an earlier trial ran already: its measurements again (the sampler may draw the same
        point twice in a small space), or pruned again; None if none did."""
        import optuna
        from optuna.trial import TrialState

        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if t.user_attrs.get("recipe") != entries or "metrics" not in t.user_attrs:
                continue
            trial.set_user_attr("same_as", t.number)
            trial.set_user_attr("seconds", 0.0)
            self.console.print(f"[dim]trial {trial.number}: the same pipeline as trial {t.number}; its measurements "
                               "are reused[/dim]")
            if t.state == TrialState.PRUNED:
                for key in ("metrics", "stage", "constraints"):
                    trial.set_user_attr(key, t.user_attrs.get(key))
                raise optuna.TrialPruned()
            only = ARCHITECTURE if t.user_attrs.get("stage") == "proxy" else None
            return self._finish_stage(trial, t.user_attrs["metrics"], t.user_attrs["stage"], time.time(), only=only)
        return None

    def _same_proxy(self, trial: Any, entries: list) -> dict | None:
        """The measurements of an earlier trial's identical proxy (trials that differ only in training share it),
        so one architecture gets one latency and one verdict on the architecture constraints; None if none ran."""
        for t in trial.study.get_trials(deepcopy=False):
            proxy = t.user_attrs.get("proxy")
            if t.number != trial.number and proxy and proxy.get("recipe") == entries:
                self.console.print(f"[dim]trial {trial.number}: the same proxy as trial {t.number}; its measurements "
                                   "are reused[/dim]")
                return dict(proxy["metrics"])
        return None

    def _finish_stage(self, trial: Any, metrics: dict, stage: str, t0: float, only: Sequence[str] | None = None) -> Any:
        """Record the measurements; with `only`, return values only if one of those constraints is broken."""
        missing = [o.metric for o in self.s.objectives if metrics.get(o.metric) is None]
        slack = [c.slack(metrics[c.metric]) if metrics.get(c.metric) is not None else 1.0 for c in self.s.constraints]
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("stage", stage)
        trial.set_user_attr("constraints", slack)
        checked = [(c, s) for c, s in zip(self.s.constraints, slack) if only is None or c.metric in only]
        broken = [c.text for c, s in checked if s > 0]
        measured = ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())
        if only is not None and not broken:
            self.console.print(f"trial {trial.number} (proxy, untrained): {measured}: within the "
                               f"{'budget' if checked else 'space'} [{time.time() - t0:.0f} s]")
            return None
        if missing and stage != "proxy":
            raise TrialFailed(f"the final model has no {', '.join(missing)} measurement (is it the right kind of model?)")
        over = [c.text for c, s in zip(self.s.constraints, slack) if s > 0]
        met = f"misses {', '.join(over)}" if over else "meets every constraint"
        if only is not None:
            met += ": not trained"
        self.console.print(f"trial {trial.number} ({stage}{', untrained' if only is not None else ''}): "
                           f"{measured}: {met} [{time.time() - t0:.0f} s]")
        for c, value in zip(self.s.constraints, slack):  # what the sampler learns feasibility from
            trial.set_constraint(c.text, value)
        values = [metrics.get(o.metric) for o in self.s.objectives]
        return values[0] if len(values) == 1 else values

    # ---- the end --------------------------------------------------------------------------------

    def document(self, study: Any, seconds: float) -> dict:
        from optuna.trial import TrialState

        trials = []
        for t in study.get_trials(deepcopy=False):
            attrs = t.user_attrs
            slack = attrs.get("constraints") or []
            violations = {c.text: round(s, 6) for c, s in zip(self.s.constraints, slack) if s > 0}
            feasible = bool(attrs.get("metrics")) and not violations and len(slack) == len(self.s.constraints)
            state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                     TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[t.state]
            if state == "complete" and not feasible:
                state = "infeasible"
            trials.append({"number": t.number, "state": state, "stage": attrs.get("stage"), "recipe": attrs.get("recipe"),
                           "params": t.params, "metrics": attrs.get("metrics") or {}, "feasible": feasible,
                           "violations": violations, "seconds": attrs.get("seconds"), "error": attrs.get("error"),
                           "same_as": attrs.get("same_as")})
        good = [t for t in trials if t["state"] == "complete" and t["feasible"] and t["stage"] != "proxy"
                and t["same_as"] is None]
        # the front over the objectives and the constrained metrics (what a tighter budget would cost)
        axes = [*self.s.objectives, *(Objective(c.metric, "minimize" if c.op in ("<=", "<") else "maximize")
                                      for c in self.s.constraints if c.metric not in {o.metric for o in self.s.objectives})]
        front = _pareto([t for t in good if all(t["metrics"].get(a.metric) is not None for a in axes)], axes)
        first = self.s.objectives[0]
        sign = 1 if first.direction == "maximize" else -1
        # the best first objective; among equals, the one on the front (as fast, as small: it dominates the others)
        chosen = max(front or good, key=lambda t: sign * t["metrics"][first.metric])["number"] if good else None
        return {"model": str(self.model if self.model is not None else "minilm"), "kind": self.kind,
                "data": str(self.data) if self.data is not None else "(the model kind's default)",
                "objectives": [{"metric": o.metric, "direction": o.direction, "label": o.metric} for o in self.s.objectives],
                "constraints": [{"metric": c.metric, "op": c.op, "value": c.value, "unit": c.unit, "text": c.text}
                                for c in self.s.constraints],
                "space": self.space.as_list(), "reference": self.reference,
                "latency": {"how": (f"the profiler command {self.s.profiler!r} (median of 3), as a ratio to the reference"
                                    if self.s.profiler else
                                    f"this machine: batch {self.settings.batch} "
                                    f"{'images' if self.kind == 'image-classifier' else f'x {self.settings.seq} tokens'}, "
                                    f"{self.settings.threads} threads, p50 timed interleaved with the reference")},
                "study": {"name": study.study_name, "trials": len(trials)},
                "trials": trials, "pareto": [t["number"] for t in front], "chosen": chosen, "seconds": round(seconds, 1)}

    def export(self, chosen: dict) -> None:
        """The chosen trial's pipeline run as `compress run` runs it (stages from the cache, measured in
        full), its outputs put at the top of the search folder."""
        self.console.rule(f"exporting trial {chosen['number']}")
        result = self.pipeline(chosen["recipe"], self.work / "final", measure_level="full", summary=True,
                               what=f"trial {chosen['number']}: measuring every stage in full, as compress run does")
        for item in result.outdir.iterdir():  # model, report.*, recipe.yaml (compress run --recipe reproduces it)
            if item.name not in (outputs.MARKER, "stages"):
                item.rename(self.work / item.name)


def _pareto(trials: list[dict], objectives: list[Objective]) -> list[dict]:
    def key(t: dict) -> list[float]:
        return [t["metrics"][o.metric] * (1 if o.direction == "maximize" else -1) for o in objectives]

    keys = [key(t) for t in trials]
    return [t for t, k in zip(trials, keys)
            if not any(all(a >= b for a, b in zip(u, k)) and u != k for u in keys)]
