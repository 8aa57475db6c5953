"""The `compress` command line: run, search, passes, validate, profile, decode, generate.

Every user mistake (unknown pass, bad parameter, wrong order, missing or corrupt model, existing
output) prints one message and exits with code 2; a pass that fails while running exits with 1
and says which pass failed and where the finished stages are kept for --resume."""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress trained models (prune, distil, quantize) and export them to fast ONNX for edge runtimes.")
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


OPS = {"Ge": ">=", "Gt": ">", "Le": "<=", "Lt": "<"}


def friendly(fn: Callable) -> Callable:
    """User errors, and an OSError outside a running pass (a path the system refuses): one line, exit 2.
    Pass failures: which pass, exit 1. Ctrl-C: exit 130. No tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from compress.errors import PassFailed, UserError

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None
        except PassFailed as exc:
            console.print(f"[bold red]failed:[/bold red] {escape(str(exc))}", highlight=False)
            console.print("finished stages are kept; fix the problem and rerun with --resume to continue from there")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print(f"[bold red]interrupted[/bold red]{escape(_resume_hint(kwargs.get('outdir')))}", highlight=False)
            raise typer.Exit(130) from None
        except OSError as exc:  # a path the system refuses, outside a running pass (those are PassFailed)
            if exc.errno == errno.EPIPE:  # the reader of our output went away: typer exits quietly
                raise
            console.print(f"[bold red]error:[/bold red] {escape(_os_error(exc))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _os_error(exc: OSError) -> str:
    """One line for an OSError: the path it names (shortened) and the system's reason."""
    from compress.errors import clip, short_path

    why = exc.strerror or clip(str(exc), 200) or type(exc).__name__
    if exc.filename is None:
        return f"cannot continue: {why}"
    name = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes)) else str(exc.filename)
    return f"cannot use '{short_path(name)}': {why}"


def _resume_hint(outdir: Optional[Path]) -> str:
    """After Ctrl-C in a run: where the finished stages are and how to continue."""
    if outdir is None:
        return ""
    from compress.outputs import work_dir

    work = work_dir(Path(outdir).expanduser())
    try:
        started = (work / "stages").is_dir()
    except OSError:  # a name the system refuses: nothing was written under it
        started = False
    if not started:
        return f": nothing was written to '{outdir}'"
    return (f": the finished stages are kept in '{work}'; rerun the same command with --resume to continue "
            "from the last finished pass")


def quiet_libraries() -> None:
    """Keep the terminal for our progress and results (library chatter goes to the log level)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*TracerWarning.*")
    try:
        import torch.jit

        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    except (ImportError, AttributeError):
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)  # fatal only: a failed run's error comes back in the exception we report
    except (ImportError, AttributeError):
        pass


@app.command()
@friendly
def run(
    model: Optional[str] = typer.Argument(None, help="transformers folder, .onnx file, or built-in alias: minilm (default), smollm2, efficientnet-lite0"),
    passes: List[str] = typer.Option([], "--pass", "-p", help="NAME or NAME:key=value,... (repeatable, in order)"),
    recipe_file: Optional[Path] = typer.Option(None, "--recipe", "-r", help="YAML recipe (instead of --pass)"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="text file (one sample per line), .jsonl with a 'text' field, or built-in corpus: wiki (the default), lee, mix (every English prose corpus shipped, interleaved), wide (mix + docstring prose of installed scientific packages); image models: a folder of images or the built-in photos (default)"),
    outdir: Path = typer.Option(..., "--output", "-o", help="output directory (must not exist unless --overwrite)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output directory that compress wrote (never any other folder)"),
    resume: bool = typer.Option(False, "--resume", help="reuse the stages finished by an earlier interrupted run"),
    max_length: int = typer.Option(128, "--max-length", min=8, max=8192, help="tokens per evaluation sample"),
    no_tasks: bool = typer.Option(False, "--no-tasks", help="skip the task metrics (Lee-50, polarity)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow model code from the model folder"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder or alias, for an .onnx model without one beside it"),
    measure: Optional[str] = typer.Option(None, "--measure", help="how much each stage is measured: full (default; or the recipe's measure:), quick (fidelity on 16 samples, short task metrics and latency), off (size only)"),
) -> None:
    """Run passes over a model and write the final model, report.json, report.md and report.png."""
    from compress import recipe as recipe_mod
    from compress.errors import UserError
    from compress.pipeline import Pipeline

    quiet_libraries()
    if recipe_file and passes:
        raise UserError("give either --recipe or --pass options, not both")
    if passes:
        pipe = Pipeline([recipe_mod.parse_cli_pass(p) for p in passes], defer_errors=True, source="command line")
    else:
        pipe = Pipeline.from_recipe(recipe_file or recipe_mod.default_recipe_path())
        if recipe_file is None:
            console.print("no passes given: running the default recipe (export.onnx, optimize.ort, quant.int8, profile)")
    pipe.run(model, data, outdir, overwrite=overwrite, resume=resume, max_length=max_length, tasks=not no_tasks,
             trust_remote_code=trust_remote_code, tokenizer=tokenizer, console=console, measure=measure)


@app.command()
@friendly
def search(
    model: Optional[str] = typer.Argument(None, help="transformers folder, .onnx file, or built-in alias (default: minilm, or the recipe's)"),
    outdir: Path = typer.Option(..., "--output", "-o", help="output directory (must not exist unless --overwrite or --resume)"),
    objectives: List[str] = typer.Option([], "--objective", "-O", help="metric to optimise: cosine, unseen, top1, kl, lee50, polarity, ppl, latency, size, params, memory; max:NAME / min:NAME to say which way (repeatable: a Pareto search)"),
    constraints: List[str] = typer.Option([], "--constraint", "-c", help="bound on a metric: latency<=0.5x (ratio to the reference), latency<=4ms, size<=15MB, params<=10M, memory<=300MB, cosine>=0.95 (repeatable)"),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", min=1, max=100_000, help="trials in the study (default 20, or the recipe's); --resume with a larger N adds trials"),
    recipe_file: Optional[Path] = typer.Option(None, "--recipe", "-r", help="YAML search recipe: model, data, objectives, constraints, space, trials, reference, seed, pruner, profiler"),
    space_file: Optional[Path] = typer.Option(None, "--space", help="YAML list of the passes to search over (default: the built-in space for the model kind)"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="as for `compress run`: a text file, .jsonl, built-in corpus (wiki, lee, mix, wide) or image folder"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="recipe whose model latency ratios (0.5x) are relative to (default: export.onnx, optimize.ort, quant.int8)"),
    profiler: Optional[str] = typer.Option(None, "--profiler", help="command that takes an ONNX path as its last argument and prints milliseconds (e.g. a script that runs it on a phone); default: onnxruntime on this machine"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (e.g. postgresql://host/db) so several machines add trials to one study; default: study.db in the output folder"),
    study: Optional[str] = typer.Option(None, "--study", help="study name in --storage (default compress-search)"),
    pruner: Optional[str] = typer.Option(None, "--pruner", help="halving (default): only the best third of the untrained proxies go on to train; median; none"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="sampler seed"),
    resume: bool = typer.Option(False, "--resume", help="continue the study in the output folder (an interrupted search, or a finished one with more --trials)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output directory that compress wrote"),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=8, max=8192, help="tokens per evaluation sample (default 128)"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", min=0.1, help="start no new trial after this many minutes (the running one finishes); --resume continues"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show every trial's pipeline as it runs"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow model code from the model folder"),
) -> None:
    """Find the best pipeline for a budget: Optuna trials over pruning, distillation and quantization,
    each measured; writes the chosen model (as `compress run` does), search.md / search.png / search.json."""
    from compress import recipe as recipe_mod
    from compress.search import Search

    quiet_libraries()
    if recipe_file is not None:
        job = Search.from_recipe(recipe_file)
    else:
        job = Search(source="command line")
    overrides: dict = {}
    if space_file is not None:
        doc = recipe_mod.load_space(space_file)
        overrides["space"] = doc
    if objectives:
        overrides["objectives"] = objectives
    if constraints:
        overrides["constraints"] = constraints
    if reference is not None:
        ref = recipe_mod.read_recipe(reference)
        overrides["reference"] = ref["passes"]
    for key, value in (("trials", trials), ("pruner", pruner), ("seed", seed), ("profiler", profiler)):
        if value is not None:
            overrides[key] = value
    if overrides:
        job = job.replaced(**overrides)
    job.verbose = verbose
    job.run(model, data, outdir, overwrite=overwrite, resume=resume, storage=storage, study_name=study,
            max_length=max_length, console=console, trust_remote_code=trust_remote_code, max_minutes=max_minutes)


@app.command("passes")
@friendly
def list_passes(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List every pass: what it does, the forms it takes and gives, its parameters and defaults."""
    from compress import registry

    rows = []
    for name in registry.names():
        spec = registry.get(name)
        params = []
        for key, field in spec.config.model_fields.items():
            default = field.get_default(call_default_factory=True)
            bounds = [f"{OPS[type(m).__name__]} {getattr(m, type(m).__name__.lower())}" for m in field.metadata
                      if type(m).__name__ in OPS]
            params.append({"name": key, "default": default, "description": field.description or "",
                           "range": ", ".join(bounds)})
        rows.append({"name": name, "summary": spec.summary, "takes": list(spec.takes),
                     "gives": spec.gives or "same", "params": params})
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    out = Console(width=None if sys.stdout.isatty() else 140)
    for row in rows:
        out.print(f"[bold cyan]{row['name']}[/bold cyan]  ({'/'.join(row['takes'])} -> {row['gives']})  {row['summary']}")
        for p in row["params"]:
            rng = f" ({p['range']})" if p["range"] else ""
            out.print(escape(f"    {p['name']} = {p['default']!r}{rng}: {p['description']}"), highlight=False)
        out.print()


@app.command()
@friendly
def validate(
    recipe_file: Path = typer.Argument(..., help="YAML recipe to check"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="check against this model instead of the recipe's"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow model code from the model folder"),
) -> None:
    """Check a recipe without running it: pass names, parameters, form order, model support."""
    from compress.pipeline import Pipeline

    pipe = Pipeline.from_recipe(recipe_file)
    info = pipe.validate(model, trust_remote_code=trust_remote_code)
    console.print(f"[green]ok[/green]: {recipe_file}: {len(pipe.configs)} passes, valid for a {info.kind} "
                  f"({info.architecture or info.form}) model")


def _onnx_file(model: Path) -> Path:
    """A readable .onnx / .ort file, or one clear error."""
    from compress import models
    from compress.errors import ModelLoadError

    path = models.resolve(str(model))
    if not path.is_file() or path.suffix not in models.ONNX_SUFFIXES:
        raise ModelLoadError(f"'{model}' is not an .onnx or .ort file")
    models.check_onnx(path)
    return path


@app.command()
@friendly
def profile(
    model: Path = typer.Argument(..., help=".onnx or .ort file"),
    # the bounds are compress.profiling.LIMITS (the profile pass has the same), written out: no import at start-up
    batch: int = typer.Option(1, min=1, max=256, help="rows per run (batch x seq: at most 2**20 tokens)"),
    seq: int = typer.Option(128, min=1, max=8192, help="tokens per row"),
    threads: int = typer.Option(2, min=1, max=256, help="intra-op threads (pinned; at most 4 per CPU core are used)"),
    warmup: int = typer.Option(10, min=0, max=1000, help="untimed runs"),
    runs: int = typer.Option(50, min=5, max=100_000, help="timed runs"),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", min=1, max=32768, help="causal LMs with a KV cache: prompt length for TTFT"),
    new_tokens: int = typer.Option(32, "--new-tokens", min=2, max=4096, help="causal LMs with a KV cache: tokens generated for tokens/s"),
    as_json: bool = typer.Option(False, "--json", help="print the measurement as JSON"),
) -> None:
    """Latency p50/p90/p99, throughput, peak memory, size and top ops of an ONNX model; for a causal LM
    with a KV cache also time to first token, decode tokens/s and peak memory while generating."""
    import tempfile

    from compress import models
    from compress.data import load
    from compress.profiling import LatencySettings, profile_file, real_feed

    quiet_libraries()
    settings = LatencySettings(batch, seq, threads, warmup, runs, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    path = _onnx_file(model)
    if settings.threads < threads:
        console.print(f"--threads {threads}: using {settings.threads} (4 per CPU core this process may use; more "
                      "threads only wait for each other)", highlight=False)
    tokenizer = models.find_tokenizer(path)
    texts = load("wiki").eval if tokenizer is not None else []
    feed = real_feed(tokenizer, texts, batch, seq)
    kind = models.onnx_signature(path)[0]
    prompt = kind.profile_prompt(tokenizer, texts, prompt_tokens)  # causal LMs: generation timing of cache graphs
    with tempfile.TemporaryDirectory() as tmp, console.status(f"profiling {path.name}"):
        try:
            result = profile_file(path, kind, feed, settings, Path(tmp), prompt=prompt)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types; anything else is raised again
            raise _cannot_run(exc, path, tokenizer, f"batch {batch} x seq {seq}") from None
    result["inputs"] = "real text (held-out wiki)" if tokenizer is not None else "random token ids (no tokenizer beside the model)"
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print_profile(path, result)


@app.command()
@friendly
def decode(
    model: Path = typer.Argument(..., help=".riq file written by export.riq"),
    outdir: Path = typer.Option(..., "--output", "-o", help="output directory (must not exist unless --overwrite)"),
    weights: str = typer.Option("float", "--weights", help="float: float32 weights; int8: codes that fit stay int8 behind DequantizeLinear; packed: each tensor in the narrowest of 4-bit MatMulNBits, int8, int16, float (int8 / packed: onnx form only)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output directory that compress wrote (never any other folder)"),
) -> None:
    """Rebuild a runnable model (ONNX file, or transformers folder) from a .riq file, bit-exact."""
    from compress.errors import UserError
    from compress.exporters.riq_export import WEIGHTS
    from compress.exporters.riq_export import decode as decode_riq

    if weights not in WEIGHTS:
        raise UserError(f"--weights must be one of {', '.join(WEIGHTS)} (got {weights!r})")
    info = decode_riq(model, outdir, weights, overwrite)
    outdir = info["outdir"]  # `~` expanded: where the folder was written
    where = outdir / info["model"] if info["model"] != "." else outdir
    kept = ", ".join(f"{n} {w}" for w, n in info.get("widths", {}).items() if n) or "no integer tensors"
    console.print(f"[green]decoded[/green] {model} -> {where} ({info['kind']}; {kept}; "
                  f"{info['read_seconds']:.1f} s to decode the file, {info['seconds']:.1f} s in all)")


@app.command("generate")
@friendly
def generate_text(
    model: Path = typer.Argument(..., help=".onnx or .ort causal LM exported with export.onnx (cache=true)"),
    prompt: str = typer.Argument(..., help="text to continue"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="most tokens to add"),
    sample: bool = typer.Option(False, "--sample", help="sample instead of greedy decoding"),
    temperature: float = typer.Option(1.0, "--temperature", help="sampling: logits divided by this (> 0)"),
    top_k: int = typer.Option(0, "--top-k", min=0, help="sampling: keep the k most likely tokens (0: all)"),
    top_p: float = typer.Option(1.0, "--top-p", help="sampling: keep the smallest set with this much probability (0, 1]"),
    seed: int = typer.Option(0, "--seed", help="sampling: random seed (same seed, same text)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=256, help="intra-op threads (default: onnxruntime's; at most 4 per CPU core are used)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder or alias, for a model without one beside it"),
    raw: bool = typer.Option(False, "--raw", help="send the prompt as is, not as a user turn of the tokenizer's chat template"),
) -> None:
    """Generate text with onnxruntime: prompt step, then one token per step through the KV cache. The prompt is
    sent as a user turn of the tokenizer's chat template when it has one (--raw: as is)."""
    from compress import models
    from compress.errors import ModelLoadError
    from compress.generate import generate, uses_chat

    quiet_libraries()
    path = _onnx_file(model)
    tok = models.load_tokenizer(Path(tokenizer)) if tokenizer else models.find_tokenizer(path)
    if tok is None:
        raise ModelLoadError(f"no tokenizer beside '{path}': give --tokenizer FOLDER (a transformers tokenizer folder or alias)")
    if threads is not None:
        from compress.profiling import thread_cap

        threads = min(threads, thread_cap())
    try:
        result = generate(path, tok, prompt, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, threads=threads, chat=not raw)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types; anything else is raised again
        raise _cannot_run(exc, path, tok, f"{max_new_tokens} new tokens after this prompt") from None
    typer.echo(result.text)
    how = "chat template" if uses_chat(tok, not raw) else "raw prompt"
    console.print(f"TTFT {result.ttft_s * 1000:.1f} ms, {result.decode_tokens_per_s:.1f} tokens/s, "
                  f"{result.num_tokens} tokens ({result.prompt_tokens} in the prompt, {how}; stopped by {result.stop_reason})",
                  highlight=False)


def _cannot_run(exc: Exception, path: Path, tokenizer, what: str) -> Exception:
    """An error of onnxruntime running the model (a shape it cannot take, memory it cannot get, a run
    in a fresh process that failed) as one UserError; any other exception is returned unchanged."""
    import subprocess

    from compress.errors import UserError, clip

    if isinstance(exc, subprocess.CalledProcessError):  # the peak-memory run in a fresh process
        lines = [ln for ln in (exc.stderr or "").strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else f"exit status {exc.returncode}"
    elif isinstance(exc, MemoryError) or type(exc).__module__.startswith("onnxruntime"):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    else:
        return exc
    text = text.split(" : ")[-1] if "[ONNXRuntimeError]" in text else text  # the code and its name say nothing
    limit = _max_positions(path, tokenizer)
    hint = f"; the model accepts at most {limit} positions" if limit else ""
    return UserError(f"the model cannot run {what}: {clip(text, 300) or 'out of memory'}{hint}")


def _max_positions(path: Path, tokenizer) -> Optional[int]:
    """The longest input the model takes, where its config.json, graph metadata or tokenizer says."""
    from compress.generate import CONTEXT_KEYS

    found = []
    try:
        config = json.loads((path.parent / "config.json").read_text())
        found += [config[k] for k in CONTEXT_KEYS if isinstance(config, dict) and isinstance(config.get(k), int)][:1]
    except (OSError, ValueError):
        pass
    try:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        found += [int(meta["max_position_embeddings"])] if meta.get("max_position_embeddings", "").isdigit() else []
    except Exception:  # noqa: BLE001 - an .ort file, or a graph onnx cannot read: nothing said
        pass
    tok_limit = getattr(tokenizer, "model_max_length", None)
    found += [tok_limit] if isinstance(tok_limit, int) and 0 < tok_limit < 10**7 else []  # 1e30: "no limit"
    return min(found) if found else None


def _print_profile(path: Path, result: dict) -> None:
    lat, s = result["latency_ms"], result["settings"]
    out = Console()
    out.print(f"[bold]{path}[/bold]: batch {s['batch']}, seq {s['seq']}, {s['threads']} threads, {s['runs']} runs; inputs: {result['inputs']}")
    out.print(f"latency p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, p99 {lat['p99']:.2f} ms; "
              f"throughput {result['throughput_per_s']:.1f}/s; peak memory {result['peak_rss_mb']:.0f} MB "
              f"({result['model_mb']:.0f} MB above the runtime baseline); "
              f"size {result['bytes'] / 1e6:.1f} MB")
    gen = result.get("generation")
    if gen:
        out.print(f"generation: TTFT {gen['ttft_ms']:.1f} ms for a {gen['prompt_tokens']}-token prompt, "
                  f"{gen['tokens_per_s']:.1f} tokens/s decoding, peak memory {gen.get('peak_rss_mb', float('nan')):.0f} MB")
    table = Table("op", "ms / run", "share")
    for row in result["top_ops"]:
        table.add_row(row["op"], f"{row['ms']:.2f}", f"{row['share']:.1%}")
    out.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C before a command's own handler runs (imports, option parsing)
        console.print("[bold red]interrupted[/bold red]", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
