"""The input model's measurements, cached by content hash so a second run on the same model and
data does not measure it again.

Measuring the input stage is the costliest part of a short run (SmolLM2 on 2 cores: minutes of
perplexity and latency before the first pass starts), and it only depends on the input's bytes,
the data, and the measurement settings. The key hashes all of these: the content of the input's
files (weights, config, tokenizer; an ONNX file with its external data) or of an in-memory
module's tensors, the data fingerprint, max_length, the measurement level, the latency settings
and whether task metrics run. The entry holds the input stage's record (fidelity, metrics,
latency) and, for kinds whose teacher outputs are kept (`kind.cache_reference`), those outputs:
on the held-out samples (`outputs.npz`) and on the unseen-domain samples (`unseen.npz`, when
measured; the key then includes those samples' fingerprint).

Where: `$COMPRESS_CACHE`, else `~/.cache/compress/reference`; `COMPRESS_CACHE=off` disables it.
Entries are written atomically; an unreadable or foreign entry is ignored (measured again), and
a failure to write one never fails a run. Only JSON and plain arrays are read back (no pickle)."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

VERSION = 1
HASHED_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".ort", ".data", ".json", ".txt", ".model", ".jinja")


def cache_dir() -> Path | None:
    where = os.environ.get("COMPRESS_CACHE", "")
    if where.lower() in ("off", "0", "false", "no"):
        return None
    return Path(where).expanduser() if where else Path.home() / ".cache" / "compress" / "reference"


def _file_digest(h: Any, path: Path) -> None:
    h.update(f"{path.name}:{path.stat().st_size}:".encode())
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def content_hash(spec: Any, info: Any) -> str | None:
    """What the input model is, by content: its files, or an in-memory module's tensors."""
    h = hashlib.blake2b(digest_size=20)
    if info.path is None:
        model = spec if hasattr(spec, "state_dict") else None
        if model is None:  # a built-in alias built in code: its name and the package that ships it
            h.update(f"builtin:{spec}".encode())
            return h.hexdigest()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    from compress.profiling import external_files

    path = Path(info.path)
    if path.is_file():
        files = [path, *external_files(path)]
        folder = path.parent
        files += sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".txt", ".model", ".jinja"))
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in HASHED_SUFFIXES)
    for f in files:
        _file_digest(h, f)
    return h.hexdigest()


def key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"v": VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Entry(NamedTuple):
    """A cache entry: the input stage's record, the teacher's outputs on the held-out samples and on
    the unseen-domain samples (None when not kept), and the entry's folder."""

    record: dict
    outputs: list[np.ndarray] | None
    folder: Path
    unseen: list[np.ndarray] | None = None


def _arrays(path: Path) -> list[np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return [npz[f"b{i}"] for i in range(len(npz.files))]


def load(entry: str) -> Entry | None:
    """The entry, or None when absent or unreadable."""
    root = cache_dir()
    if root is None or not (root / entry / "record.json").is_file():
        return None
    folder = root / entry
    try:
        record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
        outputs, unseen = _arrays(folder / "outputs.npz"), _arrays(folder / "unseen.npz")
    except (OSError, ValueError, KeyError):
        return None
    return Entry(record, outputs, folder, unseen) if isinstance(record, dict) else None


def save(entry: str, record: dict, outputs: list[np.ndarray] | None,
         unseen: list[np.ndarray] | None = None) -> Path | None:
    """Write an entry atomically; None (and nothing raised) when the cache can't be written."""
    root = cache_dir()
    if root is None:
        return None
    final = root / entry
    tmp = root / f".{entry}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        (tmp / "record.json").write_text(json.dumps(record, default=str), encoding="utf-8")
        for name, arrays in (("outputs.npz", outputs), ("unseen.npz", unseen)):
            if arrays is not None:
                np.savez(tmp / name, **{f"b{i}": np.asarray(o) for i, o in enumerate(arrays)})
        if final.exists():  # another run wrote the same entry meanwhile: keep theirs
            _remove(tmp)
            return final
        tmp.rename(final)
        return final
    except OSError:
        _remove(tmp)
        return None


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
