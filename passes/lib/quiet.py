"""Silence onnxruntime.quantization's root-logger advice ("consider pre-processing...") while a
quantizer runs; our report says what was done and what it cost."""
from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_root_logger(level: int = logging.ERROR):
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)
