"""`PassContext`: what a pass gets besides the state and its config, so every pass can annotate
`run(state: ModelState, cfg: MyConfig, ctx: PassContext) -> ModelState`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from compress.profiling import LatencySettings


@dataclass
class PassContext:
    """What a pass gets besides the state and its config."""

    workdir: Path  # the stage folder: write every output file here
    index: int
    max_length: int
    latency: LatencySettings
    console: Console
    key: str = ""  # hash of (input, data, every config up to this pass): tags checkpoints
    resume: bool = False  # a training pass may continue from its checkpoint in `workdir`
    notes: dict = field(default_factory=dict)  # merged into this stage's report record
