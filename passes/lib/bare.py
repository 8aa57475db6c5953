"""What a pass's `apply()` needs when it is called on a bare model, without the pipeline (the way
torchao's `quantize_(model, config)` is called): the data in the forms a user has at hand, the
checks the pipeline runs before any work, and defaults for what the pipeline's `PassContext` gives
(a work folder for checkpoints, a console, no resume). The pipeline calls the same `apply()` from
each pass's `run()` with its own context, so both run the same code."""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from compress.context import PassContext
from compress.errors import ConfigError, UserError

DEFAULT_MAX_LENGTH = 128  # the pipeline's default: tokens per sample where a pass takes no length of its own


def texts(data: Any, what: str) -> list[str]:
    """Training text: a `compress.data.TextData` gives its train part only (the held-out part must
    never train or calibrate what it later measures); a list of strings is used whole."""
    from compress.data import TextData

    if isinstance(data, TextData):
        out = list(data.train)
    elif data is None or isinstance(data, (str, bytes, Path)) or not all(isinstance(t, str) for t in data):
        raise UserError(f"{what} needs training text: a list of strings or a compress.data.TextData "
                        "(compress.data.load('wiki') or a file path), not " + type(data).__name__)
    else:
        out = list(data)
    if not out:
        raise UserError(f"{what} needs training text, and got none")
    return out


def images(data: Any, what: str) -> np.ndarray:
    """Training images, (N, channels, H, W) float32 preprocessed for the model: a
    `compress.images.ImageData` gives its train part, an array or tensor is used whole."""
    from compress.images import ImageData

    if isinstance(data, ImageData):
        return data.train
    if hasattr(data, "detach"):  # a torch tensor
        data = data.detach().cpu().numpy()
    if not isinstance(data, np.ndarray) or data.ndim != 4 or len(data) == 0:
        raise UserError(f"{what} needs images: a non-empty (N, channels, H, W) array or a compress.images.ImageData, "
                        f"not {getattr(data, 'shape', type(data).__name__)}")
    return np.ascontiguousarray(data, dtype=np.float32)


def prepare(cfg: Any, model: Any, data: Any, ctx: Any, kind: Any = None) -> Any:
    """The kind the pass treats `model` as. Inside the pipeline (`ctx` given) the whole pass list was
    validated before any work; a bare call gets the same checks of this pass here (one ConfigError),
    with the kind read from the model as the pipeline reads it (`kind` overrides it)."""
    from compress import kinds, loading, registry

    info = loading.describe(model)
    kind = kinds.get(kind or info.kind)  # a compress.kinds.ModelKind (a name is looked up): the pass asks it
    if ctx is not None:
        return kind
    spec, info = registry.spec_for(cfg), dataclasses.replace(info, kind=kind)
    problems = []
    if kind not in spec.kinds:
        problems.append(f"{spec.name} does not work on a {kind} model (it takes: {', '.join(spec.kinds)})")
    else:
        if spec.needs_data(cfg) and data is None:
            problems.append(f"{spec.name} needs data: a list of strings or a TextData (images for a CNN)")
        problems += spec.check(cfg, info)
    if problems:
        raise ConfigError(problems, spec.name)
    return kind


@contextlib.contextmanager
def context(ctx: PassContext | None, workdir: Path | str | None = None, progress: bool = True) -> Iterator[PassContext]:
    """The pipeline's context as it is; for a bare call, one with defaults: `workdir` (created if
    missing) or a temporary folder removed afterwards, a console on stderr (silent with
    progress=False), no checkpoint key, no resume."""
    if ctx is not None:
        yield ctx
        return
    from rich.console import Console

    from compress.profiling import LatencySettings

    console = Console(stderr=True) if progress else Console(quiet=True)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compress-")))
        else:
            folder = Path(workdir)
            folder.mkdir(parents=True, exist_ok=True)
        yield PassContext(folder, 0, DEFAULT_MAX_LENGTH, LatencySettings(), console)
