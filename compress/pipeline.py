"""The pipeline: validate the whole pass list, then run passes in order, measuring after each.

Every stage (the input, then one per pass) is measured the same way and recorded. Each pass's
output is cached under `<outdir's parent>/.<outdir name>.partial/stages/NN-name/`, keyed by a hash
of (input, data, every config so far), so `resume=True` picks up after the last finished pass.
Results appear in OUTDIR only at the end, by an atomic rename."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from compress import data as data_mod
from compress import images, loading, outputs, recipe, refcache, registry, report, stages
from compress.config import PassConfig
from compress.context import PassContext
from compress.errors import ConfigError, PassFailed, UserError, short
from compress.measure import MEASURE_STEPS, MeasureSettings, Reference, measure, measures_unseen
from compress.profiling import LatencySettings
from compress.state import ModelState


@dataclass(frozen=True)
class Result:
    outdir: Path
    report: dict
    state: ModelState


def _branches_to_torch(form: str | None, spec: Any) -> bool:
    """Nothing runs on a .pte file: a torch pass after export.executorch goes on from the torch model it exported."""
    return form == "pte" and "torch" in spec.takes


def _problems_for_chain(configs: Sequence[PassConfig], info: loading.ModelInfo, has_data: bool) -> list[str]:
    problems, form = [], info.form
    for i, cfg in enumerate(configs):
        if cfg is None:  # already reported as invalid; the form after it is unknown
            form = None
            continue
        spec = registry.spec_for(cfg)
        if _branches_to_torch(form, spec):
            form = "torch"
        if form is not None and form not in spec.takes:
            fix = ("torch passes must come before export.onnx" if "torch" in spec.takes
                   else "add export.onnx before it" if form == "torch"
                   else ("nothing runs on a .pte file: after export.executorch only torch passes and export.onnx "
                         "can follow (they go on from the torch model it exported)") if form == "pte"
                   else "ONNX passes must come before export.ort")
            problems.append(f"passes[{i}] '{spec.name}' takes the {' or '.join(spec.takes)} form "
                            f"but gets the {form} form here: {fix}")
        if info.kind not in spec.kinds:
            able = [n for n in registry.names() if info.kind in registry.get(n).kinds]
            problems.append(f"passes[{i}] '{spec.name}' does not work on a {info.kind} model; "
                            f"the passes that do: {', '.join(able)}")
        else:
            if spec.needs_data(cfg) and not has_data:
                problems.append(f"passes[{i}] '{spec.name}' needs calibration data: give --data FILE or a built-in corpus")
            problems.extend(f"passes[{i}] '{spec.name}': {p}" for p in spec.check(cfg, info))
            problems.extend(f"passes[{i}] '{spec.name}': {p}" for p in spec.check_order(cfg, form, list(configs[:i])))
        form = spec.gives or form
    return problems


# a stage record's measurements (replaced when a cached stage is measured again with other settings)
MEASURED = ("form", "params", "bytes", "fidelity", "fidelity_unseen", "metrics", "latency_ms", "measure_seconds")
MAX_LENGTH_RANGE = (8, 8192)  # tokens per evaluation sample; the CLI's --max-length has the same bounds


def _check_max_length(max_length: Any) -> None:
    from numbers import Integral

    low, high = MAX_LENGTH_RANGE
    if isinstance(max_length, bool) or not isinstance(max_length, Integral) or not low <= max_length <= high:
        raise UserError(f"max_length must be a whole number of tokens from {low} to {high} (got {short(max_length)})")


class Pipeline:
    """An ordered list of pass configs. `Pipeline([ExportOnnx(), QuantInt8()]).run("minilm", outdir="out")`."""

    def __init__(self, passes: Sequence[PassConfig | dict | str], *, defer_errors: bool = False, source: str = "pipeline"):
        """Invalid entries raise ConfigError here, or with `defer_errors` in `validate()`, together
        with the problems found against the model (so a recipe check lists everything at once)."""
        entries, self.problems = recipe.collect(list(passes))
        self.source = source
        self.recipe_path: Path | None = None  # an input too: the output may not hold it
        if self.problems and not defer_errors:
            raise ConfigError(self.problems, source)
        self.entries = entries
        self.configs: list[PassConfig] = [c for c in entries if c is not None]
        self.model: Any = None  # defaults a recipe may carry; run() arguments take precedence
        self.data: Any = None
        self.measure: str | None = None

    @classmethod
    def from_recipe(cls, path: str | Path) -> Pipeline:
        doc = recipe.read_recipe(path)
        pipe = cls(doc["passes"], defer_errors=True, source=str(path))
        pipe.model, pipe.data, pipe.recipe_path = doc["model"], doc["data"], Path(path)
        pipe.measure = doc.get("measure")
        return pipe

    def validate(self, model: Any = None, has_data: bool = True, trust_remote_code: bool = False) -> loading.ModelInfo:
        """Check everything that can be checked before work starts; raise one ConfigError."""
        info = loading.describe(model if model is not None else self.model, trust_remote_code)
        problems = self.problems + _problems_for_chain(self.entries, info, has_data)
        if problems:
            raise ConfigError(problems, self.source)
        return info

    def latency_settings(self) -> LatencySettings:
        for cfg in self.configs:
            if hasattr(cfg, "latency_settings"):
                return cfg.latency_settings()
        return LatencySettings()

    def run(self, model: Any = None, data: Any = None, outdir: str | Path = "compressed", *, overwrite: bool = False,
            resume: bool = False, max_length: int = 128, latency: LatencySettings | None = None, tasks: bool = True,
            tokenizer: Any = None, trust_remote_code: bool = False, console: Console | None = None,
            measure: str | MeasureSettings | None = None, stages_dir: Path | None = None, summary: bool = True) -> Result:
        """`measure`: full (default), quick or off (compress/measure.py); a recipe's `measure:` otherwise.

        `stages_dir`: a stage folder shared by several runs (`compress search`'s trials), each stage
        kept under its key there, so runs whose pass lists share a prefix share its work; by default
        the stages live in this run's own work folder. `summary`: print the final table."""
        ms = MeasureSettings.of(measure if measure is not None else self.measure)
        console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 160)
        _check_max_length(max_length)  # as the CLI's --max-length, before anything is written
        outdir = Path(outdir).expanduser()  # where outputs.claim says to write (`~` expanded)
        work = outputs.work_dir(outdir)
        outputs.claim(outdir, [model or self.model, data or self.data, tokenizer, self.recipe_path], overwrite, work=work)  # fast refusals before the model is read
        model = model if model is not None else self.model
        data_spec = data if data is not None else self.data
        info = self.validate(model, trust_remote_code=trust_remote_code)
        outputs.claim(outdir, [*stages.input_files(info), data_spec, self.recipe_path, tokenizer], overwrite, work=work)
        text = info.kind.load_data(data_spec, info.path)  # a text corpus, or images sized for the model
        settings = latency or self.latency_settings()
        with console.status(f"loading {model if model is not None else 'minilm'}"):
            state = loading.load(model, info, text, tokenizer, trust_remote_code)
        if not resume:  # nothing is written before this point
            outputs.clear(work)
        outputs.mark(work, "run")
        if stages_dir is None:
            (work / "stages").mkdir(parents=True, exist_ok=True)
        # what makes the stages' models (their cache key) apart from how they are measured: a stage found
        # with other measurement settings is measured again, not rebuilt (a search's quick trials, then
        # the chosen pipeline measured in full, share every model)
        making = {"data": text.fingerprint(), "max_length": max_length, "latency": settings.as_dict(),
                  "tokenizer": str(tokenizer)}
        measuring = {"tasks": tasks, "measure": ms.as_dict()}
        if measures_unseen(state) and ms.unseen_texts():  # its text is the running Python's language reference
            measuring["unseen"] = data_mod.fingerprint_texts(ms.unseen_texts())
        key = _hash({"input": stages.identity(model, info), **making, "trust_remote_code": trust_remote_code})
        with console.status("hashing the input for the measurement cache"):
            digest = refcache.content_hash(model, info) if refcache.cache_dir() is not None else None
        how = _Measuring(settings, max_length, tasks, ms,
                         refcache.key({"input": digest, **making, **measuring}) if digest else None, _hash(measuring))
        state = self._run_stages(state, key, work, how, console, resume, stages_dir)
        rep = self._finish(state, work, settings, data_spec, ms, console)
        outputs.publish(work, outdir)
        if summary:
            console.print(report.summary_table(rep))
            console.print(f"[green]done[/green]: {outdir}/ ({rep['final']['path']}, report.md, report.json, report.png)")
        return Result(outdir, rep, state)

    def _run_stages(self, state: ModelState, key: str, work: Path, how: _Measuring, console: Console,
                    resume: bool, shared: Path | None = None) -> ModelState:
        settings, max_length = how.latency, how.max_length
        ref = None
        n = len(self.configs)
        torch_state = None  # the last torch stage: where passes after export.executorch go on from
        for index, cfg in enumerate([None, *self.configs]):
            if state.form == "torch":
                torch_state = state
            elif cfg is not None and _branches_to_torch(state.form, registry.spec_for(cfg)):
                state = replace(torch_state, history=state.history)  # the .pte stage stays in the report
            name = "input" if cfg is None else cfg.pass_name
            key = key if cfg is None else _hash({"prev": key, "config": cfg.to_dict()})
            sdir = shared / f"{index:02d}-{name}-{key}" if shared else work / "stages" / f"{index:02d}-{name}"
            cached = stages.load_cached(sdir, key, state)
            if cached is not None and cached.history[-1].get("measured") == how.measured:
                state = cached
                console.print(f"[dim][{index}/{n}] {name}: cached, {'shared with an earlier run' if shared else 'resumed'}[/dim]")
                continue
            if cached is not None:  # the same model, measured with other settings: measure it again
                console.print(f"[dim][{index}/{n}] {name}: cached; measuring it with this run's settings[/dim]")
                state = replace(cached, history=cached.history[:-1])
                old = cached.history[-1]
                rec, ref = self._measure_stage(state, cfg, index, ref, how, console)
                rec = {**{k: v for k, v in old.items() if k not in MEASURED}, **rec, "measured": how.measured}
                state = stages.save(state.with_record(rec), sdir, key, write_model=False)
                console.print("    " + stages.one_line(rec))
                continue
            # on resume, an interrupted pass finds its checkpoint (a shared folder is named by its key: always kept)
            keep = resume or shared is not None
            stages.prepare(sdir, key, keep=keep)
            ctx = PassContext(sdir, index, max_length, settings, console, key=key, resume=keep)
            t0 = time.perf_counter()
            if cfg is not None:
                console.print(f"[bold][{index}/{n}] {cfg.describe()}[/bold]")
                state = _run_one(state, cfg, ctx)
            seconds = time.perf_counter() - t0
            rec, ref = self._measure_stage(state, cfg, index, ref, how, console)
            rec = {"index": index, "name": name, "config": cfg.to_dict() if cfg else None, **rec,
                   "seconds": round(seconds, 3), "measured": how.measured, **ctx.notes}
            state = stages.save(state.with_record(rec), sdir, key)
            console.print("    " + stages.one_line(rec))
        return state

    @staticmethod
    def _measure_stage(state: ModelState, cfg: PassConfig | None, index: int, ref: Reference | None,
                       how: _Measuring, console: Console) -> tuple[dict, Reference]:
        name = "input" if cfg is None else cfg.pass_name
        t0 = time.perf_counter()
        try:
            if cfg is None:
                rec, ref = _measure_input(state, how, console)
            else:  # (on resume the input stage came from its folder: the teacher's outputs are built here)
                ref = ref or Reference.build(state, how.max_length, how.ms)
                rec = _measure_or_inherit(state, cfg, ref, how, console, f"stage {index} ({name})")
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - a graph the pass wrote that does not run: name the stage
            raise PassFailed(index, name, exc, during=" when its output was measured") from exc
        return {**rec, "measure_seconds": round(time.perf_counter() - t0, 3)}, ref

    def _finish(self, state: ModelState, work: Path, settings: LatencySettings, data_spec: Any,
                ms: MeasureSettings, console: Console) -> dict:
        final = stages.write_final(state, work, console)
        if isinstance(data_spec, images.ImageData):
            data_text = data_spec.source
        elif data_spec in (None, *data_mod.BUILTIN, *images.BUILTIN):
            data_text = data_spec or state.kind.inputs.default_data
        else:
            data_text = str(Path(data_spec).expanduser().resolve())
        (work / "recipe.yaml").write_text(recipe.dump_recipe(self.configs, model=state.source, data=data_text,
                                                              measure=None if ms.level == "full" else ms.level))
        rep = {"model": state.source, "kind": state.kind.name, "architecture": state.architecture,
               "data": state.data.summary() if state.data else None,
               "settings": {"latency": settings.as_dict(), "measure": ms.level}, "stages": list(state.history),
               "final": {"path": final, "form": state.form}}
        if any("fidelity_unseen" in s for s in state.history):  # what the "unseen-domain" columns measured
            rep["unseen_domain"] = {"source": data_mod.unseen_source(), "samples": len(ms.unseen_texts())}
        report.write_all(rep, work)
        return rep


def _run_one(state: ModelState, cfg: PassConfig, ctx: PassContext) -> ModelState:
    spec = registry.spec_for(cfg)
    try:
        out = spec.run(state, cfg, ctx)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - report which pass failed and why
        raise PassFailed(ctx.index, cfg.pass_name, exc) from exc
    if not isinstance(out, ModelState):
        raise PassFailed(ctx.index, cfg.pass_name, TypeError(f"returned {type(out).__name__}, not ModelState"))
    return out


@dataclass(frozen=True)
class _Measuring:
    """How every stage is measured in one run."""

    latency: LatencySettings
    max_length: int
    tasks: bool
    ms: MeasureSettings
    cache_key: str | None  # the input's measurements in the reference cache (refcache.py); None: not cached
    measured: str = ""  # hash of the measurement settings, kept in each stage record


def _measure_input(state: ModelState, how: _Measuring, console: Console) -> tuple[dict, Reference]:
    """The input stage: from the reference cache when this model, data and settings were measured
    before (said so), else measured and cached."""
    hit = refcache.load(how.cache_key) if how.cache_key else None
    wants_unseen = measures_unseen(state) and bool(how.ms.unseen_texts())
    if hit is not None and (hit.outputs is not None or not state.kind.cache_reference) \
            and (hit.unseen is not None or not wants_unseen):
        console.print(f"    input measurements reused from the cache ({hit.folder}; same model, data and settings)")
        ref = (Reference(outputs=hit.outputs, unseen=hit.unseen) if hit.outputs is not None
               else Reference.build(state, how.max_length, how.ms))
        return hit.record, ref
    ref = Reference.build(state, how.max_length, how.ms)
    record = _measure_or_inherit(state, None, ref, how, console, "stage 0 (input)")
    if how.cache_key:
        refcache.save(how.cache_key, record, ref.outputs, ref.unseen)
    return record, ref


def _measure_or_inherit(state: ModelState, cfg: PassConfig | None, ref: Reference, how: _Measuring,
                        console: Console, label: str) -> dict:
    """A pass that leaves the model as it is (profile) inherits the previous measurements."""
    if cfg is not None and not registry.spec_for(cfg).changes(cfg) and state.history:
        prev = state.history[-1]
        return {k: prev[k] for k in ("form", "params", "bytes", "fidelity", "fidelity_unseen", "metrics", "latency_ms")
                if k in prev}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"measuring {label}", total=MEASURE_STEPS)

        def advance(what: str) -> None:  # called as each part starts: the previous one is done
            progress.update(task, description=f"measuring {label}: {what}", completed=len(started))
            started.append(what)

        started: list[str] = []

        rec = measure(state, ref, how.max_length, how.latency, how.tasks, step=advance, ms=how.ms)
    if rec["params"] is None and state.history:  # an .ort file can't be read back as a graph; conversion keeps them
        rec["params"] = state.history[-1]["params"]
    return rec


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
