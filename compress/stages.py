"""Stage folders: saving a finished pass's state so a later run can resume from it, writing the
final model (outputs.py publishes the run directory)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from compress.exporters import genai
from compress.profiling import external_files
from compress.state import ModelState

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".ort", ".data")


def identity(spec: Any, info: Any) -> dict:
    """What makes an input the same input: its path and the size/mtime of its weight files."""
    if info.path is None:
        if isinstance(spec, str):  # a built-in model made in code (efficientnet-lite0)
            return {"builtin": spec}
        return {"module": type(spec).__name__, "id": id(spec)}
    if info.path.is_file():
        files = [info.path, *external_files(info.path)]
    else:
        files = sorted(p for p in info.path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return {"path": str(info.path.resolve()), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def input_files(info: Any) -> list[Path]:
    """The input model's files (an ONNX file with its external data, or its folder): no output may hold them."""
    if info.path is None:
        return []
    return [info.path, *external_files(info.path)] if info.path.is_file() else [info.path]


def prepare(sdir: Path, key: str, keep: bool) -> None:
    """A fresh stage folder, or (resume) the one an interrupted run of the same pass left."""
    marker = sdir / "key.txt"
    if not (keep and marker.is_file() and marker.read_text() == key):
        shutil.rmtree(sdir, ignore_errors=True)
    sdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)


def save(state: ModelState, sdir: Path, key: str, write_model: bool = True) -> ModelState:
    """Persist the stage: torch models via save_pretrained, file forms already live in sdir.
    `write_model=False`: the model is there already (a cached stage measured again)."""
    if state.form == "torch" and state.history[-1]["index"] > 0 and write_model:
        save_torch(state, sdir / "model")
    elif state.form != "torch" and state.hf_config is not None:
        state.hf_config.to_json_file(sdir / "config.json")
    meta = {k: v for k, v in state.meta.items() if k != "hf_config"}
    doc = {"key": key, "form": state.form, "path": _rel(state.path, sdir.parent.parent), "meta": meta,
           "record": state.history[-1]}
    tmp = sdir / "stage.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.rename(sdir / "stage.json")  # written last: its presence marks the stage as complete
    return state


def save_torch(state: ModelState, folder: Path) -> None:
    """As the kind's storage saves it: transformers models with save_pretrained (+ tokenizer); CNNs as
    weights + layer widths (images.save_module)."""
    state.kind.storage.save(state.model, state.tokenizer, folder)


def _rel(path: Path | None, work: Path) -> dict | None:
    """A stage's model path: relative to the run directory when inside it (so the run directory can
    move, and resume works from any cwd), else absolute."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    try:
        return {"in_run": True, "path": str(resolved.relative_to(work.resolve()))}
    except ValueError:
        return {"in_run": False, "path": str(resolved)}


def load_cached(sdir: Path, key: str, state: ModelState) -> ModelState | None:
    marker = sdir / "stage.json"
    if not marker.is_file():
        return None
    doc = json.loads(marker.read_text())
    if doc.get("key") != key:
        return None
    rec = doc["record"]
    if rec["index"] == 0:
        return state.with_record(rec)
    meta = dict(doc["meta"])
    if doc["form"] == "torch":
        model = state.kind.storage.reload(sdir / "model", state.meta.get("trust_remote_code", False))
        if model is None:
            return None  # a caller's own CNN class can't be rebuilt here: the pass runs again
        new = replace(state, form="torch", model=model, path=None, meta=meta)
    else:
        loc = doc["path"]
        path = sdir.parent.parent / loc["path"] if loc["in_run"] else Path(loc["path"])
        if (sdir / "config.json").is_file():
            from transformers import AutoConfig

            meta["hf_config"] = AutoConfig.from_pretrained(sdir, trust_remote_code=state.meta.get("trust_remote_code", False))
        new = replace(state, form=doc["form"], model=None, path=path, meta=meta)
    return new.with_record(rec)


def copy_model_file(src: Path, dst: Path) -> None:
    """Copy an ONNX file; external data is re-saved beside it under the new name."""
    import onnx

    if src.suffix == ".onnx" and _has_external_data(src):
        model = onnx.load(str(src))
        onnx.save_model(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        shutil.copy2(src, dst)


def _has_external_data(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def write_final(state: ModelState, work: Path, console: Any = None) -> str:
    for name, src in state.meta.get("artifacts", {}).items():  # files a pass made beside the model (model.riq)
        shutil.copy2(src, work / name)
    if state.form == "torch":
        save_torch(state, work / "model")
        return "model"
    name = "model" + Path(state.path).suffix
    copy_model_file(Path(state.path), work / name)
    if state.tokenizer is not None:  # so `compress run OUT/model.onnx` and users find the tokenizer
        state.tokenizer.save_pretrained(work)
    if state.form == "onnx" and state.kind.name == "causal-lm":  # onnxruntime_genai.Model(OUT) loads the folder
        source = Path(str(state.source)).expanduser()  # an ONNX input: the config.json beside it, if any
        beside = source.parent if source.is_file() else None
        config = state.hf_config if state.hf_config is not None or beside is None else beside / "config.json"
        why = genai.write(work, name, config, state.tokenizer, prior=beside / genai.CONFIG if beside else None)
        if why and console is not None:
            console.print(f"[yellow]{why}[/yellow]")
    return name


def one_line(rec: dict) -> str:
    fid = rec.get("fidelity") or {}
    fid_s = ", ".join(f"{k}={v:.4f}" for k, v in fid.items() if k in ("cosine", "kl", "top1"))
    unseen = rec.get("fidelity_unseen") or {}
    fid_s += "".join(f", unseen-domain {k}={v:.4f}" for k, v in unseen.items() if k in ("cosine", "kl", "top1"))
    met = ", ".join(f"{k}={v:.3f}" for k, v in (rec.get("metrics") or {}).items())
    lat = rec.get("latency_ms") or {}
    lat_s = f"p50={lat['p50']:.2f} ms" if lat else ""
    size = f"{rec['bytes'] / 1e6:.1f} MB" if rec.get("bytes") else ""
    measured = f"measured in {rec['measure_seconds']:.1f}s" if rec.get("measure_seconds") is not None else ""
    return " | ".join(x for x in (f"{rec['seconds']:.1f}s", size, fid_s, met, lat_s, measured) if x)
